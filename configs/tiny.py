"""Tiny offline demo: the AlphaNet engine on scikit-learn's handwritten digits, on a laptop CPU.

  python -m alphanet_jax.main --config configs/tiny.py --workdir runs/tiny

Same 7-stage structure as AlphaNet with small widths and depths. Digits are 8x8 grey images,
stored upsampled to 32x32 RGB; the model resizes them in-model to the subnet's resolution
(24 or 32), exactly as the full model resizes 224 crops to 192-288.
"""

import ml_collections

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
  config = ml_collections.ConfigDict()
  config.space = TINY_SUPERNET_CONFIG
  config.num_classes = 10
  config.image_size = IMAGE_SIZE
  config.dataset = "alphanet_digits"
  return config
