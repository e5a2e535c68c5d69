"""SubnetConfig -> fixed-shape mask arrays: the only way a subnet reaches the supernet.

Every array has a shape fixed by the search space (the supernet's max shapes), so one compiled
program serves every subnet of a resolution; only the values change. Resolution is the one
choice that changes shapes and is passed to the model separately, as a static argument.

Layout (numpy float32 unless noted; `b` over all supernet blocks):

  stem            [C0max]          1 for the first width[0] channels
  blocks_{b}
    active        ()               1 if the block runs (index in stage < depth)
    mid           [max_mid]        expand/depthwise channels: first mid_channels(cin, e)
    out           [max_out]        output channels: first cout
    kernel        [Kmax, Kmax]     1 inside the centred k x k window (k=3 of 5: the ring is 0)
    kernel_size   () int32         k itself, for implementations that run only the k*k taps
    se            [se_max]         SE hidden channels (SE stages only)
    shortcut_conv ()               1 if the shortcut is a conv (only blocks whose kind is 'maybe')
  final_expand    [6*C7max]
  feature_mix     [CLmax]

Masks of many subnets stack along a leading axis (`stack`) for vmapped evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from alphanet_jax import space as space_lib


def _prefix(n: int, size: int) -> np.ndarray:
  if n > size:
    raise ValueError(f"Width {n} exceeds the supernet's allocated {size} channels.")
  m = np.zeros((size,), np.float32)
  m[:n] = 1.0
  return m


def _kernel_window(k: int, kmax: int) -> np.ndarray:
  m = np.zeros((kmax, kmax), np.float32)
  c = (kmax - k) // 2  # the centre crop, as the original's k=3 slice [1:4, 1:4] of a 5x5
  m[c:c + k, c:c + k] = 1.0
  return m


def block_widths(space: space_lib.SearchSpace, cfg: space_lib.SubnetConfig, spec):
  """(cin, mid, cout, se, k) of one block under `cfg`; the block need not be active."""
  s, i = spec.stage, spec.index_in_stage
  cin = cfg.width[s] if i == 0 else cfg.width[s + 1]   # width[0] is the stem
  cout = cfg.width[s + 1]
  mid = space_lib.mid_channels(cin, cfg.expand_ratio[s])
  se = space_lib.se_channels(mid) if spec.se_max else 0
  return cin, mid, cout, se, cfg.kernel_size[s]


def subnet_masks(space: space_lib.SearchSpace, cfg: space_lib.SubnetConfig) -> dict:
  """The mask pytree of one subnet (see the module docstring)."""
  space.validate(cfg)
  masks: dict = {"stem": _prefix(cfg.width[0], max(space.stem_widths))}
  for spec in space.blocks:
    cin, mid, cout, se, k = block_widths(space, cfg, spec)
    m = {
        "active": np.float32(spec.index_in_stage < cfg.depth[spec.stage]),
        "mid": _prefix(mid, spec.max_mid),
        "out": _prefix(cout, spec.max_out),
        "kernel": _kernel_window(k, spec.max_kernel),
        "kernel_size": np.int32(k),
    }
    if spec.se_max:
      m["se"] = _prefix(se, spec.se_max)
    if spec.shortcut == "maybe":
      m["shortcut_conv"] = np.float32(cin != cout)
    masks[f"blocks_{spec.index}"] = m
  c7 = cfg.width[7]
  masks["final_expand"] = _prefix(space.head_expand_ratio * c7, space.max_final_expand)
  masks["feature_mix"] = _prefix(cfg.width[8], max(space.last_widths))
  return masks


def stack(masks: Sequence[dict]) -> dict:
  """Stacks the mask pytrees of several subnets along a new leading axis."""
  import jax  # local: keep this module importable without initialising a backend
  return jax.tree.map(lambda *xs: np.stack(xs), *masks)
