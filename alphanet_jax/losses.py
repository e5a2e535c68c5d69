"""Training losses: AlphaNet's adaptive alpha-divergence, AttentiveNAS KD, label-smoothed CE.

Every function is pure and jit-able, takes logits of shape [B, K] (any float dtype) and does its
maths in float32, returning a float32 result. Teachers are always stop-gradient.

The adaptive alpha-divergence follows SPEC.md §7 (AlphaNet `loss_ops.py`, `AdaptiveLossSoft`) and
is checked case by case against `reference/alpha_loss.{json,npz}`. It differs from the original
only in how the importance ratio r = p/q is formed: here log r = log p - log q comes from two
log-softmaxes (the "safe variant" of SPEC §7), so that an underflowing probability never yields
inf/NaN. See `adaptive_alpha_divergence` for what that changes.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# Branch thresholds of the original `f_divergence` (SPEC §7): |alpha| < 1e-3 is the reverse-KL
# branch, |alpha - 1| < 1e-3 the (unclipped) forward-KL branch, anything else the general one.
_ALPHA_EPS = 1e-3
_REDUCTIONS = ("mean", "sum", "none")


class AlphaDivergenceDiagnostics(NamedTuple):
  """Per-sample quantities of one adaptive alpha-divergence call, each of shape [B], float32.

  Field names follow the reference npz (`reference/alpha_loss.json`, `npz_layout`).

  Attributes:
    div_alpha_min: divergence D at alpha_min (the value used for the selection).
    div_alpha_max: divergence D at alpha_max.
    surrogate_alpha_min: surrogate S at alpha_min (its gradient is that of the clipped D).
    surrogate_alpha_max: surrogate S at alpha_max.
    select_alpha_min: True where the alpha_min branch was selected (D_min > D_max).
    per_sample_loss: the selected surrogate, i.e. the loss before reduction.
  """
  div_alpha_min: jax.Array
  div_alpha_max: jax.Array
  surrogate_alpha_min: jax.Array
  surrogate_alpha_max: jax.Array
  select_alpha_min: jax.Array
  per_sample_loss: jax.Array


def _static_float(value, name: str) -> float:
  """Alphas and the clip are static Python numbers; a traced value cannot pick a branch."""
  try:
    return float(value)
  except (TypeError, jax.errors.ConcretizationTypeError) as e:
    raise TypeError(f"{name} must be a static Python number, got {value!r}; pass it through "
                    "`static_argnames` when jitting.") from e


def _divergence_and_weight(log_q: jax.Array, log_p: jax.Array, alpha: float, iw_clip: float):
  """One alpha branch of `f_divergence`: the divergence D [B] and the weight w = q * rho [B, K].

  Both inputs are constants here (the caller stops their gradient); the surrogate is
  S = -sum_c w_c * log_softmax(student)_c with the live student.

  Args:
    log_q: log_softmax of the student logits, float32 [B, K].
    log_p: log_softmax of the teacher logits, float32 [B, K].
    alpha: the branch's alpha.
    iw_clip: the importance-weight clip beta.

  Returns:
    (D [B], w [B, K]).
  """
  q = jnp.exp(log_q)
  # log r from log-softmaxes (SPEC §7 safe variant): finite even where p or q underflows to 0,
  # where the original's p / q gives 0, inf or NaN.
  log_r = log_p - log_q
  if abs(alpha) < _ALPHA_EPS:
    # Reverse KL: r~ = clip(r, 0, beta), f = -log r~, rho = log r~ - 1 (SPEC §7 table).
    # log r~ = min(log r, log beta) in the log domain: the original's log(clip(p / q)) is -inf
    # where p underflows; elsewhere the two agree to rounding.
    log_r_clipped = jnp.minimum(log_r, jnp.log(jnp.float32(iw_clip)))
    div = jnp.sum(q * -log_r_clipped, axis=-1)
    weight = q * (log_r_clipped - 1.0)
  elif abs(alpha - 1.0) < _ALPHA_EPS:
    # Forward KL, NOT clipped (SPEC §7; reference "gotchas"): f = r log r, rho = r, so
    # D = sum q r log r = sum p log r and w = q r = p. Using p for q * r directly keeps both
    # finite where q underflows (r = inf, 0 * inf in the original) and where p underflows
    # (0 * log 0 = NaN in the original, reference case c10).
    p = jnp.exp(log_p)
    div = jnp.sum(p * log_r, axis=-1)
    weight = p
    # The original's D = sum q r log r is NaN wherever p or q underflows to 0 (0 log 0, 0 inf),
    # and a NaN loses the comparison: that sample trains on alpha_max. Keep that selection rule
    # (training parity: with the reference's large logits it decides whole samples), while the
    # surrogate above stays finite.
    undefined = jnp.any((p == 0.0) | (q == 0.0), axis=-1)
    div = jnp.where(undefined, jnp.nan, div)
  else:
    # General branch: r~ = clip(r^alpha, 0, beta), f0 = 1 / (alpha (alpha - 1)), f = f0 r~,
    # D = sum q (f - f0), rho = r~ / alpha + f0 (SPEC §7 table). exp(alpha log r) may overflow
    # to inf, which the clip turns into beta exactly as the original's clamp does.
    f0 = 1.0 / (alpha * (alpha - 1.0))
    r_alpha = jnp.minimum(jnp.exp(alpha * log_r), jnp.float32(iw_clip))
    div = jnp.sum(q * (f0 * r_alpha - f0), axis=-1)
    weight = q * (r_alpha / alpha + f0)
  # Where both p and q underflow every branch of the original is NaN (0/0).
  both = jnp.any((jnp.exp(log_p) == 0.0) & (q == 0.0), axis=-1)
  return jnp.where(both, jnp.nan, div), weight


def adaptive_alpha_divergence_diagnostics(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    alpha_min: float = -1.0,
    alpha_max: float = 1.0,
    iw_clip: float = 5.0,
) -> AlphaDivergenceDiagnostics:
  """Per-sample divergences, surrogates and branch selection of `adaptive_alpha_divergence`.

  Args:
    student_logits: [B, K] student logits (any float dtype; computed in float32).
    teacher_logits: [B, K] teacher logits (raw logits, not probabilities); stop-gradient.
    alpha_min: static Python float, the lower alpha.
    alpha_max: static Python float, the upper alpha.
    iw_clip: static Python float, the clip beta of the importance weights.

  Returns:
    An `AlphaDivergenceDiagnostics` of [B] arrays. Gradients flow only through
    `surrogate_*` and `per_sample_loss`, and only into `student_logits`.
  """
  alpha_min = _static_float(alpha_min, "alpha_min")
  alpha_max = _static_float(alpha_max, "alpha_max")
  iw_clip = _static_float(iw_clip, "iw_clip")
  log_q_live = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
  # log q is the only gradient path (SPEC §7): q, p and every weight are constants.
  log_q = jax.lax.stop_gradient(log_q_live)
  log_p = jax.lax.stop_gradient(jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1))

  div_min, weight_min = _divergence_and_weight(log_q, log_p, alpha_min, iw_clip)
  div_max, weight_max = _divergence_and_weight(log_q, log_p, alpha_max, iw_clip)
  # S = -sum_c stop_grad(q rho)_c log q_c, so grad S = grad of the clipped divergence.
  surrogate_min = -jnp.sum(weight_min * log_q_live, axis=-1)
  surrogate_max = -jnp.sum(weight_max * log_q_live, axis=-1)
  # ind = D_min > D_max per sample; a tie or a NaN comparison selects alpha_max (SPEC §7).
  # A select, not the original's ind * S_min + (1 - ind) * S_max, so a NaN in the branch not
  # taken cannot leak (0 * NaN); with finite logits neither branch is NaN here anyway.
  select_min = div_min > div_max
  per_sample = jnp.where(select_min, surrogate_min, surrogate_max)
  return AlphaDivergenceDiagnostics(
      div_alpha_min=div_min,
      div_alpha_max=div_max,
      surrogate_alpha_min=surrogate_min,
      surrogate_alpha_max=surrogate_max,
      select_alpha_min=select_min,
      per_sample_loss=per_sample,
  )


def adaptive_alpha_divergence(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    alpha_min: float = -1.0,
    alpha_max: float = 1.0,
    iw_clip: float = 5.0,
    reduction: str = "mean",
) -> jax.Array:
  """AlphaNet's adaptive alpha-divergence in-place distillation loss (`AdaptiveLossSoft`).

  For each sample it evaluates the alpha-divergence D between teacher p = softmax(teacher) and
  student q = softmax(student) at alpha_min and at alpha_max (importance weights clipped to
  [0, iw_clip], except in the alpha = 1 forward-KL branch), picks the alpha with the larger D
  (a tie picks alpha_max) and returns that branch's *surrogate*
  S = -sum_c stop_grad(q_c rho_c) log q_c, whose gradient with respect to the student logits is
  the gradient of the selected clipped divergence. As in the original, the returned value is
  the surrogate, not D, and it can be negative (SPEC.md §7). The teacher gets no gradient.

  Alphas are static Python floats used as given: 0.0 selects the reverse-KL branch (the
  original's call-time `alpha or default` quirk, which silently replaces 0.0, is not
  reproduced).

  Numerics (SPEC §7 hazards). The ratio is formed as log r = log p - log q from two
  log-softmaxes in float32 rather than as p / q, which agrees with the original to rounding
  (the reference cases c00..c10 match within their tolerances) and changes results only where a
  probability underflows to 0:

  * the branch selection is the original's: where its divergence is NaN (the forward-KL branch
    when p or q underflows, 0 log 0 or 0 inf; every branch when both do) the diagnostics report
    NaN too and the comparison selects alpha_max. This decides whole samples when logits are
    large, and the recorded training steps (reference train_step_ref) need it.
  * teacher underflow (p = 0): the selected forward-KL surrogate is finite, as in the original.
  * student underflow (q = 0): the original's loss and gradient are NaN whenever the alpha = 1
    branch is selected; here they are finite (the class contributes w = p, its log q is finite).
  * both underflow: finite here, NaN in the original.

  So with finite logits the loss and its gradient are always finite (the divergence values in
  the diagnostics may be NaN, exactly where the original's are). Gradient-clipping remains
  the trainer's business (the original clips every element to [-1, 1]).

  Args:
    student_logits: [B, K] student logits (any float dtype; computed in float32).
    teacher_logits: [B, K] teacher logits (raw logits, not probabilities); stop-gradient.
    alpha_min: static Python float, the lower alpha (training: -1.0).
    alpha_max: static Python float, the upper alpha (training: 1.0).
    iw_clip: static Python float, the importance-weight clip beta (training: 5.0).
    reduction: 'mean' over the batch (the original's training setting), 'sum' or 'none'.

  Returns:
    A float32 scalar, or the [B] per-sample losses for reduction='none'.
  """
  if reduction not in _REDUCTIONS:
    raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
  per_sample = adaptive_alpha_divergence_diagnostics(
      student_logits, teacher_logits, alpha_min, alpha_max, iw_clip).per_sample_loss
  return _reduce(per_sample, reduction)


def kl_distillation(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
  """AttentiveNAS in-place KD (SPEC.md §6.6): soft-target cross entropy at temperature 1.

  mean_b(-sum_c softmax(teacher)_c log_softmax(student)_c), no label term. It differs from
  KL(p || q) by the teacher entropy, a constant, so the gradient is (q - p) / B.

  Args:
    student_logits: [B, K] student logits (any float dtype; computed in float32).
    teacher_logits: [B, K] teacher logits; stop-gradient.

  Returns:
    A float32 scalar.
  """
  p = jax.lax.stop_gradient(jax.nn.softmax(teacher_logits.astype(jnp.float32), axis=-1))
  log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
  return jnp.mean(-jnp.sum(p * log_q, axis=-1))


def label_smoothed_cross_entropy(logits: jax.Array, labels: jax.Array,
                                 smoothing: float = 0.1) -> jax.Array:
  """Cross entropy with label smoothing, as the original's teacher loss (SPEC.md §6.3).

  target = (1 - smoothing) onehot(label) + smoothing / K, and the loss is
  mean_b(-sum_c target_c log_softmax(logits)_c).

  Args:
    logits: [B, K] logits (any float dtype; computed in float32).
    labels: [B] integer class indices.
    smoothing: the label-smoothing factor (0.1 in training).

  Returns:
    A float32 scalar.
  """
  num_classes = logits.shape[-1]
  log_q = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  target = ((1.0 - smoothing) * jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
            + smoothing / num_classes)
  return jnp.mean(-jnp.sum(target * log_q, axis=-1))


def _reduce(per_sample: jax.Array, reduction: str) -> jax.Array:
  if reduction == "mean":
    return jnp.mean(per_sample)
  if reduction == "sum":
    return jnp.sum(per_sample)
  return per_sample
