"""A small pure-PyTorch static subnet, so exported subnets run without the original repositories.

`StaticSubnet(space, cfg)` is an `nn.Module` (NCHW) whose `state_dict()` has exactly the keys,
order and shapes of the original static model (`static.static_to_torch` writes them), written
from SPEC.md §2:

* in-model resize of the (normalised) input to `cfg.resolution` when its size differs: PyTorch
  bicubic, align_corners False, no antialiasing (§2.1);
* stem 3x3 conv (stride 2, padding 1) + BN + swish (§2.2);
* MBConv blocks: [1x1 expand + BN + swish] -> depthwise k x k (the block's stride, symmetric
  k//2 padding) + BN + swish -> [SE: mean, 1x1 + ReLU, 1x1, x * relu6(g + 3) / 6] -> 1x1 project
  + BN, no activation (§2.3);
* every block residual: identity if cin == cout and stride 1, else avg-pool (kernel = stride,
  padding 0 for even sizes, 1 for odd, pads counted) and then a 1x1 conv if cin != cout (§2.4);
* head: 1x1 final expand + BN + swish, global average pool, 1x1 feature mix (no BN, no bias) +
  swish, linear classifier (§2.5). The batch axis is kept for N = 1.

BN eps is 1e-5 (§3); momentum 0.1 as the exported original (§5.3). Train mode normalises with
batch statistics like any `nn.BatchNorm2d`; there is no dropout (the static model has none).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from alphanet_jax import space as space_lib
from alphanet_jax.models import extract

BN_EPS = 1e-5


def swish(x: torch.Tensor) -> torch.Tensor:
  return x * torch.sigmoid(x)  # x * sigmoid(x); the only activation outside SE (SPEC §1)


class ConvBN(nn.Module):
  """conv (no bias) -> BN -> optional swish; keys `conv.weight`, `bn.*`."""

  def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
               act: bool = True, bn_momentum: float = 0.1):
    super().__init__()
    # Symmetric k//2 padding as the original (SPEC §2.3).
    self.conv = nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, groups=groups,
                          bias=False)
    self.bn = nn.BatchNorm2d(cout, eps=BN_EPS, momentum=bn_momentum)
    self.act = act

  def forward(self, x):
    x = self.bn(self.conv(x))
    return swish(x) if self.act else x


class SqueezeExcite(nn.Module):
  """SE with biases on both 1x1 convs, ReLU inside and hard-sigmoid gate (SPEC §2.3 item 4)."""

  def __init__(self, channels: int, hidden: int):
    super().__init__()
    self.fc = nn.ModuleDict({"reduce": nn.Conv2d(channels, hidden, 1, bias=True),
                             "expand": nn.Conv2d(hidden, channels, 1, bias=True)})

  def forward(self, x):
    g = x.mean(3, keepdim=True).mean(2, keepdim=True)  # mean over W, then H
    g = self.fc["expand"](F.relu(self.fc["reduce"](g)))
    return x * (F.relu6(g + 3.0) / 6.0)


class DepthConv(ConvBN):
  """Depthwise conv + BN + swish, then SE (keys `conv`, `bn`, `se.fc.{reduce,expand}`)."""

  def __init__(self, channels: int, kernel: int, stride: int, se: int, bn_momentum: float):
    super().__init__(channels, channels, kernel, stride, groups=channels, act=True,
                     bn_momentum=bn_momentum)
    self.se = SqueezeExcite(channels, se) if se else None

  def forward(self, x):
    x = super().forward(x)
    return self.se(x) if self.se is not None else x


class MBConv(nn.Module):
  """`mobile_inverted_conv`: [inverted_bottleneck] -> depth_conv -> point_linear."""

  def __init__(self, blk: extract.StaticBlock, bn_momentum: float):
    super().__init__()
    self.inverted_bottleneck = (ConvBN(blk.cin, blk.mid, 1, bn_momentum=bn_momentum)
                                if blk.has_expand else None)
    # The stride sits in the depthwise conv; the expand conv always has stride 1 (SPEC §2.3).
    self.depth_conv = DepthConv(blk.mid, blk.kernel, blk.stride, blk.se, bn_momentum)
    self.point_linear = ConvBN(blk.mid, blk.cout, 1, act=False, bn_momentum=bn_momentum)

  def forward(self, x):
    if self.inverted_bottleneck is not None:
      x = self.inverted_bottleneck(x)
    return self.point_linear(self.depth_conv(x))


class Shortcut(nn.Module):
  """Holds the 1x1 shortcut conv [cout, cin] that every static block stores (SPEC §5.3)."""

  def __init__(self, cin: int, cout: int):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, 1, bias=False)


class Block(nn.Module):
  """One residual MBConv block (SPEC §2.4)."""

  def __init__(self, blk: extract.StaticBlock, bn_momentum: float):
    super().__init__()
    self.mobile_inverted_conv = MBConv(blk, bn_momentum)
    self.shortcut = Shortcut(blk.cin, blk.cout)
    self.stride, self.cin, self.cout = blk.stride, blk.cin, blk.cout

  def forward(self, x):
    branch = self.mobile_inverted_conv(x)
    if self.cin == self.cout and self.stride == 1:
      return branch + x
    skip = x
    if self.stride > 1:
      # Avg-pool with kernel = stride: padding 0 for even sizes, 1 for odd ones, pads counted,
      # sizes floored (SPEC §2.4).
      pad = 0 if skip.shape[-2] % 2 == 0 else 1
      skip = F.avg_pool2d(skip, self.stride, self.stride, padding=pad, count_include_pad=True)
    if self.cin != self.cout:
      skip = self.shortcut.conv(skip)
    return branch + skip


class GlobalAvgPool(nn.Module):
  def forward(self, x):
    return x.mean((2, 3), keepdim=True)


class ConvAct(nn.Module):
  """1x1 conv (no bias, no BN) + swish: the feature-mix layer (SPEC §2.5)."""

  def __init__(self, cin: int, cout: int):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, 1, bias=False)

  def forward(self, x):
    return swish(self.conv(x))


class Classifier(nn.Module):
  def __init__(self, cin: int, num_classes: int):
    super().__init__()
    self.linear = nn.Linear(cin, num_classes)

  def forward(self, x):
    return self.linear(x)


class StaticSubnet(nn.Module):
  """A standalone subnet of `space`, with the original static model's state_dict keys.

  Args:
    space: the search space.
    cfg: the subnet (validated against `space`).
    bn_momentum: PyTorch BN momentum (0.1 as the original export; None = cumulative average,
      as BN recalibration uses).
  """

  def __init__(self, space: space_lib.SearchSpace, cfg: space_lib.SubnetConfig,
               bn_momentum: float | None = 0.1):
    super().__init__()
    blocks = extract.static_blocks(space, cfg)  # validates cfg
    self.resolution = cfg.resolution
    c0, c7, cl = cfg.width[0], cfg.width[7], cfg.width[8]
    fe = space.head_expand_ratio * c7
    self.first_conv = ConvBN(3, c0, 3, space.stem_stride, bn_momentum=bn_momentum)
    self.blocks = nn.ModuleList([Block(b, bn_momentum) for b in blocks])
    # Indices matter: `last_conv.0` final expand, 1 the pool, `last_conv.2` feature mix.
    self.last_conv = nn.Sequential(ConvBN(c7, fe, 1, bn_momentum=bn_momentum), GlobalAvgPool(),
                                   ConvAct(fe, cl))
    self.classifier = Classifier(cl, space.num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    r = self.resolution
    if tuple(x.shape[-2:]) != (r, r):
      # In-model resize of the normalised input: bicubic A = -0.75, align_corners False, no
      # antialiasing even when shrinking (SPEC §2.1).
      x = F.interpolate(x, size=(r, r), mode="bicubic", align_corners=False)
    x = self.first_conv(x)
    for block in self.blocks:
      x = block(x)
    x = self.last_conv(x)
    return self.classifier(torch.flatten(x, 1))
