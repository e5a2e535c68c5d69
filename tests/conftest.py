"""Test session set-up: 8 fake CPU devices, float32 'highest' precision, a shared compile cache."""

import os
import pathlib

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402  (after the environment above)
import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CACHE_DIR = os.environ.get("ALPHANET_JAX_CACHE",
                           str(pathlib.Path.home() / ".cache" / "alphanet_jax" / "jax_cache"))
jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
jax.config.update("jax_default_matmul_precision", "highest")


def reference_dir() -> pathlib.Path:
  """../shared/reference beside the repository, or $ALPHANET_REFERENCE_DIR."""
  env = os.environ.get("ALPHANET_REFERENCE_DIR")
  path = pathlib.Path(env) if env else REPO_ROOT.parent / "shared" / "reference"
  if not (path / "README.md").is_file():
    raise RuntimeError(f"Reference vectors not found at {path}; put the shared/ folder beside "
                       "the repository or set ALPHANET_REFERENCE_DIR.")
  return path


@pytest.fixture(scope="session")
def ref_dir() -> pathlib.Path:
  return reference_dir()


@pytest.fixture(scope="session")
def tiny_config():
  from alphanet_jax import config_lib
  return config_lib.load_config(str(REPO_ROOT / "configs" / "tiny.py"))


@pytest.fixture(scope="session")
def tiny_space(tiny_config):
  from alphanet_jax import config_lib
  return config_lib.space_from_config(tiny_config)
