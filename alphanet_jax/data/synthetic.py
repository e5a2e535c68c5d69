"""Synthetic input for tests and benchmarks: the global batch of a step is a pure function of
(seed, step), and each host takes its rows of it, so a run gives the same batches on any number
of hosts and after a resume."""

from __future__ import annotations

import numpy as np


def synthetic_iterator(*, seed: int, start_step: int, global_batch_size: int, image_size: int,
                       num_classes: int, process_index: int = 0, process_count: int = 1):
  if global_batch_size % process_count:
    raise ValueError(f"Global batch {global_batch_size} does not split over {process_count} "
                     "hosts.")
  local = global_batch_size // process_count
  rows = slice(process_index * local, (process_index + 1) * local)
  step = start_step
  while True:
    rng = np.random.default_rng([int(seed), int(step), 7])
    images = rng.standard_normal((global_batch_size, image_size, image_size, 3), np.float32)
    labels = rng.integers(0, num_classes, (global_batch_size,), dtype=np.int32)
    yield {"image": images[rows], "label": labels[rows]}
    step += 1
