"""Depthwise convolution with PyTorch padding, in a native and a CPU-friendly form.

Two implementations behind one function (DESIGN decision 7):

* ``'native'``: ``lax.conv_general_dilated`` with ``feature_group_count=C``. The right choice on
  TPU/GPU; on XLA:CPU it is unusable (one [8,48,48,432] 5x5 layer: about 5-8 s forward+backward).
* ``'shift'``: a shift-and-sum over the k*k taps with a hand-written VJP. Plain autodiff of the
  shift-and-sum is 3-6x slower than the hand-written backward, which has two parts:
  - the input gradient is another shift-and-sum, of the cotangent with the flipped kernel, done per
    stride phase (polyphase), so stride 2 does no multiplies by the zeros of a dilated cotangent;
  - the kernel gradient is k*k reductions, run as a lax.scan over row blocks with running sums,
    because XLA:CPU would otherwise materialise every shifted slice of the input at full size.

Both use explicit symmetric k//2 padding, as the original (SPEC 2.3); "SAME" pads stride-2 convs on
even sizes asymmetrically and gives different numbers.
"""

import functools
from typing import Any, Optional

import jax
from jax import lax
import jax.numpy as jnp

_IMPLS = ("auto", "native", "shift", "shift_autodiff")


def output_size(size: int, k: int, stride: int) -> int:
  """Spatial output size for symmetric k//2 padding: floor((size + 2*(k//2) - k)/stride) + 1."""
  return (size + 2 * (k // 2) - k) // stride + 1


def _check_shapes(x: jax.Array, kernel: jax.Array, stride: int) -> None:
  if x.ndim != 4:
    raise ValueError(f"x must be NHWC, got shape {x.shape}")
  if kernel.ndim != 4 or kernel.shape[0] != kernel.shape[1] or kernel.shape[2] != 1:
    raise ValueError(f"kernel must be [k, k, 1, C], got shape {kernel.shape}")
  k = kernel.shape[0]
  if k % 2 != 1:
    raise ValueError(f"kernel size must be odd, got {k}")
  if kernel.shape[3] != x.shape[3]:
    raise ValueError(f"kernel has {kernel.shape[3]} channels, x has {x.shape[3]}")
  if stride < 1:
    raise ValueError(f"stride must be >= 1, got {stride}")


def _native(x, kernel, stride, precision):
  """Grouped conv; the kernel is cast to x.dtype because lax.conv needs equal operand dtypes."""
  p = kernel.shape[0] // 2
  return lax.conv_general_dilated(
      x, kernel.astype(x.dtype), window_strides=(stride, stride),
      padding=((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=x.shape[3], precision=precision)


def _tap(xp, a, b, ho, wo, stride):
  """xp[:, a + stride*i, b + stride*j, :] for i < ho, j < wo (a static strided slice)."""
  n, _, _, c = xp.shape
  return lax.slice(xp, (0, a, b, 0),
                   (n, a + stride * (ho - 1) + 1, b + stride * (wo - 1) + 1, c),
                   (1, stride, stride, 1))


def _pad(x, k):
  p = k // 2
  return jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))


def _shift_forward_padded(xp, kernel, stride, ho, wo):
  """Shift-and-sum over a padded input, in float32 (the casts fuse into the one output loop)."""
  k = kernel.shape[0]
  kf = kernel.astype(jnp.float32)
  out = None
  for a in range(k):
    for b in range(k):
      term = _tap(xp, a, b, ho, wo, stride).astype(jnp.float32) * kf[a, b, 0]
      out = term if out is None else out + term
  return out.astype(xp.dtype)


def _shift_forward(x, kernel, stride):
  k = kernel.shape[0]
  _, h, w, _ = x.shape
  return _shift_forward_padded(_pad(x, k), kernel, stride, output_size(h, k, stride),
                               output_size(w, k, stride))


def _phase_taps(r: int, k: int, stride: int):
  """Taps of one output phase of the input gradient, as (tap index, offset into the cotangent).

  Input row y = stride*m + r receives cotangent row i from tap a iff y + p - a == stride*i, i.e.
  a == (r + p) mod stride, at i = m + (r + p - a) // stride.
  """
  p = k // 2
  return [(a, (r + p - a) // stride) for a in range(k) if (r + p - a) % stride == 0]


def _input_grad(g, kernel, stride, h, w):
  """dL/dx of the shift-and-sum: a correlation of g with the flipped kernel, phase by phase.

  For stride s every input position y = s*m + r (r < s) only meets the taps a == (r+p) mod s, so each
  of the s*s phases is a stride-1 shift-and-sum of g over about k*k/s^2 taps. The phases are then
  interleaved. This does the same number of multiplies as the forward, instead of the s^2 times
  more that a zero-dilated cotangent would cost.

  Args:
    g: cotangent [N, Ho, Wo, C], float32.
    kernel: [k, k, 1, C], float32.
    stride: static stride.
    h: input height.
    w: input width.

  Returns:
    [N, h, w, C] float32.
  """
  k = kernel.shape[0]
  n, ho, wo, c = g.shape
  mh, mw = -(-h // stride), -(-w // stride)  # rows/cols per phase (the last phase may be cropped)
  row_taps = [_phase_taps(r, k, stride) for r in range(stride)]
  col_taps = [_phase_taps(r, k, stride) for r in range(stride)]
  # One padding of g that serves every phase: offsets d range over [dmin, dmax].
  dr = [d for taps in row_taps for _, d in taps]
  dc = [d for taps in col_taps for _, d in taps]
  pad_t, pad_b = max(0, -min(dr)), max(0, mh - 1 + max(dr) - (ho - 1))
  pad_l, pad_r = max(0, -min(dc)), max(0, mw - 1 + max(dc) - (wo - 1))
  gp = jnp.pad(g, ((0, 0), (pad_t, pad_b), (pad_l, pad_r), (0, 0)))
  phases = []
  for ry in range(stride):
    row = []
    for rx in range(stride):
      acc = None
      for a, da in row_taps[ry]:
        for b, db in col_taps[rx]:
          term = lax.slice(gp, (0, pad_t + da, pad_l + db, 0),
                           (n, pad_t + da + mh, pad_l + db + mw, c)) * kernel[a, b, 0]
          acc = term if acc is None else acc + term
      if acc is None:  # only when k < stride: this phase meets no tap
        acc = jnp.zeros((n, mh, mw, c), g.dtype)
      row.append(acc)
    phases.append(row)
  if stride == 1:
    return phases[0][0]
  # [s, s, N, mh, mw, C] -> [N, mh, s, mw, s, C] -> [N, mh*s, mw*s, C], then crop the tail phases.
  dx = jnp.stack([jnp.stack(row) for row in phases])
  dx = dx.transpose(2, 3, 0, 4, 1, 5).reshape(n, mh * stride, mw * stride, c)
  return dx[:, :h, :w, :]


def _kernel_grad_dense(xp, g, k, stride):
  """dL/dK[a, b, c] = sum_{n,i,j} g[n,i,j,c] * xp[n, a + s*i, b + s*j, c], as k*k plain reductions.

  The reference formulation (and what autodiff of the forward amounts to). Slow on XLA:CPU: each
  reduction is a separate kernel that cannot fuse the shifted slice, so all k*k slices of xp are
  first materialised at full size (measured 0.45-0.6 s for [8,48,48,432], 5x5).
  """
  _, ho, wo, _ = g.shape
  taps = [jnp.sum(_tap(xp, a, b, ho, wo, stride) * g, axis=(0, 1, 2))
          for a in range(k) for b in range(k)]
  return jnp.stack(taps).reshape(k, k, 1, -1)


# Bounds on one kernel-gradient scan step (see rows_per_step), chosen by measurement on 2 EPYC cores:
# [8,48,48,432] stride 1 took 42 ms with 1 row per step, 28-31 ms with 2-12 rows, 36 ms with 24 rows;
# [8,144,144,24] took 68 ms with 1 row, 8-13 ms with 3-12 rows, 17 ms with 24 rows.
_MAX_ROWS_PER_STEP = 12
_MAX_ELEMENTS_PER_STEP = 128 * 1024


def rows_per_step(ho: int, wo: int, c: int) -> int:
  """Output rows of one image per kernel-gradient scan step.

  The largest divisor of ho with at most _MAX_ROWS_PER_STEP rows and _MAX_ELEMENTS_PER_STEP cotangent
  elements (rows * wo * c), and at least 1. A divisor, so g needs no padding (an extra pass); few
  enough rows that one step's operands and the k*k accumulators stay in L2 and the unrolled body
  stays small; enough that the per-step overhead (k*k small kernels) is amortised.

  Args:
    ho: output height.
    wo: output width.
    c: channels.

  Returns:
    The number of rows.
  """
  best = 1
  for rows in range(1, min(ho, _MAX_ROWS_PER_STEP) + 1):
    if ho % rows == 0 and rows * wo * c <= _MAX_ELEMENTS_PER_STEP:
      best = rows
  return best


def _kernel_grad(xp, g, k, stride):
  """Kernel gradient as a lax.scan over (image, block of output rows) with k*k running sums.

  Each step adds, for every tap, the products of a few cotangent rows with the matching shifted rows
  of xp into a [1, 1, Wo, C] float32 accumulator. Every row is fetched by its own dynamic_slice and
  every accumulator update is one small elementwise fusion, so nothing is materialised at full size
  and the working set stays in cache. On 2 CPU cores, [8,48,48,432] 5x5 stride 1: about 15-30 ms,
  against 0.45-0.6 s for the k*k plain reductions of `_kernel_grad_dense` (XLA:CPU materialises each
  shifted slice at full size before reducing it). Slicing one block of rows per step and taking
  static row slices of it was 3-10x slower (XLA fused it badly).

  Args:
    xp: padded input [N, H + 2p, W + 2p, C], any float dtype (cast per row).
    g: cotangent [N, Ho, Wo, C], any float dtype (cast per row).
    k: kernel size.
    stride: static stride.

  Returns:
    [k, k, 1, C] float32.
  """
  n, ho, wo, c = g.shape
  wp = xp.shape[2]
  rows = rows_per_step(ho, wo, c)
  blocks = ho // rows

  def body(acc, step):
    img, i0 = step // blocks, (step % blocks) * rows
    g_rows = [lax.dynamic_slice(g, (img, i0 + r, 0, 0), (1, 1, wo, c)).astype(jnp.float32)
              for r in range(rows)]
    new = list(acc)
    for a in range(k):
      x_rows = [lax.dynamic_slice(xp, (img, stride * (i0 + r) + a, 0, 0), (1, 1, wp, c))
                for r in range(rows)]
      for b in range(k):
        total = new[a * k + b]
        for x_row, g_row in zip(x_rows, g_rows):
          x_tap = lax.slice(x_row, (0, 0, b, 0), (1, 1, b + stride * (wo - 1) + 1, c),
                            (1, 1, stride, 1))
          total = total + x_tap.astype(jnp.float32) * g_row
        new[a * k + b] = total
    return tuple(new), None

  acc0 = tuple(jnp.zeros((1, 1, wo, c), jnp.float32) for _ in range(k * k))
  acc, _ = lax.scan(body, acc0, jnp.arange(n * blocks))
  return jnp.stack([tap.sum(axis=(0, 1, 2)) for tap in acc]).reshape(k, k, 1, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _shift_vjp(x, kernel, stride):
  return _shift_forward(x, kernel, stride)


def _shift_vjp_fwd(x, kernel, stride):
  # Saves x rather than the padded copy the forward makes: the backward re-pads (one cheap pass),
  # and keeping the padded copy alive until the backward measured no faster.
  return _shift_forward(x, kernel, stride), (x, kernel)


def _shift_vjp_bwd(stride, res, g):
  x, kernel = res
  k = kernel.shape[0]
  _, h, w, _ = x.shape
  dx = _input_grad(g.astype(jnp.float32), kernel.astype(jnp.float32), stride, h, w)
  # The kernel gradient casts row by row, so x and g stay in their (maybe bfloat16) dtype here.
  dk = _kernel_grad(_pad(x, k), g, k, stride)
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


_shift_vjp.defvjp(_shift_vjp_fwd, _shift_vjp_bwd)


def default_impl() -> str:
  """'shift' on CPU (XLA:CPU grouped conv is slow), 'native' on TPU/GPU."""
  return "shift" if jax.default_backend() == "cpu" else "native"


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int = 1, impl: str = "auto",
                   precision: Optional[Any] = None) -> jax.Array:
  """Depthwise 2-D convolution with symmetric k//2 padding (PyTorch Conv2d(groups=C, padding=k//2)).

  Args:
    x: input [N, H, W, C].
    kernel: [k, k, 1, C] (HWIO with feature_group_count=C), k odd. May be batched under vmap, e.g.
      a max kernel times a per-subnet mask.
    stride: static spatial stride (same for both axes).
    impl: 'native' (lax grouped conv), 'shift' (shift-and-sum with a hand-written VJP),
      'shift_autodiff' (the same forward, differentiated by JAX; for tests and benchmarks) or
      'auto' ('shift' on CPU, 'native' elsewhere).
    precision: lax precision for the native conv; the shift forms always compute in float32.

  Returns:
    [N, Ho, Wo, C] in x.dtype, with Ho = floor((H + 2*(k//2) - k)/stride) + 1 (same for W).

  Note:
    The 'shift' form has a custom VJP, so it supports reverse mode (grad, vjp) but not forward mode
    (jvp, jacfwd).
  """
  _check_shapes(x, kernel, stride)
  if impl == "auto":
    impl = default_impl()
  if impl == "native":
    return _native(x, kernel, stride, precision)
  if impl == "shift":
    return _shift_vjp(x, kernel, stride)
  if impl == "shift_autodiff":
    return _shift_forward(x, kernel, stride)
  raise ValueError(f"unknown depthwise impl {impl!r}; expected one of {_IMPLS}")


def center_kernel(kernel: jax.Array, k: int) -> jax.Array:
  """The centre k x k taps of a [K, K, 1, C] kernel (the original's centre crop, SPEC 2.6)."""
  kmax = kernel.shape[0]
  c = (kmax - k) // 2
  return kernel[c:c + k, c:c + k]


def depthwise_conv_masked_kernel(x: jax.Array, kernel: jax.Array, k_active: jax.Array,
                                 stride: int = 1, kernel_sizes=(3, 5), impl: str = "auto",
                                 precision: Optional[Any] = None) -> jax.Array:
  """Depthwise conv with a traced active kernel size: runs only the centre k x k taps.

  Equivalent to ``depthwise_conv(x, kernel * ring_mask, stride)`` where the mask zeroes everything
  outside the centre k_active x k_active (a k x k conv with padding k//2 equals a K x K conv with
  padding K//2 whose ring is zero); the ring gets zero gradient in both forms.

  The branch is picked with lax.switch, so it only saves work when k_active is a scalar per call. Under
  vmap with a batched k_active the switch becomes a select that runs every branch, which is slower
  than masking: mask the kernel instead in that case.

  Args:
    x: input [N, H, W, C].
    kernel: max kernel [K, K, 1, C].
    k_active: int scalar (may be traced), one of kernel_sizes.
    stride: static stride.
    kernel_sizes: the static candidate sizes, each odd and <= K.
    impl: as in depthwise_conv.
    precision: as in depthwise_conv.

  Returns:
    [N, Ho, Wo, C] in x.dtype. Ho does not depend on k (for odd k, padding k//2).
  """
  kmax = kernel.shape[0]
  sizes = tuple(sorted(kernel_sizes))
  if any(s % 2 != 1 or s > kmax for s in sizes):
    raise ValueError(f"kernel_sizes must be odd and <= {kmax}, got {kernel_sizes}")
  branches = [functools.partial(lambda xx, kk, s: depthwise_conv(
      xx, center_kernel(kk, s), stride, impl, precision), s=s) for s in sizes]
  # Index of k_active among the sizes; values not in the list fall to the nearest larger size.
  index = jnp.searchsorted(jnp.asarray(sizes), jnp.asarray(k_active))
  index = jnp.clip(index, 0, len(sizes) - 1)
  return lax.switch(index, branches, x, kernel)
