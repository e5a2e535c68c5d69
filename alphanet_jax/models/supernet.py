"""Flax NNX modules of the supernet and of static subnets, and their functional boundary.

The modules own the parameters, laid out exactly as the PyTorch state_dict (max shapes for the
supernet; SPEC.md §5), so conversion is renames and transposes. Their `__call__` runs the pure
`network.forward`; the jitted training and evaluation code works on plain variable dicts
(`variables(model)`), never on module objects (DESIGN.md decision 10).

Initialisation follows PyTorch's defaults on the max-shaped tensors (SPEC §4): conv and linear
weights and biases U(+-1/sqrt(fan_in)), BN gamma 1, beta 0, running mean 0, variance 1; then the
project BN's gamma is 0 in every block.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from flax import nnx

from alphanet_jax import space as space_lib
from alphanet_jax.models import layers
from alphanet_jax.models import network


def _uniform(rng: np.random.Generator, shape, fan_in: int):
  # Drawn with numpy on the host: one XLA program per distinct shape (what jax.random would
  # compile eagerly) cost ~40 s for the tiny supernet; numpy takes milliseconds.
  bound = 1.0 / math.sqrt(fan_in)
  return jnp.asarray(rng.uniform(-bound, bound, shape).astype(np.float32))


class Conv(nnx.Module):
  """A bias-free conv kernel [kh, kw, in/groups, out]."""

  def __init__(self, kh: int, in_ch: int, out_ch: int, *, rng: np.random.Generator):
    self.kernel = nnx.Param(_uniform(rng, (kh, kh, in_ch, out_ch), kh * kh * in_ch))


class BatchNorm(nnx.Module):

  def __init__(self, ch: int, *, zero_scale: bool = False):
    self.scale = nnx.Param(jnp.zeros((ch,)) if zero_scale else jnp.ones((ch,)))
    self.bias = nnx.Param(jnp.zeros((ch,)))
    self.mean = nnx.BatchStat(jnp.zeros((ch,)))
    self.var = nnx.BatchStat(jnp.ones((ch,)))


class ConvBN(nnx.Module):

  def __init__(self, kh: int, in_ch: int, out_ch: int, *, rng: np.random.Generator,
               zero_scale: bool = False):
    self.conv = Conv(kh, in_ch, out_ch, rng=rng)
    self.bn = BatchNorm(out_ch, zero_scale=zero_scale)


class ConvOnly(nnx.Module):
  """A layer that is only a conv (shortcut, feature_mix): keeps the `.conv.kernel` path."""

  def __init__(self, in_ch: int, out_ch: int, *, rng: np.random.Generator):
    self.conv = Conv(1, in_ch, out_ch, rng=rng)


class Linear1x1(nnx.Module):
  """A 1x1 conv with bias (the SE convs)."""

  def __init__(self, in_ch: int, out_ch: int, *, rng: np.random.Generator):
    self.kernel = nnx.Param(_uniform(rng, (1, 1, in_ch, out_ch), in_ch))
    self.bias = nnx.Param(_uniform(rng, (out_ch,), in_ch))


class SqueezeExcite(nnx.Module):

  def __init__(self, ch: int, se_ch: int, *, rng: np.random.Generator):
    self.reduce = Linear1x1(ch, se_ch, rng=rng)
    self.expand = Linear1x1(se_ch, ch, rng=rng)


class DepthConv(nnx.Module):

  def __init__(self, k: int, ch: int, se_ch: int, *, rng: np.random.Generator):
    self.conv = Conv(k, 1, ch, rng=rng)   # depthwise: [k, k, 1, C], fan_in k*k
    self.bn = BatchNorm(ch)
    if se_ch:
      self.se = SqueezeExcite(ch, se_ch, rng=rng)


class MBBlock(nnx.Module):

  def __init__(self, lay: network.BlockLayout, *, rng: np.random.Generator):
    if lay.has_expand:
      self.inverted_bottleneck = ConvBN(1, lay.in_ch, lay.mid_ch, rng=rng)
    self.depth_conv = DepthConv(lay.kernel_size, lay.mid_ch, lay.se_ch, rng=rng)
    self.point_linear = ConvBN(1, lay.mid_ch, lay.out_ch, rng=rng, zero_scale=True)
    # Every block stores a shortcut conv, also when its shortcut is the identity (SPEC §5.1).
    self.shortcut = ConvOnly(lay.in_ch, lay.out_ch, rng=rng)


class Head(nnx.Module):

  def __init__(self, in_ch: int, expand_ch: int, mix_ch: int, *, rng: np.random.Generator):
    self.final_expand_layer = ConvBN(1, in_ch, expand_ch, rng=rng)
    self.feature_mix_layer = ConvOnly(expand_ch, mix_ch, rng=rng)


class Classifier(nnx.Module):

  def __init__(self, in_ch: int, num_classes: int, *, rng: np.random.Generator):
    self.kernel = nnx.Param(_uniform(rng, (in_ch, num_classes), in_ch))
    self.bias = nnx.Param(_uniform(rng, (num_classes,), in_ch))


class Network(nnx.Module):
  """The AttentiveNAS network at the shapes of a `NetLayout` (supernet or static subnet)."""

  def __init__(self, layout: network.NetLayout, *, rng: np.random.Generator):
    self.layout = layout
    self.first_conv = ConvBN(3, 3, layout.stem_ch, rng=rng)
    for j, lay in enumerate(layout.blocks):
      name = f"blocks_{lay.index if layout.masked else j}"
      setattr(self, name, MBBlock(lay, rng=rng))
    self.last_conv = Head(layout.head_in_ch, layout.final_expand_ch, layout.feature_mix_ch,
                          rng=rng)
    self.classifier = Classifier(layout.feature_mix_ch, layout.num_classes, rng=rng)

  def __call__(self, x, masks=None, **kwargs):
    """Runs `network.forward` on this module's variables; 'calib' mode updates batch_stats in
    place with the batch's statistics (mean and unbiased variance)."""
    out = network.forward(self.layout, variables(self), x, masks, **kwargs)
    bn = kwargs.get("bn", layers.BNMode())
    if bn.kind == "calib":
      stats = nnx.state(self, nnx.BatchStat)
      nnx.replace_by_pure_dict(stats, out[1])
      nnx.update(self, stats)
      out = out[0] if len(out) == 2 else (out[0],) + out[2:]
    return out


def Supernet(space: space_lib.SearchSpace, *, seed: int = 0) -> Network:  # noqa: N802
  """The masked supernet of `space` (max-shaped parameters), initialised from `seed`."""
  return Network(network.supernet_layout(space), rng=np.random.default_rng(seed))


def StaticSubnet(space: space_lib.SearchSpace, cfg: space_lib.SubnetConfig, *,  # noqa: N802
                 seed: int = 0) -> Network:
  """A subnet at its real shapes (what `extract_subnet` fills and what users deploy)."""
  return Network(network.static_layout(space, cfg), rng=np.random.default_rng(seed))


def variables(model: Network) -> dict:
  """The module's variables as plain nested dicts: {'params': ..., 'batch_stats': ...}."""
  return {"params": nnx.state(model, nnx.Param).to_pure_dict(),
          "batch_stats": nnx.state(model, nnx.BatchStat).to_pure_dict()}


def init_variables(layout: network.NetLayout, seed: int = 0) -> dict:
  """Fresh variables of a layout as plain dicts (host-generated from `seed`; place them with
  jax.device_put onto their shardings)."""
  return variables(Network(layout, rng=np.random.default_rng(seed)))
