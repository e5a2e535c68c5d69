"""Synthetic input for tests and benchmarks: images and labels that are a pure function of
(seed, step, process), so resumed runs and multi-host runs see well-defined batches."""

from __future__ import annotations

import numpy as np


def synthetic_iterator(*, seed: int, start_step: int, local_batch_size: int, image_size: int,
                       num_classes: int, process_index: int = 0):
  step = start_step
  while True:
    rng = np.random.default_rng([int(seed), int(step), int(process_index), 7])
    images = rng.standard_normal((local_batch_size, image_size, image_size, 3), np.float32)
    labels = rng.integers(0, num_classes, (local_batch_size,), dtype=np.int32)
    yield {"image": images, "label": labels}
    step += 1
