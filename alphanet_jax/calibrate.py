"""BatchNorm recalibration (SPEC.md §3).

Before a subnet is evaluated its running statistics are rebuilt from training batches: reset,
then the cumulative average over N batches of each BN's batch mean and *unbiased* batch variance
(PyTorch's momentum=None), with each batch normalised by its own statistics on the way. The first
batch overwrites the reset values, so the reset itself needs no code.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax

from alphanet_jax import models


def calibrate_bn(layout: models.NetLayout, variables: dict, batches: Iterable, masks=None, *,
                 resolution: int | None = None, dw_impl: str = "auto") -> dict:
  """Returns `variables` with batch_stats recalibrated on `batches` (NHWC image arrays).

  Works for the masked supernet (pass the subnet's `masks`; statistics of inactive blocks and
  channels come out as zeros, which the masks ignore) and for static subnets (masks None).
  """
  running, n = None, 0
  for x in batches:
    _, stats = models.forward_jit(layout, variables, x, masks, resolution=resolution,
                                  bn=models.BNMode("calib"), dw_impl=dw_impl)
    n += 1
    factor = 1.0 / n   # PyTorch's cumulative moving average: (1 - 1/n) * running + 1/n * batch
    running = stats if running is None else jax.tree.map(
        lambda r, s: (1.0 - factor) * r + factor * s, running, stats)
  if running is None:
    raise ValueError("BN calibration needs at least one batch.")
  return {"params": variables["params"], "batch_stats": running}
