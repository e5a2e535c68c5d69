"""Tiny offline demo: the AlphaNet engine on scikit-learn's handwritten digits, on a laptop CPU.

  python -m alphanet_jax.main --config configs/tiny.py --workdir runs/tiny

Same 7-stage structure as AlphaNet with small widths and depths. Digits are 8x8 grey images,
stored upsampled to 32x32 RGB; the model resizes them in-model to the subnet's resolution
(24 or 32), exactly as the full model resizes 224 crops to 192-288.
"""

from alphanet_jax import config_lib

# Same layout as the original supernet_config. Widths are multiples of 8; expand ratios of a
# stage are all 1 (mb1) or all > 1.
TINY_SUPERNET_CONFIG = {
    "resolutions": [24, 32],
    "first_conv": {"c": [8, 16], "s": 2},
    "mb1": {"c": [8, 16], "d": [1, 2], "k": [3, 5], "t": [1], "s": 1, "se": False},
    "mb2": {"c": [16, 24], "d": [1, 2], "k": [3, 5], "t": [3, 4], "s": 2, "se": False},
    "mb3": {"c": [24, 32], "d": [1, 2], "k": [3, 5], "t": [3, 4], "s": 2, "se": True},
    "mb4": {"c": [32, 40], "d": [1, 2], "k": [3, 5], "t": [3, 4], "s": 2, "se": False},
    "mb5": {"c": [40, 48], "d": [1, 2], "k": [3, 5], "t": [3, 4], "s": 1, "se": True},
    "mb6": {"c": [48, 56], "d": [1, 2], "k": [3, 5], "t": [4], "s": 2, "se": True},
    "mb7": {"c": [56, 64], "d": [1, 2], "k": [3, 5], "t": [4], "s": 1, "se": True},
    "last_conv": {"c": [128, 192]},
}
IMAGE_SIZE = 32


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  with c.ignore_type():   # the base config names a space; this one defines its own
    c.space = TINY_SUPERNET_CONFIG
  c.num_classes = 10
  c.image_size = IMAGE_SIZE
  c.dataset = "alphanet_digits"
  # 1438 training digits: 22 steps per epoch at batch 64 (divisible by 8 devices x group 8).
  c.batch_size = 64
  c.bn_group_size = 8
  c.epochs = 30
  c.warmup_epochs = 1
  c.base_lr = 0.1
  c.dropout = 0.1
  c.drop_connect = 0.1
  c.checkpoint_every_steps = 200
  c.log_every_steps = 20
  c.stages = ("train",)
  return c
