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


STAGES = ("train", "evaluate", "search", "export")


def base_config() -> ml_collections.ConfigDict:
  """Every config field with the original recipe's defaults (SPEC.md §6); configs override."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Model / search space.
  c.space = "alphanet"            # or a supernet_config dict (configs/tiny.py)
  c.num_classes = 1000
  c.dw_impl = "auto"              # depthwise conv: 'auto' (shift on CPU, native else)
  c.compute_dtype = "float32"     # 'bfloat16' activations on TPU
  # Data.
  c.dataset = "imagenet2012"      # a TFDS name, or 'synthetic'
  c.data_dir = ml_collections.config_dict.placeholder(str)
  c.image_size = 224
  # Optimisation (SPEC §6.1): global batch, epochs, SGD Nesterov, warmup-cosine.
  c.batch_size = 2048
  c.epochs = 360
  c.warmup_epochs = 5
  c.total_steps = 0               # > 0 overrides epochs
  c.base_lr = 0.1                 # scaled by max(1, batch_size // 256)
  c.warmup_factor = 0.001
  c.momentum = 0.9
  c.nesterov = True
  c.weight_decay = 1e-5
  c.grad_clip_value = 1.0
  # Sandwich rule and distillation.
  c.num_arch_training = 4
  c.sampler = "uniform"
  c.kd_loss = "alpha"             # 'alpha' (AlphaNet) or 'kl' (AttentiveNAS)
  c.alpha_min = -1.0
  c.alpha_max = 1.0
  c.iw_clip = 5.0
  c.label_smoothing = 0.1
  c.dropout = 0.2
  c.drop_connect = 0.2
  c.bn_group_size = 32            # the original's per-GPU batch; 0 = whole global batch
  # Bookkeeping.
  c.init_from = ""                # orbax dir, training workdir or PyTorch .pth[.tar]
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.log_every_steps = 50
  c.stages = ("train",)
  return c


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Clear errors for settings that cannot work, before anything expensive starts."""
  def need(cond, msg):
    if not cond:
      raise ValueError(f"Bad config: {msg}")
  unknown = [s for s in config.stages if s not in STAGES]
  need(not unknown, f"unknown stages {unknown}; choose from {list(STAGES)}.")
  need(config.batch_size > 0, f"batch_size must be > 0, got {config.batch_size}.")
  g = config.bn_group_size
  need(g >= 0, f"bn_group_size must be >= 0, got {g}.")
  need(g == 0 or config.batch_size < g or config.batch_size % g == 0,
       f"batch_size {config.batch_size} is not divisible by bn_group_size {g}.")
  need(config.num_arch_training >= 2, "num_arch_training must be >= 2 (max and min subnets).")
  need(config.kd_loss in ("alpha", "kl"), f"kd_loss must be 'alpha' or 'kl', got "
       f"{config.kd_loss!r}.")
  need(config.epochs > 0 or config.total_steps > 0, "set epochs or total_steps > 0.")
  need(config.log_every_steps > 0 and config.checkpoint_every_steps > 0,
       "log_every_steps and checkpoint_every_steps must be > 0.")
