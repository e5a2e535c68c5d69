"""Losses against the original PyTorch AdaptiveLossSoft (reference/alpha_loss.*) and by hand."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alphanet_jax import losses

ALPHA_STATIC = ("alpha_min", "alpha_max", "iw_clip", "reduction")
# Per-sample npz fields; `AlphaDivergenceDiagnostics` has attributes of the same names.
DIAGNOSTIC_FIELDS = ("div_alpha_min", "div_alpha_max", "surrogate_alpha_min",
                     "surrogate_alpha_max", "per_sample_loss")
CASE_NAMES = (
    "c00_train_cfg_1000cls",
    "c01_ctor_defaults_10cls",
    "c02_peaked_teacher_10cls",
    "c03_peaked_teacher_1000cls",
    "c04_large_logits_pm30_1000cls",
    "c05_large_logits_pm30_10cls_a-2_2_clip10",
    "c06_a-0.5_0.5_clip3_1000cls",
    "c07_alpha_min0_reverseKL_branch_10cls",
    "c08_forward_override_a-0.5_1.5",
    "c09_student_equals_teacher_1000cls",
    "c10_edge_teacher_prob_underflow_10cls",
)

jit_alpha = jax.jit(losses.adaptive_alpha_divergence, static_argnames=ALPHA_STATIC)
jit_diagnostics = jax.jit(losses.adaptive_alpha_divergence_diagnostics,
                          static_argnames=ALPHA_STATIC[:3])


@pytest.fixture(scope="module")
def alpha_ref(ref_dir):
  meta = json.loads((ref_dir / "alpha_loss.json").read_text())
  with np.load(ref_dir / "alpha_loss.npz") as npz:
    arrays = {key: npz[key] for key in npz.files}
  cases = {}
  for case in meta["cases"]:
    name = case["name"]
    fields = {key.split("/", 1)[1]: value for key, value in arrays.items()
              if key.split("/", 1)[0] == name}
    cases[name] = (case, fields)
  return cases


def _alphas(case):
  return dict(alpha_min=case["effective_alpha_min"], alpha_max=case["effective_alpha_max"],
              iw_clip=case["iw_clip"])


def _assert_close(ours, ref, tol, what):
  ours = np.asarray(ours, np.float64)
  ref = np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
  err = np.abs(ours - ref)
  bound = tol["atol"] + tol["rtol"] * np.abs(ref)
  assert np.all(err <= bound), (
      f"{what}: max err {err.max():.3g}, worst err/bound {np.max(err / bound):.3g}")


def _oracle(student, teacher, alpha_min, alpha_max, iw_clip):
  """SPEC.md §7 written out in float64 numpy: (loss, grad wrt student, D_min, D_max).

  r is formed in the log domain so that the oracle stays defined where float32 underflows; the
  gradient is the closed form dL/ds = (q sum_c w_c - w) / B with w = q rho.
  """
  def log_softmax(x):
    x = np.asarray(x, np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))

  log_q, log_p = log_softmax(student), log_softmax(teacher)
  q, p = np.exp(log_q), np.exp(log_p)
  log_r = log_p - log_q

  def branch(alpha):
    if abs(alpha) < 1e-3:
      log_rc = np.minimum(log_r, np.log(iw_clip))
      return (q * -log_rc).sum(-1), q * (log_rc - 1.0)
    if abs(alpha - 1.0) < 1e-3:
      return (p * log_r).sum(-1), p
    f0 = 1.0 / (alpha * (alpha - 1.0))
    r_alpha = np.minimum(np.exp(alpha * log_r), iw_clip)
    return (q * (f0 * r_alpha - f0)).sum(-1), q * (r_alpha / alpha + f0)

  with np.errstate(over="ignore"):  # exp(alpha log r) = inf is clipped to iw_clip
    div_min, w_min = branch(alpha_min)
    div_max, w_max = branch(alpha_max)
  # The original's divergence is NaN where its p / q is undefined in float32: p or q underflows
  # in the forward-KL branch, both underflow in any branch. A NaN loses the comparison.
  q32, p32 = np.exp(log_q.astype(np.float32)), np.exp(log_p.astype(np.float32))
  for alpha, div in ((alpha_min, div_min), (alpha_max, div_max)):
    undefined = np.any((p32 == 0) & (q32 == 0), axis=-1)
    if abs(alpha - 1.0) < 1e-3:
      undefined |= np.any((p32 == 0) | (q32 == 0), axis=-1)
    div[undefined] = np.nan
  w = np.where((div_min > div_max)[:, None], w_min, w_max)
  loss = np.mean(-(w * log_q).sum(-1))
  grad = (q * w.sum(-1, keepdims=True) - w) / student.shape[0]
  return loss, grad, div_min, div_max


def test_reference_has_every_case(alpha_ref):
  assert tuple(alpha_ref) == CASE_NAMES


@pytest.mark.parametrize("name", CASE_NAMES)
def test_alpha_divergence_matches_reference(alpha_ref, name):
  case, ref = alpha_ref[name]
  assert set(case["compare"]) == {"loss", "grad_student_logits"}
  teacher = ref["teacher_logits"]
  loss_fn = lambda s: jit_alpha(s, teacher, **_alphas(case), reduction=case["reduction"])
  loss, grad = jax.value_and_grad(loss_fn)(jnp.asarray(ref["student_logits"]))
  assert loss.dtype == jnp.float32
  _assert_close(loss, ref["loss"], case["tolerance"]["loss"], f"{name} loss")
  _assert_close(grad, ref["grad_student_logits"], case["tolerance"]["grad_student_logits"],
                f"{name} grad")
  # The loss is not jitted in the hot path of every caller: eager gives the same numbers.
  eager = losses.adaptive_alpha_divergence(ref["student_logits"], teacher, **_alphas(case))
  _assert_close(eager, ref["loss"], case["tolerance"]["loss"], f"{name} eager loss")


@pytest.mark.parametrize("name", CASE_NAMES)
def test_alpha_divergence_diagnostics_match_reference(alpha_ref, name):
  case, ref = alpha_ref[name]
  diag = jit_diagnostics(ref["student_logits"], ref["teacher_logits"], **_alphas(case))
  np.testing.assert_array_equal(np.asarray(diag.select_alpha_min, np.float32),
                                ref["ind_select_alpha_min"], err_msg=f"{name} selection")
  # The json gives tolerances for the compared fields only; the per-sample values get the
  # loss's tolerance.
  tol = case["tolerance"]["loss"]
  for field in DIAGNOSTIC_FIELDS:
    ours, theirs = np.asarray(getattr(diag, field)), ref[field]
    assert ours.dtype == np.float32
    finite = np.isfinite(theirs)
    # Only c10's forward-KL divergence is NaN in the original (0 log 0): ours is NaN exactly
    # there, and the surrogates (what training uses) are finite everywhere.
    assert finite.all() or (name.startswith("c10") and field == "div_alpha_max"), field
    np.testing.assert_array_equal(np.isfinite(ours), finite, err_msg=f"{name} {field}")
    _assert_close(ours[finite], theirs[finite], tol, f"{name} {field}")
  per_sample = jit_alpha(ref["student_logits"], ref["teacher_logits"], **_alphas(case),
                         reduction="none")
  _assert_close(per_sample, ref["per_sample_loss"], tol, f"{name} reduction='none'")


@pytest.mark.parametrize("name", CASE_NAMES)
def test_float64_oracle_agrees_with_reference(alpha_ref, name):
  """Validates the oracle that the underflow tests below rely on."""
  case, ref = alpha_ref[name]
  loss, grad, div_min, _ = _oracle(ref["student_logits"], ref["teacher_logits"], **_alphas(case))
  _assert_close(loss, ref["loss"], case["tolerance"]["loss"], f"{name} oracle loss")
  _assert_close(grad, ref["grad_student_logits"], case["tolerance"]["grad_student_logits"],
                f"{name} oracle grad")
  _assert_close(div_min, ref["div_alpha_min"], case["tolerance"]["loss"], f"{name} oracle D_min")


def test_teacher_underflow_c10_is_finite(alpha_ref):
  case, ref = alpha_ref["c10_edge_teacher_prob_underflow_10cls"]
  student, teacher = ref["student_logits"], ref["teacher_logits"]
  assert np.any(np.asarray(jax.nn.softmax(teacher)) == 0.0)  # the hazard is really there
  _, _, _, oracle_div_max = _oracle(student, teacher, **_alphas(case))
  for alpha_fn, diag_fn in ((jit_alpha, jit_diagnostics),
                            (losses.adaptive_alpha_divergence,
                             losses.adaptive_alpha_divergence_diagnostics)):
    loss, grad = jax.value_and_grad(lambda s: alpha_fn(s, teacher, **_alphas(case)))(student)
    assert np.isfinite(loss) and np.isfinite(grad).all()
    # Where the original's D_max is NaN, ours is NaN too, and alpha_max is selected there.
    diag = diag_fn(student, teacher, **_alphas(case))
    np.testing.assert_array_equal(np.isnan(diag.div_alpha_max), np.isnan(oracle_div_max))
    assert np.isnan(diag.div_alpha_max).any()
    assert not np.any(np.asarray(diag.select_alpha_min)[np.isnan(diag.div_alpha_max)])
    assert np.isfinite(diag.surrogate_alpha_max).all()


@pytest.mark.parametrize("gap", [200.0, 1000.0])
def test_student_underflow_is_finite(gap):
  """SPEC §7 hazard: q = 0 with p > 0 makes the original's loss and gradient NaN."""
  rng = np.random.default_rng(7)
  teacher = rng.normal(size=(6, 10)).astype(np.float32)
  student = rng.normal(size=(6, 10)).astype(np.float32)
  student[:4, 3] -= gap  # q underflows, p does not
  student[2:4, 7] -= gap
  teacher[2:4, 7] -= gap  # p and q both underflow
  assert np.all(np.asarray(jax.nn.softmax(student))[:4, 3] == 0.0)
  assert np.all(np.asarray(jax.nn.softmax(teacher))[2:4, 7] == 0.0)
  for alphas in (dict(alpha_min=-1.0, alpha_max=1.0, iw_clip=5.0),
                 dict(alpha_min=0.0, alpha_max=1.0, iw_clip=5.0),
                 dict(alpha_min=-0.5, alpha_max=1.5, iw_clip=3.0)):
    loss, grad = jax.value_and_grad(lambda s: jit_alpha(s, teacher, **alphas))(student)
    diag = jit_diagnostics(student, teacher, **alphas)
    assert np.isfinite(loss) and np.isfinite(grad).all(), alphas
    # Eager too: XLA's simplifier can fold a q * (p / q) into p under jit only, so a jitted
    # check alone would miss a NaN that op-by-op execution produces.
    eager_loss, eager_grad = jax.value_and_grad(
        lambda s: losses.adaptive_alpha_divergence(s, teacher, **alphas))(student)
    eager_diag = losses.adaptive_alpha_divergence_diagnostics(student, teacher, **alphas)
    assert np.isfinite(eager_loss) and np.isfinite(eager_grad).all(), alphas
    for d in (diag, eager_diag):
      for value in (d.surrogate_alpha_min, d.surrogate_alpha_max, d.per_sample_loss):
        assert np.isfinite(value).all(), alphas
    if alphas["alpha_max"] == 1.0:
      # The NaN branch of the original is the one selected here.
      assert not np.any(diag.select_alpha_min[:4])
    oracle_loss, oracle_grad, oracle_min, oracle_max = _oracle(student, teacher, **alphas)
    np.testing.assert_array_equal(diag.select_alpha_min, oracle_min > oracle_max)
    np.testing.assert_allclose(loss, oracle_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, oracle_grad, rtol=1e-5, atol=1e-7)


def test_alpha_divergence_teacher_gets_no_gradient(alpha_ref):
  case, ref = alpha_ref["c01_ctor_defaults_10cls"]
  grad_teacher = jax.grad(lambda t: jit_alpha(ref["student_logits"], t, **_alphas(case)))(
      jnp.asarray(ref["teacher_logits"]))
  np.testing.assert_array_equal(grad_teacher, 0.0)


def test_alpha_divergence_jit_traces_once_and_reductions(alpha_ref):
  case, ref = alpha_ref["c07_alpha_min0_reverseKL_branch_10cls"]
  traces = []

  def counted(s, t, **kwargs):
    traces.append(1)
    return losses.adaptive_alpha_divergence(s, t, **kwargs)

  fn = jax.jit(counted, static_argnames=ALPHA_STATIC)
  student, teacher = ref["student_logits"], ref["teacher_logits"]
  first = fn(student, teacher, **_alphas(case), reduction="mean")
  second = fn(student + 1.0, teacher, **_alphas(case), reduction="mean")  # shift-invariant
  assert len(traces) == 1
  np.testing.assert_allclose(second, first, rtol=1e-6)
  per_sample = fn(student, teacher, **_alphas(case), reduction="none")
  total = fn(student, teacher, **_alphas(case), reduction="sum")
  assert per_sample.shape == (student.shape[0],)
  np.testing.assert_allclose(total, per_sample.sum(), rtol=1e-6)
  np.testing.assert_allclose(first, per_sample.mean(), rtol=1e-6)
  with pytest.raises(ValueError):
    losses.adaptive_alpha_divergence(student, teacher, reduction="batchmean")


def test_alpha_zero_is_used_not_replaced(alpha_ref):
  """0.0 picks the reverse-KL branch (the original's call-time `alpha or default` quirk is gone)."""
  case, ref = alpha_ref["c07_alpha_min0_reverseKL_branch_10cls"]
  assert case["effective_alpha_min"] == 0.0
  student, teacher = ref["student_logits"], ref["teacher_logits"]
  with_zero = losses.adaptive_alpha_divergence(student, teacher, alpha_min=0.0)
  with_default = losses.adaptive_alpha_divergence(student, teacher)
  _assert_close(with_zero, ref["loss"], case["tolerance"]["loss"], "alpha_min=0.0")
  assert abs(float(with_zero) - float(with_default)) > 1e-3


def test_traced_alpha_is_rejected():
  x = jnp.zeros((2, 3))
  with pytest.raises(TypeError, match="static"):
    jax.jit(losses.adaptive_alpha_divergence)(x, x, -1.0)


def test_bfloat16_inputs_compute_in_float32(alpha_ref):
  case, ref = alpha_ref["c00_train_cfg_1000cls"]
  student = jnp.asarray(ref["student_logits"], jnp.bfloat16)
  teacher = jnp.asarray(ref["teacher_logits"], jnp.bfloat16)
  # The same values in float32: a float32 computation must give the same loss to f32 rounding.
  student32, teacher32 = student.astype(jnp.float32), teacher.astype(jnp.float32)
  for fn in (lambda s, t: jit_alpha(s, t, **_alphas(case)),
             losses.kl_distillation,
             lambda s, t: losses.label_smoothed_cross_entropy(s, jnp.argmax(t, axis=-1))):
    loss, grad = jax.value_and_grad(fn)(student, teacher)
    loss32, grad32 = jax.value_and_grad(fn)(student32, teacher32)
    assert loss.dtype == jnp.float32 and grad.dtype == jnp.bfloat16
    np.testing.assert_allclose(loss, loss32, rtol=1e-6, atol=1e-6)
    # The gradient is the float32 one, rounded once to the input's dtype.
    np.testing.assert_array_equal(np.asarray(grad, np.float32),
                                  np.asarray(grad32.astype(jnp.bfloat16), np.float32))


def test_kl_distillation_formula_and_gradient():
  rng = np.random.default_rng(0)
  student = rng.normal(scale=3.0, size=(5, 17)).astype(np.float32)
  teacher = rng.normal(scale=3.0, size=(5, 17)).astype(np.float32)
  s64, t64 = student.astype(np.float64), teacher.astype(np.float64)
  q = np.exp(s64 - s64.max(-1, keepdims=True))
  q /= q.sum(-1, keepdims=True)
  p = np.exp(t64 - t64.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  expected = np.mean(-(p * np.log(q)).sum(-1))
  loss, (grad_s, grad_t) = jax.value_and_grad(losses.kl_distillation, argnums=(0, 1))(
      student, teacher)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  np.testing.assert_allclose(grad_s, (q - p) / student.shape[0], atol=1e-7)
  np.testing.assert_array_equal(grad_t, 0.0)
  np.testing.assert_allclose(jax.jit(losses.kl_distillation)(student, teacher), loss, rtol=1e-6)


def test_label_smoothed_cross_entropy_by_hand():
  # Two classes, logits (0, log 3): q = (1/4, 3/4). Label 1, s = 0.1: target = (0.05, 0.95).
  logits = np.array([[0.0, np.log(3.0)], [0.0, np.log(3.0)]], np.float32)
  labels = np.array([1, 0])
  row1 = -(0.05 * np.log(0.25) + 0.95 * np.log(0.75))
  row0 = -(0.95 * np.log(0.25) + 0.05 * np.log(0.75))
  loss = losses.label_smoothed_cross_entropy(logits, labels, smoothing=0.1)
  np.testing.assert_allclose(loss, (row0 + row1) / 2, rtol=1e-6)
  # Uniform logits: log K whatever the smoothing; smoothing 0: plain CE.
  np.testing.assert_allclose(
      losses.label_smoothed_cross_entropy(np.zeros((3, 1000), np.float32), np.array([0, 5, 999])),
      np.log(1000.0), rtol=1e-6)
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(4, 7)).astype(np.float32)
  labels = np.array([0, 6, 3, 3])
  log_q = np.asarray(jax.nn.log_softmax(logits))
  np.testing.assert_allclose(losses.label_smoothed_cross_entropy(logits, labels, smoothing=0.0),
                             -log_q[np.arange(4), labels].mean(), rtol=1e-6)
  # Gradient: (q - target) / B, target = 0.9 onehot + 0.1 / K.
  target = 0.9 * np.eye(7)[labels] + 0.1 / 7
  grad = jax.jit(jax.grad(losses.label_smoothed_cross_entropy))(logits, labels)
  np.testing.assert_allclose(grad, (np.exp(log_q) - target) / 4, atol=1e-7)
