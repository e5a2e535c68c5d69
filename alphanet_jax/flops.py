"""Analytic MACs ("FLOPs") and parameter counts of subnets, as the original counts them (SPEC §9).

`count(space, cfg)` walks the *static* subnet that the original's `get_active_subnet` builds and
counts what its hook counter (`utils/flops_counter.count_net_flops_and_params`) counts:

* MACs: every conv (Cin * Cout * Hout * Wout * k * k / groups) and the classifier (in * out) that
  the forward pass runs; biases, BN, activations, pooling, residual adds, the SE multiply and the
  input resize are free. The SE convs run on a 1x1 map and count; a shortcut's 1x1 conv counts only
  when it runs (cin != cout).
* Params: every parameter of the static model (conv and linear weights, BN gamma/beta, biases),
  including the 1x1 conv that every static shortcut allocates even when it is an identity.

MACs are exact integers and equal the original's analytic `compute_active_subnet_flops`. The hook
counter sums per-module MACs in float32, so it is off by up to one float32 ulp of the total (1.3e-4
MFLOPs on the max subnet); summing `FlopsResult.layers` in float32 reproduces it exactly.

`supernet_params(space)` counts the max-shaped supernet instead (SPEC.md §5.2).

CLI:

  python -m alphanet_jax.flops a4
  python -m alphanet_jax.flops a5 --family attentivenas --json
  python -m alphanet_jax.flops min --config configs/tiny.py
  python -m alphanet_jax.flops path/to/subnet.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from alphanet_jax import space as space_lib
from alphanet_jax.space import SearchSpace, SubnetConfig

STEM_KERNEL = 3          # the stem is a 3x3 conv on RGB (SPEC.md §2.2)
STEM_IN_CHANNELS = 3
EXIT_OK = 0
EXIT_USAGE = 2           # bad command line, unknown subnet, out-of-space config


class LayerCount(NamedTuple):
  """One counted module of the static subnet (a NamedTuple: cheap to build ~100 times per call).

  Attributes:
    name: the static model's module path, e.g. `blocks.3.mobile_inverted_conv.depth_conv` (the
      state_dict prefix of SPEC.md §5.3), so a breakdown lines up with an exported checkpoint.
    macs: multiply-accumulates of one image.
    params: parameters of the module, its BN's gamma/beta included.
    out_size_px: output height (= width) in pixels; 1 for the SE convs and the pooled head.
    runs: False for the 1x1 conv of an identity shortcut (allocated, never executed).
  """
  name: str
  macs: int
  params: int
  out_size_px: int
  runs: bool = True


@dataclasses.dataclass(frozen=True)
class FlopsResult:
  """MACs and parameters of one subnet.

  Attributes:
    resolution: input resolution the MACs are counted at.
    macs: multiply-accumulates of one image (exact integer).
    mflops: `macs / 1e6`, the unit the papers and the original code call MFLOPs.
    params: every parameter of the static subnet, unused identity-shortcut convs included (the
      number the original prints).
    params_excluding_unused_shortcuts: `params` without those never-run convs.
    layers: per-module breakdown in forward order.
  """
  resolution: int
  macs: int
  mflops: float
  params: int
  params_excluding_unused_shortcuts: int
  layers: tuple[LayerCount, ...] = ()

  @property
  def mparams(self) -> float:
    """Millions of parameters (unused shortcut convs included)."""
    return self.params / 1e6

  def to_dict(self) -> dict[str, Any]:
    """Summary as plain JSON types (the breakdown is left out)."""
    return {"resolution": self.resolution, "mflops": self.mflops, "macs": self.macs,
            "params": self.params, "mparams": self.mparams,
            "params_excluding_unused_shortcuts": self.params_excluding_unused_shortcuts}


def conv_out_size(in_size_px: int, kernel: int, stride: int) -> int:
  """Output size of a conv with symmetric k//2 padding: ceil(in / stride) for odd kernels.

  This is also the shortcut avg-pool's size: it pads odd inputs by 1 and floors, so the residual
  add always matches the branch.
  """
  return (in_size_px + 2 * (kernel // 2) - kernel) // stride + 1


@functools.lru_cache(maxsize=32)
def _stage_plan(space: SearchSpace) -> tuple[tuple[int, bool], ...]:
  """(first-block stride, has SE) per stage, computed once per space.

  `count` is called thousands of times by the search; this keeps it from re-deriving anything of
  the space per call (`space.blocks` builds 37 BlockSpecs every time it is read).
  """
  return tuple((st.stride, st.se) for st in space.stages)


def count(space: SearchSpace, cfg: SubnetConfig | Mapping[str, Any]) -> FlopsResult:
  """Counts MACs and parameters of one subnet's static model.

  Args:
    space: the search space `cfg` belongs to (strides, SE placement, number of classes).
    cfg: the subnet, as a `SubnetConfig` or the original's dict.

  Returns:
    A `FlopsResult` with totals and a per-layer breakdown.

  Raises:
    ValueError: `cfg` lies outside `space`.
  """
  if not isinstance(cfg, SubnetConfig):
    cfg = SubnetConfig.from_dict(cfg)
  space.validate(cfg)
  layers: list[LayerCount] = []

  # Stem: 3x3 conv, stride 2, symmetric padding 1, then BN.
  size_px = conv_out_size(cfg.resolution, STEM_KERNEL, space.stem_stride)
  cin = cfg.width[0]
  layers.append(LayerCount(
      "first_conv", STEM_IN_CHANNELS * cin * STEM_KERNEL**2 * size_px**2,
      STEM_IN_CHANNELS * cin * STEM_KERNEL**2 + 2 * cin, size_px))

  j = 0  # static blocks are numbered over the active blocks only (SPEC.md §5.3)
  for (stride, has_se), cout, depth, k, e in zip(
      _stage_plan(space), cfg.width[1:8], cfg.depth, cfg.kernel_size, cfg.expand_ratio):
    for i in range(depth):
      prefix = f"blocks.{j}"
      conv = prefix + ".mobile_inverted_conv"
      in_size_px = size_px
      size_px = conv_out_size(in_size_px, k, stride if i == 0 else 1)
      mid = space_lib.mid_channels(cin, e)
      if e != 1:
        # The expand 1x1 conv runs at the input size: the block's stride sits in the depthwise.
        layers.append(LayerCount(conv + ".inverted_bottleneck", cin * mid * in_size_px**2,
                                 cin * mid + 2 * mid, in_size_px))
      layers.append(LayerCount(conv + ".depth_conv", mid * k * k * size_px**2,
                               mid * k * k + 2 * mid, size_px))
      if has_se:
        se = space_lib.se_channels(mid)
        # Both SE convs run on the pooled 1x1 map and carry biases.
        layers.append(LayerCount(conv + ".depth_conv.se.fc.reduce", mid * se, mid * se + se, 1))
        layers.append(LayerCount(conv + ".depth_conv.se.fc.expand", se * mid, se * mid + mid, 1))
      layers.append(LayerCount(conv + ".point_linear", mid * cout * size_px**2,
                               mid * cout + 2 * cout, size_px))
      # Every static block allocates a [cout, cin] shortcut conv; it runs only when widths differ.
      runs = cin != cout
      layers.append(LayerCount(prefix + ".shortcut", cin * cout * size_px**2 if runs else 0,
                               cin * cout, size_px, runs))
      cin = cout
      j += 1

  final_expand = space.head_expand_ratio * cfg.width[7]
  feature_mix = cfg.width[8]
  layers.append(LayerCount("last_conv.0", cin * final_expand * size_px**2,
                           cin * final_expand + 2 * final_expand, size_px))
  # feature_mix runs after global pooling and has neither BN nor bias.
  layers.append(LayerCount("last_conv.2", final_expand * feature_mix,
                           final_expand * feature_mix, 1))
  layers.append(LayerCount("classifier", feature_mix * space.num_classes,
                           feature_mix * space.num_classes + space.num_classes, 1))

  macs = sum(layer.macs for layer in layers)
  params = sum(layer.params for layer in layers)
  unused = sum(layer.params for layer in layers if not layer.runs)
  return FlopsResult(resolution=cfg.resolution, macs=macs, mflops=macs / 1e6, params=params,
                     params_excluding_unused_shortcuts=params - unused, layers=tuple(layers))


def supernet_params(space: SearchSpace) -> int:
  """Parameters of the max-shaped supernet (no running stats, no `bn_tracking` buffers).

  Every block is allocated at its maximum shape (SPEC.md §5.2): expand [max_mid, max_in] when the
  stage's max ratio != 1, depthwise [max_mid, max_kernel, max_kernel], SE at se_max, project
  [max_out, max_mid] and a shortcut conv [max_out, max_in] in all blocks, identity ones included.
  """
  stem = max(space.stem_widths)
  total = STEM_IN_CHANNELS * stem * STEM_KERNEL**2 + 2 * stem
  for b in space.blocks:
    if b.has_expand:
      total += b.max_in * b.max_mid + 2 * b.max_mid
    total += b.max_mid * b.max_kernel**2 + 2 * b.max_mid
    if b.se_max:
      total += 2 * b.max_mid * b.se_max + b.se_max + b.max_mid
    total += b.max_mid * b.max_out + 2 * b.max_out
    total += b.max_in * b.max_out
  last_in = max(space.stages[-1].widths)
  final_expand = space.max_final_expand
  feature_mix = max(space.last_widths)
  total += last_in * final_expand + 2 * final_expand
  total += final_expand * feature_mix
  total += feature_mix * space.num_classes + space.num_classes
  return total


# ------------------------------------------------------------------------------------------ CLI
def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="alphanet-flops",
      description="MFLOPs (millions of MACs) and parameters of a subnet's static model.")
  parser.add_argument("spec", help="a named subnet (a0..a6, a5_base/a5_1, min, max), an inline "
                      "JSON object or a path to a JSON file")
  parser.add_argument("--family", default="alphanet", choices=sorted(space_lib.FAMILIES),
                      help="which zoo a0..a6 come from (a5 differs; default: alphanet)")
  parser.add_argument("--config", default=None,
                      help="config file (path.py[:arg]) whose search space to use; "
                      "default: the AlphaNet space")
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  parser.add_argument("--layers", action="store_true", help="also print the per-layer breakdown")
  return parser


def _load_space(config_spec: str | None) -> SearchSpace:
  if config_spec is None:
    return space_lib.alphanet_space()
  from alphanet_jax import config_lib  # ml_collections only when a config file is named
  return config_lib.space_from_config(config_lib.load_config(config_spec))


def _load_cfg(spec: str, space: SearchSpace, family: str) -> SubnetConfig:
  # `load_subnet` reads files ending in .json; accept any existing file holding a JSON object too.
  if not spec.strip().endswith(".json") and os.path.isfile(spec):
    with open(spec) as f:
      spec = f.read()
  return space_lib.load_subnet(spec, space, family)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the CLI; returns the exit code (0 ok, 2 bad input); errors print without a traceback."""
  parser = _parser()
  try:
    args = parser.parse_args(argv)
  except SystemExit as e:  # argparse already printed usage or help
    return int(e.code or 0)
  try:
    space = _load_space(args.config)
    cfg = _load_cfg(args.spec, space, args.family)
    result = count(space, cfg)
  except (ValueError, TypeError, KeyError, OSError) as e:
    # JSONDecodeError is a ValueError; an unreadable file an OSError.
    print(f"{parser.prog}: error: {e}", file=sys.stderr)
    return EXIT_USAGE

  if args.json:
    out = {"spec": args.spec, **result.to_dict(), "config": cfg.to_dict()}
    if args.layers:
      out["layers"] = [layer._asdict() for layer in result.layers]
    print(json.dumps(out))
    return EXIT_OK
  print(f"{args.spec}: resolution {result.resolution}, {result.mflops:.3f} MFLOPs, "
        f"{result.mparams:.4f} M params "
        f"({result.params_excluding_unused_shortcuts / 1e6:.4f} M without unused shortcut convs)")
  if args.layers:
    for layer in result.layers:
      note = "" if layer.runs else "  (never runs)"
      print(f"  {layer.name:<50} {layer.out_size_px:>4}px {layer.macs:>12,d} MACs "
            f"{layer.params:>10,d} params{note}")
  return EXIT_OK


if __name__ == "__main__":
  sys.exit(main())
