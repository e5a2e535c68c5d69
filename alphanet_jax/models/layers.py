"""Pure layer functions shared by the masked supernet and the static subnet.

Activations are NHWC, kernels HWIO. Masks multiply *after* every BatchNorm (BN adds its bias to
channels that are zero), folded into the BN's scale and shift so they cost nothing extra.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from alphanet_jax.models.depthwise import depthwise_conv  # noqa: F401  (re-exported)
from alphanet_jax.models.resize import bicubic_resize  # noqa: F401  (re-exported)

BN_EPS = 1e-5  # SPEC §3: every BN has eps 1e-5


@dataclasses.dataclass(frozen=True)
class BNMode:
  """How BatchNorm normalises.

  kind: 'train' (batch statistics over groups of `group_size` images, biased variance; running
    statistics untouched, as the original's momentum 0), 'eval' (running statistics), or 'calib'
    (statistics of the whole batch, and the batch mean and *unbiased* variance are returned so a
    caller can average them into running statistics, as the original's recalibration).
  group_size: images per BN group in 'train'; 0 or >= batch means the whole batch.
  """
  kind: str = "train"
  group_size: int = 0
  eps: float = BN_EPS

  def __post_init__(self):
    if self.kind not in ("train", "eval", "calib"):
      raise ValueError(f"BN mode must be 'train', 'eval' or 'calib', got {self.kind!r}.")


def swish(x):
  return x * jax.nn.sigmoid(x)


def hard_sigmoid(x):
  return jnp.clip(x + 3.0, 0.0, 6.0) / 6.0   # relu6(x + 3) / 6, the original's Hsigmoid


def conv2d(x, kernel, stride: int = 1):
  """Dense conv with explicit symmetric k//2 padding (SPEC §2.3; 'SAME' differs at stride 2)."""
  p = kernel.shape[0] // 2
  return lax.conv_general_dilated(
      x, kernel.astype(x.dtype), (stride, stride), ((p, p), (p, p)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def pointwise(x, kernel):
  """1x1 conv with a [1, 1, in, out] kernel, as a matmul over the channel axis."""
  return jnp.einsum("nhwi,io->nhwo", x, kernel[0, 0].astype(x.dtype))


def avg_pool2(x):
  """The shortcut's avg-pool (kernel = stride = 2): padding 0 for even sizes, 1 for odd sizes,
  pads counted in the average and sizes floored (PyTorch avg_pool2d defaults, SPEC §2.4)."""
  n, h, w, c = x.shape
  pad = 0 if w % 2 == 0 else 1   # the original looks at the width only
  oh, ow = (h + 2 * pad - 2) // 2 + 1, (w + 2 * pad - 2) // 2 + 1
  if pad:
    x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  x = x[:, :2 * oh, :2 * ow]
  # A reshape-and-sum: cheaper than reduce_window on CPU and differentiable everywhere.
  return x.reshape(n, oh, 2, ow, 2, c).sum(axis=(2, 4)) / 4.0


def _moments(x, axes):
  """Mean and biased variance in float32, two-pass (more accurate than E[x^2] - E[x]^2)."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=axes, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=axes, keepdims=True)
  return mean, var


def batch_norm(x, params: dict, stats: dict | None, mode: BNMode, mask=None):
  """BatchNorm over NHWC `x`; returns (y, batch statistics or None).

  The returned statistics (only in 'calib' mode) are {'mean', 'var'} with the unbiased variance
  m/(m-1) * biased, m = B*H*W, which is what the original's cumulative-average recalibration
  accumulates.
  """
  scale, bias = params["scale"].astype(jnp.float32), params["bias"].astype(jnp.float32)
  if mask is not None:
    scale, bias = scale * mask, bias * mask
  out_stats = None
  if mode.kind == "eval":
    inv = lax.rsqrt(stats["var"].astype(jnp.float32) + mode.eps) * scale
    y = (x.astype(jnp.float32) - stats["mean"].astype(jnp.float32)) * inv + bias
    return y.astype(x.dtype), None
  n = x.shape[0]
  if mode.kind == "train" and 0 < mode.group_size < n:
    if n % mode.group_size:
      raise ValueError(f"Batch {n} is not divisible by bn_group_size {mode.group_size}.")
    groups = n // mode.group_size
  else:
    groups = 1
  xg = x.reshape((groups, n // groups) + x.shape[1:])
  mean, var = _moments(xg, axes=(1, 2, 3))
  inv = lax.rsqrt(var + mode.eps) * scale
  y = ((xg.astype(jnp.float32) - mean) * inv + bias).reshape(x.shape).astype(x.dtype)
  if mode.kind == "calib":
    m = n * x.shape[1] * x.shape[2]
    out_stats = {"mean": mean.reshape(-1), "var": var.reshape(-1) * (m / max(m - 1, 1))}
  return y, out_stats


def squeeze_excite(x, params: dict, mask=None):
  """SE inside the depthwise layer: mean over space, 1x1 reduce + ReLU, 1x1 expand, hard-sigmoid
  gate. Both 1x1 convs have biases (SPEC §2.3); `mask` zeroes inactive hidden channels, whose
  ReLU(bias) would otherwise leak into the expand conv."""
  g = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
  h = jax.nn.relu(g @ params["reduce"]["kernel"][0, 0] + params["reduce"]["bias"])
  if mask is not None:
    h = h * mask
  s = h @ params["expand"]["kernel"][0, 0] + params["expand"]["bias"]
  return x * hard_sigmoid(s)[:, None, None, :].astype(x.dtype)


def drop_connect(x, rate: float, key):
  """Per-sample branch drop: m = floor(keep + U[0,1)), x * m / keep (SPEC §2.4)."""
  keep = 1.0 - rate
  u = jax.random.uniform(key, (x.shape[0], 1, 1, 1), jnp.float32)
  return x * (jnp.floor(keep + u) / keep).astype(x.dtype)


def dropout(x, rate: float, key):
  keep = 1.0 - rate
  m = jax.random.bernoulli(key, keep, x.shape)
  return jnp.where(m, x / keep, 0.0).astype(x.dtype)


Params = dict[str, Any]
