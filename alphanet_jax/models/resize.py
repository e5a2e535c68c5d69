"""PyTorch-exact bicubic resize (``F.interpolate(mode='bicubic', align_corners=False)``).

The model resizes its already-normalised input to the active resolution (SPEC 2.1). PyTorch's kernel
uses A = -0.75, never antialiases (not even when downsampling), replicates the border by clamping tap
indices and does not clamp the output. ``jax.image.resize(..., 'bicubic')`` uses a = -0.5 and
antialiases when downsampling, so it gives different numbers.

The resize is separable and the sizes are static, so it is two small matrix products with (out, in)
interpolation matrices built in numpy at trace time.
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

# PyTorch's cubic convolution constant (aten/src/ATen/native/UpSample.h); Keys' a = -0.5 elsewhere.
_A = np.float32(-0.75)


def _cubic_near(u: np.ndarray) -> np.ndarray:
  """Weight of a tap at distance u in [0, 1]: ((A+2)u - (A+3))u^2 + 1."""
  return ((_A + np.float32(2)) * u - (_A + np.float32(3))) * u * u + np.float32(1)


def _cubic_far(u: np.ndarray) -> np.ndarray:
  """Weight of a tap at distance u in [1, 2]: ((Au - 5A)u + 8A)u - 4A."""
  return ((_A * u - np.float32(5) * _A) * u + np.float32(8) * _A) * u - np.float32(4) * _A


@functools.lru_cache(maxsize=64)
def _resize_matrix_cached(in_size: int, out_size: int) -> np.ndarray:
  # Rounded exactly as PyTorch's CPU kernel rounds (its opmath type for float is float): the scale
  # is a float32 division, but `scale * (dst + 0.5) - 0.5` promotes to double (0.5 is a double
  # literal) and is rounded to float32 only at the end. Doing it all in float32 moves t by up to
  # ~4e-6 (224 -> 288), which is a 2e-5 output error.
  scale = np.float32(in_size) / np.float32(out_size)
  dst = np.arange(out_size, dtype=np.float64)
  # Source position with align_corners=False; for cubic it is deliberately not clamped at 0.
  src = (np.float64(scale) * (dst + 0.5) - 0.5).astype(np.float32)
  x0 = np.floor(src)
  t = (src - x0).astype(np.float32)
  one = np.float32(1)
  weights = np.stack([_cubic_far(t + one), _cubic_near(t), _cubic_near(one - t),
                      _cubic_far((one - t) + one)], axis=1)  # [out, 4]
  taps = x0.astype(np.int64)[:, None] + np.arange(-1, 3)[None, :]
  taps = np.clip(taps, 0, in_size - 1)  # border replicate; duplicate taps add up below
  matrix = np.zeros((out_size, in_size), np.float32)
  np.add.at(matrix, (np.repeat(np.arange(out_size), 4), taps.reshape(-1)), weights.reshape(-1))
  matrix.setflags(write=False)
  return matrix


def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """The (out_size, in_size) float32 matrix R with resize(v) = R @ v along one axis.

  Args:
    in_size: input length (> 0).
    out_size: output length (> 0).

  Returns:
    A fresh float32 numpy array; rows sum to 1.
  """
  if in_size <= 0 or out_size <= 0:
    raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
  return _resize_matrix_cached(int(in_size), int(out_size)).copy()


def bicubic_resize(x: jax.Array, out_h: int, out_w: int) -> jax.Array:
  """Resizes an NHWC batch exactly like ``F.interpolate(mode='bicubic', align_corners=False)``.

  Args:
    x: [N, H, W, C] array.
    out_h: static output height.
    out_w: static output width.

  Returns:
    [N, out_h, out_w, C] in x.dtype (computed in float32); x itself when the size already matches.
  """
  _, h, w, _ = x.shape
  if (h, w) == (out_h, out_w):
    return x  # PyTorch's matrix is the identity here too (t = 0 gives weights 0, 1, 0, 0).
  dtype = x.dtype
  y = x.astype(jnp.float32)
  # HIGHEST: on TPU the default would round the operands to bfloat16 and lose parity.
  if h != out_h:
    y = jnp.einsum("oh,nhwc->nowc", jnp.asarray(_resize_matrix_cached(h, out_h)), y,
                   precision=lax.Precision.HIGHEST)
  if w != out_w:
    y = jnp.einsum("pw,nowc->nopc", jnp.asarray(_resize_matrix_cached(w, out_w)), y,
                   precision=lax.Precision.HIGHEST)
  return y.astype(dtype)
