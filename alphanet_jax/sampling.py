"""Subnet samplers for the sandwich rule.

A sampler returns the subnets of one step, [max, random..., min], from a generator seeded by
(seed, step): every host draws the same subnets, and a resumed run draws exactly what an
uninterrupted run would. The attentive samplers (AttentiveNAS BestUp/WorstUp) implement the same
interface and may use a `score_fn` that evaluates candidates on the current batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from alphanet_jax import space as space_lib


def step_rng(seed: int, step: int, stream: int = 0) -> np.random.Generator:
  """A generator that depends only on (seed, step, stream)."""
  return np.random.default_rng([int(seed), int(step), int(stream)])


class Sampler(Protocol):
  def subnets(self, step: int, score_fn: Callable | None = None
              ) -> list[space_lib.SubnetConfig]:
    ...


class UniformSampler:
  """AlphaNet's sampler: the random students are independent uniform draws (SPEC §6.3)."""

  def __init__(self, space: space_lib.SearchSpace, seed: int, num_arch_training: int = 4):
    if num_arch_training < 2:
      raise ValueError(f"num_arch_training must be >= 2 (max and min), got {num_arch_training}.")
    self.space = space
    self.seed = seed
    self.num_random = num_arch_training - 2
    self._max, self._min = space.max_subnet(), space.min_subnet()

  def subnets(self, step: int, score_fn=None) -> list[space_lib.SubnetConfig]:
    del score_fn
    rng = step_rng(self.seed, step)
    return [self._max] + [self.space.sample(rng) for _ in range(self.num_random)] + [self._min]


def make_sampler(name: str, space: space_lib.SearchSpace, seed: int, num_arch_training: int,
                 **kwargs) -> Sampler:
  if name == "uniform":
    return UniformSampler(space, seed, num_arch_training)
  samplers: Sequence[str] = ("uniform",)
  raise ValueError(f"Unknown sampler {name!r}; available: {list(samplers)}.")
