"""AlphaNet supernet training: the full original recipe on ImageNet (SPEC.md §6).

  python -m alphanet_jax.main --config configs/alphanet.py --workdir gs://BUCKET/alphanet
  python -m alphanet_jax.main --config configs/alphanet.py:kd=kl ...     # AttentiveNAS (KL)

Global batch 2048, 360 epochs (5 warm-up), SGD Nesterov 0.9, base LR 0.1 x 8 = 0.8 on the
warmup-cosine schedule, weight decay 1e-5 (not on BN or biases), gradient value clip 1.0,
dropout 0.2 and drop-connect 0.2 (max subnet, last two stages), the sandwich rule with 4
subnets and the adaptive alpha-divergence (-1, 1, 5), BN statistics per 32-image group.
Expected (AlphaNet paper / README, after calibration): A0 77.87%, A4 80.01% (444 MFLOPs),
A6 80.78% top-1 on ImageNet val. The original trained on 64 V100s; here any TPU slice whose
device count divides 2048 / 32 runs the same maths.
"""

from alphanet_jax import config_lib


def get_config(arg=None):
  args = dict(a.split("=", 1) for a in arg.split(",")) if arg else {}
  c = config_lib.base_config()
  c.kd_loss = args.pop("kd", "alpha")
  if args:
    raise ValueError(f"Unknown config arguments {sorted(args)}; known: kd=alpha|kl.")
  return c
