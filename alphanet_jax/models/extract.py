"""Static subnet extraction: slice the max-shaped supernet variables down to one subnet.

This is the JAX side of the original `get_active_subnet(preserve_weight=True)` (SPEC.md §2.6,
§5.3): every tensor keeps its first-k channels, the depthwise kernels are centre-cropped to the
subnet's kernel size, and each stage keeps the first `depth` blocks of its group, renumbered
`blocks_0, blocks_1, ...` over the active blocks only.

Both trees use the agreed variable layout (NHWC / HWIO, plain nested dicts):

  first_conv: {conv: {kernel}, bn}
  blocks_{n}: {inverted_bottleneck: {conv, bn}?  (supernet: stage max ratio != 1;
                                                   static: block ratio != 1)
               depth_conv: {conv, bn, se: {reduce: {kernel, bias}, expand: {kernel, bias}}?}
               point_linear: {conv, bn}
               shortcut: {conv: {kernel}}}    (always present, used or not)
  last_conv: {final_expand_layer: {conv, bn}, feature_mix_layer: {conv}}
  classifier: {kernel, bias}

with BN `{scale, bias}` under `params` and `{mean, var}` under `batch_stats`.

Slicing uses only static Python ints (the subnet config is static), so `extract_subnet` works on
numpy arrays, on jax arrays, and inside `jax.jit` (bind `space` and `cfg` with
`functools.partial`). This module imports neither jax nor torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from alphanet_jax import space as space_lib


@dataclasses.dataclass(frozen=True)
class StaticBlock:
  """Shapes of one active block of a subnet.

  Attributes:
    j: index in the static subnet (0.. over active blocks, stage order).
    b: index of the supernet block it comes from (`block_group_info[stage][i]`).
    stage: 0..6 (mb1..mb7).
    stride: the block's stride (stage stride for the first block of a stage, else 1).
    cin, mid, cout: input, hidden and output widths.
    se: squeeze-excite hidden width (0 when the stage has no SE).
    kernel: depthwise kernel size.
    has_expand: whether the block has an `inverted_bottleneck` (expand ratio != 1).
  """
  j: int
  b: int
  stage: int
  stride: int
  cin: int
  mid: int
  cout: int
  se: int
  kernel: int
  has_expand: bool

  @property
  def identity_shortcut(self) -> bool:
    """SPEC §2.4: identity iff cin == cout and stride 1; else avg-pool and/or 1x1 conv."""
    return self.cin == self.cout and self.stride == 1


def static_blocks(space: space_lib.SearchSpace,
                  cfg: space_lib.SubnetConfig) -> list[StaticBlock]:
  """The active blocks of `cfg`, in stage order, with their real shapes.

  Args:
    space: the search space (gives the block groups and per-stage strides / SE flags).
    cfg: the subnet; it is validated against `space` first.

  Returns:
    One `StaticBlock` per active block.
  """
  space.validate(cfg)
  groups = space.block_group_info
  out = []
  cin = cfg.width[0]  # the stem's width feeds mb1
  for s, stage in enumerate(space.stages):
    cout = cfg.width[s + 1]
    ratio = cfg.expand_ratio[s]
    for i in range(cfg.depth[s]):
      # The first d blocks of the group run (SPEC §2.6); cin is the real width of the
      # incoming tensor, never set explicitly (SPEC §2.3).
      has_expand = ratio != 1
      # Without an expand layer the depthwise conv runs on cin channels (SPEC §2.3 item 2).
      mid = space_lib.mid_channels(cin, ratio) if has_expand else cin
      out.append(StaticBlock(
          j=len(out), b=groups[s][i], stage=s, stride=stage.stride if i == 0 else 1,
          cin=cin, mid=mid, cout=cout, se=space_lib.se_channels(mid) if stage.se else 0,
          kernel=cfg.kernel_size[s], has_expand=has_expand))
      cin = cout
  return out


def static_block_map(space: space_lib.SearchSpace,
                     cfg: space_lib.SubnetConfig) -> list[tuple[int, int]]:
  """(static j, supernet b) pairs; AlphaNet-A0: (0,0) (1,2) (2,3) (3,4) (4,7) ... (SPEC §5.3)."""
  return [(blk.j, blk.b) for blk in static_blocks(space, cfg)]


def _center(kernel_max: int, k: int) -> slice:
  # The active k x k kernel is the centre of the stored max kernel, W[c:c+k] with
  # c = (Kmax - k) // 2: [1:4] for 3 of 5 (SPEC §2.3 item 3; no kernel transform).
  c = (kernel_max - k) // 2
  return slice(c, c + k)


def _bn(params: Mapping[str, Any], stats: Mapping[str, Any], c: int):
  return ({"scale": params["scale"][:c], "bias": params["bias"][:c]},
          {"mean": stats["mean"][:c], "var": stats["var"][:c]})


def _conv_bn(params: Mapping[str, Any], stats: Mapping[str, Any], cin: int, cout: int):
  """A 1x1 (or full) conv [kh, kw, I, O] sliced to [:, :, :cin, :cout], plus its BN."""
  bn_p, bn_s = _bn(params["bn"], stats["bn"], cout)
  return ({"conv": {"kernel": params["conv"]["kernel"][:, :, :cin, :cout]}, "bn": bn_p},
          {"bn": bn_s})


def extract_subnet(space: space_lib.SearchSpace, cfg: space_lib.SubnetConfig,
                   variables: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  """Slices max-shaped supernet variables to the static subnet `cfg` (SPEC §2.6, §5.3).

  Args:
    space: the search space the supernet was built for.
    cfg: the subnet to extract.
    variables: `{'params': ..., 'batch_stats': ...}` of the supernet, numpy or jax arrays.

  Returns:
    `{'params': ..., 'batch_stats': ...}` of the static subnet at its real shapes, with blocks
    renumbered `blocks_{j}` over the active blocks. Leaves are slices (views for numpy) of
    the inputs; nothing is copied or cast.
  """
  if "params" not in variables or "batch_stats" not in variables:
    raise KeyError(f"extract_subnet needs {{'params', 'batch_stats'}}, got {sorted(variables)}.")
  p, s = variables["params"], variables["batch_stats"]
  blocks = static_blocks(space, cfg)
  specs = space.blocks
  c0 = cfg.width[0]
  out_p: dict[str, Any] = {}
  out_s: dict[str, Any] = {}

  # Stem: W[:c0, :3] in PyTorch terms, [:, :, :, :c0] in HWIO (SPEC §2.2).
  out_p["first_conv"], out_s["first_conv"] = _conv_bn(p["first_conv"], s["first_conv"], 3, c0)

  for blk in blocks:
    bp, bs = p[f"blocks_{blk.b}"], s[f"blocks_{blk.b}"]
    kmax = specs[blk.b].max_kernel
    qp: dict[str, Any] = {}
    qs: dict[str, Any] = {}
    if blk.has_expand:
      qp["inverted_bottleneck"], qs["inverted_bottleneck"] = _conv_bn(
          bp["inverted_bottleneck"], bs["inverted_bottleneck"], blk.cin, blk.mid)
    dw_p, dw_s = bp["depth_conv"], bs["depth_conv"]
    ck = _center(kmax, blk.kernel)
    bn_p, bn_s = _bn(dw_p["bn"], dw_s["bn"], blk.mid)
    # Depthwise [K, K, 1, C]: first mid channels, centre k x k taps.
    qp["depth_conv"] = {"conv": {"kernel": dw_p["conv"]["kernel"][ck, ck, :, :blk.mid]},
                        "bn": bn_p}
    qs["depth_conv"] = {"bn": bn_s}
    if blk.se:
      # SE reduce W[:se, :mid] + b[:se]; expand W[:mid, :se] + b[:mid] (SPEC §2.6).
      se = dw_p["se"]
      qp["depth_conv"]["se"] = {
          "reduce": {"kernel": se["reduce"]["kernel"][:, :, :blk.mid, :blk.se],
                     "bias": se["reduce"]["bias"][:blk.se]},
          "expand": {"kernel": se["expand"]["kernel"][:, :, :blk.se, :blk.mid],
                     "bias": se["expand"]["bias"][:blk.mid]}}
    qp["point_linear"], qs["point_linear"] = _conv_bn(
        bp["point_linear"], bs["point_linear"], blk.mid, blk.cout)
    # The static block keeps its shortcut conv [cout, cin] even when it is an identity and
    # never runs (SPEC §5.3).
    shortcut = bp["shortcut"]["conv"]["kernel"]
    qp["shortcut"] = {"conv": {"kernel": shortcut[:, :, :blk.cin, :blk.cout]}}
    out_p[f"blocks_{blk.j}"], out_s[f"blocks_{blk.j}"] = qp, qs

  # Head (SPEC §2.5): final_expand W[:6c7, :c7] + BN; feature_mix W[:cL, :6c7]; linear W[:, :cL].
  c7, cl = cfg.width[7], cfg.width[8]
  fe = space.head_expand_ratio * c7
  lp, ls = p["last_conv"], s["last_conv"]
  fe_p, fe_s = _conv_bn(lp["final_expand_layer"], ls["final_expand_layer"], c7, fe)
  out_p["last_conv"] = {
      "final_expand_layer": fe_p,
      "feature_mix_layer": {
          "conv": {"kernel": lp["feature_mix_layer"]["conv"]["kernel"][:, :, :fe, :cl]}}}
  out_s["last_conv"] = {"final_expand_layer": fe_s}
  out_p["classifier"] = {"kernel": p["classifier"]["kernel"][:cl, :],
                         "bias": p["classifier"]["bias"]}
  return {"params": out_p, "batch_stats": out_s}
