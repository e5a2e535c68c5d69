"""Network layouts and the pure forward pass shared by the masked supernet and static subnets.

A `NetLayout` says which blocks exist and how many channels each tensor has. The supernet's
layout has the space's maximum shapes and takes masks; a static subnet's layout has the subnet's
real shapes and takes no masks. Both run through `forward`, so "the static subnet is the same
blocks at real shapes" holds by construction (DESIGN.md decision 3).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from alphanet_jax import masks as masks_lib
from alphanet_jax import space as space_lib
from alphanet_jax.models import layers


@dataclasses.dataclass(frozen=True)
class BlockLayout:
  """One MBConv block. `index` is the supernet block index (drop-connect rate, names)."""
  index: int
  stage: int
  index_in_stage: int
  in_ch: int
  mid_ch: int
  out_ch: int
  se_ch: int            # 0: no SE
  kernel_size: int
  stride: int
  has_expand: bool
  # 'identity' (plus an avg-pool when stride 2), 'conv' (avg-pool first when stride 2), or
  # 'maybe' (supernet only: a conv iff the subnet's cin != cout, chosen by a mask).
  shortcut: str


@dataclasses.dataclass(frozen=True)
class NetLayout:
  stem_ch: int
  blocks: tuple[BlockLayout, ...]
  final_expand_ch: int
  feature_mix_ch: int
  num_classes: int
  num_supernet_blocks: int
  num_stages: int
  masked: bool          # True for the supernet (takes masks)

  @property
  def head_in_ch(self) -> int:
    return self.blocks[-1].out_ch


def supernet_layout(space: space_lib.SearchSpace) -> NetLayout:
  blocks = tuple(
      BlockLayout(index=b.index, stage=b.stage, index_in_stage=b.index_in_stage, in_ch=b.max_in,
                  mid_ch=b.max_mid, out_ch=b.max_out, se_ch=b.se_max, kernel_size=b.max_kernel,
                  stride=b.stride, has_expand=b.has_expand, shortcut=b.shortcut)
      for b in space.blocks)
  return NetLayout(stem_ch=max(space.stem_widths), blocks=blocks,
                   final_expand_ch=space.max_final_expand, feature_mix_ch=max(space.last_widths),
                   num_classes=space.num_classes, num_supernet_blocks=space.num_blocks,
                   num_stages=len(space.stages), masked=True)


def static_layout(space: space_lib.SearchSpace, cfg: space_lib.SubnetConfig) -> NetLayout:
  """Real shapes of `cfg`: the first depth[s] blocks of each stage, renumbered in order."""
  space.validate(cfg)
  specs = space.blocks
  blocks = []
  for s, group in enumerate(space.block_group_info):
    for b in group[:cfg.depth[s]]:
      spec = specs[b]
      cin, mid, cout, se, k = masks_lib.block_widths(space, cfg, spec)
      blocks.append(BlockLayout(
          index=b, stage=s, index_in_stage=spec.index_in_stage, in_ch=cin, mid_ch=mid,
          out_ch=cout, se_ch=se, kernel_size=k, stride=spec.stride,
          has_expand=cfg.expand_ratio[s] != 1,
          shortcut="identity" if cin == cout else "conv"))
  return NetLayout(stem_ch=cfg.width[0], blocks=tuple(blocks),
                   final_expand_ch=space.head_expand_ratio * cfg.width[7],
                   feature_mix_ch=cfg.width[8], num_classes=space.num_classes,
                   num_supernet_blocks=space.num_blocks, num_stages=len(space.stages),
                   masked=False)


def _bn(x, params, stats, name, bn, mask):
  return layers.batch_norm(x, params[name]["bn"], None if stats is None else stats[name]["bn"],
                           bn, mask)


def _record(new_stats: dict, name: str, st):
  if st is not None:   # statistics exist only in 'calib' mode
    new_stats[name] = {"bn": st}


def block_forward(lay: BlockLayout, params, stats, x, m, *, bn: layers.BNMode, dw_impl: str,
                  drop_connect_rate: float, key):
  """One MBConv block (SPEC §2.3-2.4); returns (output, calib statistics dict)."""
  new_stats = {}
  mid_mask = None if m is None else m["mid"]
  out_mask = None if m is None else m["out"]
  h = x
  if lay.has_expand:
    h = layers.pointwise(h, params["inverted_bottleneck"]["conv"]["kernel"])
    h, st = _bn(h, params, stats, "inverted_bottleneck", bn, mid_mask)
    _record(new_stats, "inverted_bottleneck", st)
    h = layers.swish(h)
  dw = params["depth_conv"]
  kernel = dw["conv"]["kernel"]
  if m is not None:  # k=3 of a 5x5 allocation: the centre window, the ring zeroed (SPEC §2.3)
    kernel = kernel * m["kernel"][:, :, None, None].astype(kernel.dtype)
  h = layers.depthwise_conv(h, kernel, lay.stride, impl=dw_impl)  # the block's stride is here
  h, st = _bn(h, params, stats, "depth_conv", bn, mid_mask)
  _record(new_stats, "depth_conv", st)
  h = layers.swish(h)
  if lay.se_ch:  # SE sits inside depth_conv, after its BN + swish
    h = layers.squeeze_excite(h, dw["se"], None if m is None else m["se"])
  h = layers.pointwise(h, params["point_linear"]["conv"]["kernel"])
  h, st = _bn(h, params, stats, "point_linear", bn, out_mask)   # no activation after project
  _record(new_stats, "point_linear", st)

  # Shortcut: every block is residual. Identity, or avg-pool (stride 2) then a 1x1 conv with no
  # bias/BN when cin != cout (SPEC §2.4).
  sc = layers.avg_pool2(x) if lay.stride > 1 else x
  identity = lay.shortcut == "identity" and lay.stride == 1   # python bool or traced below
  if lay.shortcut == "conv":
    sc = layers.pointwise(sc, params["shortcut"]["conv"]["kernel"])
    if out_mask is not None:
      sc = sc * out_mask.astype(sc.dtype)
  elif lay.shortcut == "maybe":
    conv = layers.pointwise(sc, params["shortcut"]["conv"]["kernel"]) * out_mask.astype(sc.dtype)
    padded = jnp.pad(sc, ((0, 0), (0, 0), (0, 0), (0, lay.out_ch - lay.in_ch)))
    use_conv = m["shortcut_conv"] > 0
    sc = jnp.where(use_conv, conv, padded)
    identity = jnp.logical_not(use_conv) if lay.stride == 1 else False
  elif lay.in_ch != lay.out_ch:
    raise ValueError(f"Block {lay.index}: identity shortcut with {lay.in_ch} != {lay.out_ch}.")

  # Drop-connect acts on the branch of identity shortcuts only.
  if drop_connect_rate > 0 and identity is not False:
    dropped = layers.drop_connect(h, drop_connect_rate, key)
    h = dropped if identity is True else jnp.where(identity, dropped, h)
  return h + sc, new_stats


def _zero_block_stats(lay: BlockLayout):
  """Calibration statistics of a skipped block: zeros in block_forward's structure."""
  def bn(c):
    return {"bn": {"mean": jnp.zeros((c,), jnp.float32), "var": jnp.zeros((c,), jnp.float32)}}
  out = {"inverted_bottleneck": bn(lay.mid_ch)} if lay.has_expand else {}
  out.update(depth_conv=bn(lay.mid_ch), point_linear=bn(lay.out_ch))
  return out


def forward(layout: NetLayout, variables: dict, x, masks: dict | None = None, *,
            resolution: int | None = None, bn: layers.BNMode = layers.BNMode(),
            dropout_rate: float = 0.0, drop_connect_rate: float = 0.0, key=None,
            dw_impl: str = "auto", return_features: bool = False):
  """Logits of the network on NHWC images `x`.

  Args:
    layout: the supernet's (with `masks`) or a static subnet's layout (masks None).
    variables: {'params': ..., 'batch_stats': ...} in the layout's shapes.
    x: [N, H, W, 3] normalised images; resized in-model to `resolution` when H differs.
    masks: the subnet's masks (`alphanet_jax.masks.subnet_masks`), for the supernet only.
    resolution: the subnet's resolution (static); defaults to the input size.
    bn: BatchNorm mode.
    dropout_rate, drop_connect_rate: regularisation (train only; need `key`).
    key: PRNG key for dropout and drop-connect.
    dw_impl: depthwise implementation ('auto', 'native', 'shift').
    return_features: also return intermediate activations (stem, each stage, head layers).

  Returns:
    logits [N, num_classes] (float32); plus, in 'calib' BN mode, the batch statistics in the
    layout of `variables['batch_stats']`; plus features when `return_features`.
  """
  if layout.masked != (masks is not None):
    raise ValueError("The supernet needs masks; a static subnet takes none.")
  if (dropout_rate > 0 or drop_connect_rate > 0) and key is None:
    raise ValueError("Dropout / drop-connect need a PRNG `key`.")
  params = variables["params"]
  stats = variables.get("batch_stats")
  if bn.kind in ("eval", "calib") and stats is None:
    raise ValueError(f"BN mode {bn.kind!r} needs variables['batch_stats'].")
  if resolution is not None and x.shape[1] != resolution:
    x = layers.bicubic_resize(x, resolution, resolution)   # PyTorch bicubic, SPEC §2.1
  feats, new_stats = {}, {}

  # Stem: 3x3 conv stride 2, BN, swish.
  h = layers.conv2d(x, params["first_conv"]["conv"]["kernel"], stride=2)
  h, st = _bn(h, params, stats, "first_conv", bn, None if masks is None else masks["stem"])
  new_stats["first_conv"] = {"bn": st}
  h = layers.swish(h)
  feats["first_conv"] = h

  dc_stages = {layout.num_stages - 1, layout.num_stages - 2}   # the last two stages only
  for j, lay in enumerate(layout.blocks):
    # Supernet blocks keep the supernet index; a static subnet's are renumbered over the active
    # blocks (SPEC §5.3).
    name = f"blocks_{lay.index if layout.masked else j}"
    m = None if masks is None else masks[name]
    rate = 0.0
    if lay.stage in dc_stages:
      rate = drop_connect_rate * lay.index / layout.num_supernet_blocks
    bkey = None if key is None else jax.random.fold_in(key, lay.index)
    bstats = None if stats is None else stats[name]
    run = lambda h, lay=lay, name=name, m=m, rate=rate, bkey=bkey, bstats=bstats: block_forward(
        lay, params[name], bstats, h, m, bn=bn, dw_impl=dw_impl, drop_connect_rate=rate,
        key=bkey)
    if m is not None and lay.index_in_stage > 0:
      # An inactive block is the identity. lax.cond skips its work on CPU/TPU (a select under
      # vmap); the first block of a stage always runs.
      skip_stats = {} if bn.kind != "calib" else _zero_block_stats(lay)
      skip = lambda h, skip_stats=skip_stats: (h, skip_stats)
      h, st = lax.cond(m["active"] > 0, run, skip, h)
    else:
      h, st = run(h)
    new_stats[name] = st
    feats[f"stage{lay.stage + 1}"] = h

  # Head (v3): final_expand 1x1 + BN + swish, global pool, feature_mix 1x1 (no BN, no bias)
  # + swish, dropout, classifier.
  head = params["last_conv"]
  h = layers.pointwise(h, head["final_expand_layer"]["conv"]["kernel"])
  h, st = layers.batch_norm(
      h, head["final_expand_layer"]["bn"],
      None if stats is None else stats["last_conv"]["final_expand_layer"]["bn"], bn,
      None if masks is None else masks["final_expand"])
  new_stats["last_conv"] = {"final_expand_layer": {"bn": st}}
  h = layers.swish(h)
  feats["final_expand_layer"] = h
  h = jnp.mean(h.astype(jnp.float32), axis=(1, 2))
  h = layers.swish(h @ head["feature_mix_layer"]["conv"]["kernel"][0, 0].astype(jnp.float32))
  if masks is not None:
    h = h * masks["feature_mix"]
  feats["feature_mix_layer"] = h
  if dropout_rate > 0:
    h = layers.dropout(h, dropout_rate, jax.random.fold_in(key, layout.num_supernet_blocks))
  logits = h @ params["classifier"]["kernel"] + params["classifier"]["bias"]

  out = (logits,)
  if bn.kind == "calib":
    out += (new_stats,)
  if return_features:
    out += (feats,)
  return out[0] if len(out) == 1 else out
