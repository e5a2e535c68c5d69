"""Loading `configs/*.py` files (ml_collections `get_config(arg)`) and the space they name."""

from __future__ import annotations

import importlib.util
import pathlib

import ml_collections

from alphanet_jax import space as space_lib


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:arg]` the way ml_collections' config_flags does."""
  path, _, arg = spec.partition(":")
  file = pathlib.Path(path)
  if not file.is_file():
    raise FileNotFoundError(f"Config file {path!r} does not exist.")
  module_spec = importlib.util.spec_from_file_location(f"_alphanet_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"Config file {path!r} defines no get_config().")
  return module.get_config(arg) if arg else module.get_config()


def space_from_config(config: ml_collections.ConfigDict) -> space_lib.SearchSpace:
  """`config.space` is 'alphanet' or a supernet_config mapping; `config.num_classes` its head."""
  num_classes = int(config.get("num_classes", 1000))
  space = config.get("space", "alphanet")
  if isinstance(space, str):
    if space != "alphanet":
      raise ValueError(f"Unknown search space {space!r}: use 'alphanet' or a supernet_config dict.")
    return space_lib.alphanet_space(num_classes)
  if isinstance(space, ml_collections.ConfigDict):
    space = space.to_dict()
  return space_lib.SearchSpace.from_supernet_config(space, num_classes)
