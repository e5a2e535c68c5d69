"""Process-level JAX set-up shared by the entry points (main, parity, benchmark, converters)."""

from __future__ import annotations

import os
import pathlib

DEFAULT_CACHE_DIR = pathlib.Path.home() / ".cache" / "alphanet_jax" / "jax_cache"


def enable_compilation_cache(cache_dir: str | os.PathLike | None = None) -> str:
  """Turns on JAX's persistent compilation cache (restarts and tests skip recompiling).

  The directory is `cache_dir`, else $ALPHANET_JAX_CACHE, else ~/.cache/alphanet_jax/jax_cache;
  '' disables it.
  """
  import jax
  if cache_dir is None:
    cache_dir = os.environ.get("ALPHANET_JAX_CACHE", str(DEFAULT_CACHE_DIR))
  cache_dir = str(cache_dir)
  if cache_dir:
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  return cache_dir


def setup_for_parity() -> None:
  """float32 maths at 'highest' matmul/conv precision, as the reference tolerances assume."""
  import jax
  enable_compilation_cache()
  jax.config.update("jax_default_matmul_precision", "highest")
