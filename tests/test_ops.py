"""Low-level ops: depthwise conv (native, shift + custom VJP) and PyTorch-exact bicubic resize."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alphanet_jax.models import depthwise as dw
from alphanet_jax.models import resize

try:
  import torch
  import torch.nn.functional as F
except ImportError:  # torch is optional (conversion only); the JAX-only checks still run
  torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch not importable")

IMPLS = ("native", "shift", "shift_autodiff")
# (H, W): odd, even, and mixed, so stride 2 meets both parities on each axis.
SIZES = ((7, 7), (8, 8), (12, 7))


def _inputs(seed, n, h, w, c, k):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, h, w, c)).astype(np.float32)
  kernel = (rng.standard_normal((k, k, 1, c)) / k).astype(np.float32)
  return x, kernel


def _loss(impl, stride, cotangent):
  """A scalar whose gradient is the VJP of the conv with a fixed random cotangent."""
  def loss(x, kernel):
    return jnp.sum(dw.depthwise_conv(x, kernel, stride, impl) * cotangent)
  return loss


def _torch_reference(x, kernel, stride, cotangent):
  """Forward and (dx, dkernel) from PyTorch in float64, converted to NHWC / [k,k,1,C]."""
  k, c = kernel.shape[0], kernel.shape[3]
  xt = torch.tensor(x.transpose(0, 3, 1, 2), dtype=torch.float64, requires_grad=True)
  kt = torch.tensor(kernel[:, :, 0, :].transpose(2, 0, 1)[:, None], dtype=torch.float64,
                    requires_grad=True)
  yt = F.conv2d(xt, kt, stride=stride, padding=k // 2, groups=c)
  (yt * torch.tensor(cotangent.transpose(0, 3, 1, 2), dtype=torch.float64)).sum().backward()
  return (yt.detach().numpy().transpose(0, 2, 3, 1), xt.grad.numpy().transpose(0, 2, 3, 1),
          kt.grad.numpy()[:, 0].transpose(1, 2, 0)[:, :, None])


def _forward_and_grads(impl, x, kernel, stride, cotangent):
  y = jax.jit(functools.partial(dw.depthwise_conv, stride=stride, impl=impl))(x, kernel)
  dx, dk = jax.jit(jax.grad(_loss(impl, stride, cotangent), argnums=(0, 1)))(x, kernel)
  return np.asarray(y), np.asarray(dx), np.asarray(dk)


def _cotangent(seed, x, kernel, stride):
  n, h, w, c = x.shape
  k = kernel.shape[0]
  shape = (n, dw.output_size(h, k, stride), dw.output_size(w, k, stride), c)
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# depthwise conv
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _case(k, stride, hw):
  """Inputs, cotangent and every impl's (y, dx, dkernel) for one case; shared by two tests."""
  x, kernel = _inputs(0, 2, *hw, 3, k)
  cot = _cotangent(1, x, kernel, stride)
  return x, kernel, cot, {impl: _forward_and_grads(impl, x, kernel, stride, cot) for impl in IMPLS}


@pytest.mark.parametrize("k", (3, 5))
@pytest.mark.parametrize("stride", (1, 2))
@pytest.mark.parametrize("hw", SIZES)
def test_depthwise_impls_agree_forward_and_grads(k, stride, hw):
  x, _, _, results = _case(k, stride, hw)
  n, h, w, c = x.shape
  expected_shape = (n, (h + 2 * (k // 2) - k) // stride + 1, (w + 2 * (k // 2) - k) // stride + 1, c)
  assert results["native"][0].shape == expected_shape
  for impl in ("shift", "shift_autodiff"):
    for name, got, want in zip(("y", "dx", "dkernel"), results[impl], results["native"]):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"{impl} {name}")
  # The hand-written VJP against autodiff of the very same forward.
  for name, got, want in zip(("dx", "dkernel"), results["shift"][1:], results["shift_autodiff"][1:]):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)


@needs_torch
@pytest.mark.parametrize("k", (3, 5))
@pytest.mark.parametrize("stride", (1, 2))
@pytest.mark.parametrize("hw", SIZES)
def test_depthwise_matches_torch(k, stride, hw):
  x, kernel, cot, results = _case(k, stride, hw)
  want = _torch_reference(x, kernel, stride, cot)
  for impl in IMPLS:
    for name, got, ref in zip(("y", "dx", "dkernel"), results[impl], want):
      assert got.shape == ref.shape, (impl, name)
      np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5, err_msg=f"{impl} {name}")


def test_padding_is_symmetric_not_same():
  # Stride 2 on an even size: "SAME" would pad (1, 2) for k=5 and shift the sampling grid.
  x, kernel = _inputs(4, 1, 8, 8, 2, 5)
  ours = dw.depthwise_conv(x, kernel, 2, "native")
  same = jax.lax.conv_general_dilated(x, kernel, (2, 2), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=2)
  assert ours.shape == same.shape
  assert not np.allclose(ours, same)
  np.testing.assert_allclose(dw.depthwise_conv(x, kernel, 2, "shift"), ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batched_x", (False, True))
@pytest.mark.parametrize("stride", (1, 2))
def test_depthwise_vmap_batched_kernel(batched_x, stride):
  # As the supernet does: one max kernel times per-subnet 0/1 masks, vmapped over subnets.
  b, k = 3, 5
  x, kernel = _inputs(5, 2, 7, 8, 4, k)
  ring = np.zeros((k, k, 1, 1), np.float32)
  ring[1:4, 1:4] = 1
  masks = np.stack([np.ones_like(ring), ring, ring * np.float32(0.5)])
  kernels = kernel[None] * masks  # [b, k, k, 1, C]
  xs = np.stack([x, 2 * x, -x]) if batched_x else x
  in_x = 0 if batched_x else None
  for impl in IMPLS:
    def loss(xx, kk, impl=impl):
      return jnp.sum(jnp.sin(dw.depthwise_conv(xx, kk, stride, impl)))
    fwd = jax.jit(jax.vmap(lambda xx, kk, impl=impl: dw.depthwise_conv(xx, kk, stride, impl),
                           in_axes=(in_x, 0)))
    grad = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(in_x, 0)))
    y = fwd(xs, kernels)
    dx, dk = grad(xs, kernels)
    for i in range(b):
      xi = xs[i] if batched_x else x
      np.testing.assert_allclose(y[i], dw.depthwise_conv(xi, kernels[i], stride, "native"),
                                 rtol=1e-5, atol=1e-5, err_msg=impl)
      dxi, dki = jax.grad(functools.partial(loss, impl="native"), argnums=(0, 1))(xi, kernels[i])
      np.testing.assert_allclose(dx[i], dxi, rtol=1e-5, atol=1e-5, err_msg=f"{impl} dx")
      np.testing.assert_allclose(dk[i], dki, rtol=1e-5, atol=1e-5, err_msg=f"{impl} dkernel")


def test_depthwise_vmap_of_grad_sums_over_unbatched_x():
  # grad wrt an unbatched x of a sum over vmapped kernels: the custom VJP's batching must reduce.
  x, kernel = _inputs(6, 2, 8, 8, 3, 3)
  kernels = np.stack([kernel, 2 * kernel])

  def total(xx, impl):
    ys = jax.vmap(lambda kk: dw.depthwise_conv(xx, kk, 2, impl))(kernels)
    return jnp.sum(ys ** 2)

  want = jax.grad(total)(x, "native")
  got = jax.jit(jax.grad(total), static_argnums=1)(x, "shift")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_depthwise_jit_traces_once_per_shape():
  traces = []

  @jax.jit
  def f(x, kernel):
    traces.append(1)
    return jax.grad(lambda xx, kk: jnp.sum(dw.depthwise_conv(xx, kk, 1, "shift") ** 2),
                    argnums=(0, 1))(x, kernel)

  x, kernel = _inputs(7, 1, 6, 6, 2, 5)
  f(x, kernel)
  f(x + 1, kernel * 2)
  assert len(traces) == 1


@pytest.mark.parametrize("stride", (1, 2))
def test_depthwise_bfloat16(stride):
  x, kernel = _inputs(8, 2, 8, 7, 4, 5)
  cot = _cotangent(9, x, kernel, stride)
  ref = _forward_and_grads("native", x, kernel, stride, cot)
  xb = jnp.asarray(x, jnp.bfloat16)
  for impl in IMPLS:
    y = dw.depthwise_conv(xb, kernel, stride, impl)
    assert y.dtype == jnp.bfloat16, impl
    loss = lambda xx, kk, impl=impl: jnp.sum(
        dw.depthwise_conv(xx, kk, stride, impl).astype(jnp.float32) * cot)
    dx, dk = jax.jit(jax.grad(loss, argnums=(0, 1)))(xb, kernel)
    assert dx.dtype == jnp.bfloat16 and dk.dtype == jnp.float32, impl
    # bfloat16 keeps 8 bits: compare at a few percent of the scale.
    for name, got, want in zip(("y", "dx", "dkernel"), (y, dx, dk), ref):
      got = np.asarray(got, np.float32)
      scale = np.abs(want).max()
      assert np.abs(got - want).max() <= 0.03 * scale, (impl, name)


@pytest.mark.parametrize("stride", (1, 2))
def test_masked_kernel_equals_zeroed_ring(stride):
  x, kernel = _inputs(10, 2, 9, 8, 3, 5)
  ring = np.zeros((5, 5, 1, 1), np.float32)
  ring[1:4, 1:4] = 1

  traces = []

  def switched(xx, kk, k_active):
    return jnp.sum(jnp.cos(dw.depthwise_conv_masked_kernel(xx, kk, k_active, stride)))

  @jax.jit
  def switched_grad(xx, kk, k_active):
    traces.append(1)
    return jax.grad(switched, argnums=(0, 1))(xx, kk, k_active)

  for k_active, mask in ((3, ring), (5, np.ones_like(ring))):
    masked = lambda xx, kk, mask=mask: jnp.sum(
        jnp.cos(dw.depthwise_conv(xx, kk * mask, stride, "native")))
    want = jax.grad(masked, argnums=(0, 1))(x, kernel)
    got = switched_grad(x, kernel, jnp.int32(k_active))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(switched(x, kernel, k_active), masked(x, kernel), rtol=1e-5)
    if k_active == 3:
      assert np.all(np.asarray(got[1])[ring[..., 0, 0] == 0] == 0)  # the ring gets no gradient
  assert len(traces) == 1  # one program for both kernel sizes


def test_auto_impl_and_errors():
  assert dw.default_impl() == ("shift" if jax.default_backend() == "cpu" else "native")
  x, kernel = _inputs(11, 1, 5, 5, 2, 3)
  np.testing.assert_allclose(dw.depthwise_conv(x, kernel), dw.depthwise_conv(x, kernel, impl="native"),
                             rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError):
    dw.depthwise_conv(x, kernel, impl="bogus")
  with pytest.raises(ValueError):
    dw.depthwise_conv(x, np.zeros((4, 4, 1, 2), np.float32))  # even kernel
  with pytest.raises(ValueError):
    dw.depthwise_conv(x, np.zeros((3, 3, 1, 3), np.float32))  # channel mismatch


def test_kernel_grad_rows_per_step():
  assert dw.rows_per_step(48, 48, 432) == 6  # 6 * 48 * 432 <= 128K elements
  assert dw.rows_per_step(144, 144, 24) == 12  # capped at 12 rows
  assert dw.rows_per_step(7, 7, 4000) == 1
  for ho in (1, 7, 9, 18, 48):
    assert ho % dw.rows_per_step(ho, ho, 64) == 0


# ---------------------------------------------------------------------------------------------
# bicubic resize
# ---------------------------------------------------------------------------------------------

RESIZES = (((224, 224), (192, 192)), ((224, 224), (256, 256)), ((224, 224), (288, 288)),
           ((8, 8), (32, 32)), ((32, 32), (24, 24)), ((7, 9), (13, 5)), ((5, 11), (2, 1)),
           ((1, 4), (3, 4)))


@needs_torch
@pytest.mark.parametrize("in_hw,out_hw", RESIZES)
def test_bicubic_matches_torch(in_hw, out_hw):
  rng = np.random.default_rng(12)
  # Few images and channels for the large sizes: the shared CPU has two cores.
  x = rng.standard_normal((1, *in_hw, 3)).astype(np.float32)
  want = F.interpolate(torch.tensor(x.transpose(0, 3, 1, 2)), size=out_hw, mode="bicubic",
                       align_corners=False).numpy().transpose(0, 2, 3, 1)
  got = np.asarray(jax.jit(resize.bicubic_resize, static_argnums=(1, 2))(x, *out_hw))
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@needs_torch
@pytest.mark.parametrize("in_size,out_size", ((224, 192), (224, 288), (32, 24), (3, 17), (17, 3)))
def test_resize_matrix_matches_torch(in_size, out_size):
  # Resizing the identity along one axis gives PyTorch's own interpolation matrix.
  eye = torch.eye(in_size, dtype=torch.float32)[None, None]
  want = F.interpolate(eye, size=(in_size, out_size), mode="bicubic",
                       align_corners=False)[0, 0].numpy().T
  got = resize.resize_matrix(in_size, out_size)
  assert got.dtype == np.float32 and got.shape == (out_size, in_size)
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)


def test_resize_matrix_properties():
  for in_size, out_size in ((224, 192), (224, 288), (5, 5), (1, 3)):
    m = resize.resize_matrix(in_size, out_size)
    np.testing.assert_allclose(m.sum(axis=1), 1, atol=1e-6)  # cubic weights sum to 1
  np.testing.assert_array_equal(resize.resize_matrix(6, 6), np.eye(6, dtype=np.float32))
  # Negative lobes are kept (A = -0.75, no clamping of the output).
  assert resize.resize_matrix(8, 32).min() < 0
  with pytest.raises(ValueError):
    resize.resize_matrix(0, 3)


def test_bicubic_identity_dtype_and_not_jax_image():
  x = jnp.asarray(np.random.default_rng(13).standard_normal((2, 16, 16, 3)), jnp.float32)
  assert resize.bicubic_resize(x, 16, 16) is x
  xb = x.astype(jnp.bfloat16)
  yb = resize.bicubic_resize(xb, 12, 20)
  assert yb.dtype == jnp.bfloat16 and yb.shape == (2, 12, 20, 3)
  # jax.image.resize (a = -0.5, antialiased downsampling) is a different operator.
  ours = resize.bicubic_resize(x, 12, 12)
  theirs = jax.image.resize(x, (2, 12, 12, 3), "bicubic")
  assert np.abs(np.asarray(ours) - np.asarray(theirs)).max() > 1e-2
