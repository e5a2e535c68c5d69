"""The pure, jitted pieces of one sandwich-rule training step (SPEC.md §6.3-6.5).

One step trains four (generally `num_arch_training`) subnets on the same batch:

  1. the max subnet, with dropout and drop-connect, on label-smoothed CE; its logits, with the
     gradient stopped, are the teacher's (from that same regularised forward);
  2. `num_arch_training - 2` random subnets and the min subnet learn from the teacher with the
     adaptive alpha-divergence (AlphaNet) or KL (AttentiveNAS), no dropout;
  3. the gradients of all subnets are summed, clipped by value, decayed (except BN and biases)
     and applied by SGD with Nesterov momentum on the warmup-cosine schedule.

Programs are bounded by resolutions, never by subnets: one teacher program (the max subnet at its
real shapes), one min-subnet program (real shapes), one masked student program per resolution,
and one update program. Gradients accumulate into one buffer that every program takes and
returns (donated), so the host never sums trees.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from alphanet_jax import losses
from alphanet_jax import masks as masks_lib
from alphanet_jax import models
from alphanet_jax import space as space_lib
from alphanet_jax.models import extract

ROLES = ("max", "random", "min")


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static hyper-parameters of the step (hashable: part of the compiled programs' keys)."""
  label_smoothing: float = 0.1
  dropout: float = 0.2
  drop_connect: float = 0.2
  kd_loss: str = "alpha"          # 'alpha' (AlphaNet) or 'kl' (AttentiveNAS)
  alpha_min: float = -1.0
  alpha_max: float = 1.0
  iw_clip: float = 5.0
  bn_group_size: int = 32         # images per BN group; 0 = the whole global batch
  dw_impl: str = "auto"
  compute_dtype: str = "float32"  # 'bfloat16' for activations on TPU; loss maths stay float32

  def __post_init__(self):
    if self.kd_loss not in ("alpha", "kl"):
      raise ValueError(f"kd_loss must be 'alpha' or 'kl', got {self.kd_loss!r}.")
    if self.compute_dtype not in ("float32", "bfloat16"):
      raise ValueError(f"compute_dtype must be 'float32' or 'bfloat16', got "
                       f"{self.compute_dtype!r}.")


# ------------------------------------------------------------------------------- optimizer
def warmup_cosine(base_lr: float, warmup_steps: int, total_steps: int,
                  warmup_factor: float = 0.001):
  """The original WarmupCosineLR, stepped per iteration (SPEC §6.5): the cosine spans all steps,
  warm-up included, and is clamped at 0 past the end; step t uses lr(t)."""
  def schedule(count):
    t = jnp.asarray(count, jnp.float32)
    if warmup_steps > 0:
      alpha = t / warmup_steps
      warm = jnp.where(t < warmup_steps, warmup_factor * (1.0 - alpha) + alpha, 1.0)
    else:
      warm = 1.0
    # Past the last step the original's cosine would rise again; hold it at its end (0).
    cosine = 0.5 * (1.0 + jnp.cos(math.pi * jnp.minimum(t, total_steps) / total_steps))
    return jnp.maximum(base_lr * warm * cosine, 0.0)
  return schedule


def _path_names(path) -> list[str]:
  return [str(getattr(p, "key", getattr(p, "name", p))) for p in path]


def weight_decay_mask(params):
  """True where weight decay applies: PyTorch names without '.bn' or '.bias' (SPEC §6.4), i.e.
  no BN scale/bias, no SE or classifier bias. Depthwise and shortcut kernels are decayed."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not ("bn" in _path_names(path) or _path_names(path)[-1] == "bias"), params)


def make_optimizer(*, base_lr: float, warmup_steps: int, total_steps: int,
                   weight_decay: float, grad_clip_value: float, momentum: float = 0.9,
                   nesterov: bool = True, warmup_factor: float = 0.001):
  """clip-by-value -> coupled L2 (masked) -> SGD Nesterov on the warmup-cosine schedule."""
  schedule = warmup_cosine(base_lr, warmup_steps, total_steps, warmup_factor)
  parts = []
  if grad_clip_value and grad_clip_value > 0:
    parts.append(optax.clip(grad_clip_value))
  if weight_decay:
    parts.append(optax.add_decayed_weights(weight_decay, mask=weight_decay_mask))
  parts.append(optax.sgd(schedule, momentum=momentum, nesterov=nesterov))
  return optax.chain(*parts), schedule


# ------------------------------------------------------------------------------- usage mask
def used_params_mask(space: space_lib.SearchSpace, subnets: Sequence[space_lib.SubnetConfig],
                     params) -> dict:
  """1.0 for every parameter some subnet of the step runs, else 0.0 (one scalar per leaf).

  PyTorch's SGD skips a parameter whose gradient is None: the conv of an identity shortcut, or
  any layer of a block no subnet runs. It then gets no decay and no momentum either, and keeps
  its value exactly; the update program reproduces that with this mask.
  """
  specs = space.blocks
  active = np.zeros(len(specs), bool)
  conv_used = np.zeros(len(specs), bool)
  for cfg in subnets:
    for spec in specs:
      if spec.index_in_stage < cfg.depth[spec.stage]:
        active[spec.index] = True
        cin, _, cout, _, _ = masks_lib.block_widths(space, cfg, spec)
        if spec.shortcut == "conv" or (spec.shortcut == "maybe" and cin != cout):
          conv_used[spec.index] = True

  def flag(path, _):
    names = _path_names(path)
    if names[0].startswith("blocks_"):
      b = int(names[0].split("_")[1])
      used = conv_used[b] if names[1] == "shortcut" else active[b]
      return np.float32(used)
    return np.float32(1.0)
  return jax.tree_util.tree_map_with_path(flag, params)


# ------------------------------------------------------------------------------- programs
def _compute_cast(tree, dtype: str):
  if dtype == "float32":
    return tree
  return jax.tree.map(lambda a: a.astype(jnp.bfloat16) if a.dtype == jnp.float32 else a, tree)


def student_loss_fn(cfg: StepConfig):
  if cfg.kd_loss == "alpha":
    return functools.partial(losses.adaptive_alpha_divergence, alpha_min=cfg.alpha_min,
                             alpha_max=cfg.alpha_max, iw_clip=cfg.iw_clip)
  return losses.kl_distillation


class SandwichPrograms:
  """The jitted programs of a sandwich step for one search space and step configuration.

  All programs are pure functions of plain pytrees; shardings come from their inputs (params
  replicated, batches split over the 'data' axis), so the same code runs on 1 CPU, 8 devices
  or a pod.
  """

  def __init__(self, space: space_lib.SearchSpace, step_cfg: StepConfig, tx):
    self.space = space
    self.cfg = step_cfg
    self.tx = tx
    self.max_subnet = space.max_subnet()
    self.min_subnet = space.min_subnet()
    self._supernet = models.supernet_layout(space)
    self._max_layout = models.static_layout(space, self.max_subnet)
    self._min_layout = models.static_layout(space, self.min_subnet)
    self.teacher_grad = jax.jit(self._teacher_grad)
    self.static_student_grad = jax.jit(self._min_grad, donate_argnums=(2,))
    self.masked_student_grad = jax.jit(self._masked_grad, static_argnames=("resolution",),
                                       donate_argnums=(1,))
    self.update = jax.jit(self._update, donate_argnums=(0,))

  # -- forward of one role ---------------------------------------------------------------
  def _bn(self):
    return models.BNMode("train", group_size=self.cfg.bn_group_size)

  def _static_logits(self, layout, subnet, variables, images, *, dropout=0.0, drop_connect=0.0,
                     key=None):
    # Real shapes: slice the max-shaped parameters (gradients scatter back through the slices;
    # the sliced running statistics are unused in train mode and compiled away).
    sub_vars = {"params": extract.extract_subnet(self.space, subnet, variables)["params"]}
    sub_vars = _compute_cast(sub_vars, self.cfg.compute_dtype)
    x = images.astype(jnp.bfloat16) if self.cfg.compute_dtype == "bfloat16" else images
    logits = models.forward(layout, sub_vars, x, None, resolution=subnet.resolution,
                            bn=self._bn(), dropout_rate=dropout, drop_connect_rate=drop_connect,
                            key=key, dw_impl=self.cfg.dw_impl)
    return logits.astype(jnp.float32)

  def _masked_logits(self, variables, images, masks, resolution):
    v = _compute_cast({"params": variables["params"]}, self.cfg.compute_dtype)
    x = images.astype(jnp.bfloat16) if self.cfg.compute_dtype == "bfloat16" else images
    logits = models.forward(self._supernet, v, x, masks, resolution=resolution, bn=self._bn(),
                            dw_impl=self.cfg.dw_impl)
    return logits.astype(jnp.float32)

  # -- gradient programs -----------------------------------------------------------------
  def _teacher_grad(self, params, batch_stats, images, labels, key):
    """Max subnet: label-smoothed CE with dropout and drop-connect; returns (grads, loss,
    teacher logits from this same regularised forward, gradient stopped)."""
    def loss_fn(p):
      logits = self._static_logits(self._max_layout, self.max_subnet,
                                   {"params": p, "batch_stats": batch_stats}, images,
                                   dropout=self.cfg.dropout, drop_connect=self.cfg.drop_connect,
                                   key=key)
      loss = losses.label_smoothed_cross_entropy(logits, labels, self.cfg.label_smoothing)
      return loss, logits
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, loss, jax.lax.stop_gradient(logits)

  def _min_grad(self, params, batch_stats, acc, images, teacher_logits):
    kd = student_loss_fn(self.cfg)
    def loss_fn(p):
      logits = self._static_logits(self._min_layout, self.min_subnet,
                                   {"params": p, "batch_stats": batch_stats}, images)
      return kd(logits, teacher_logits)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    return jax.tree.map(jnp.add, acc, grads), loss

  def _masked_grad(self, params, acc, images, teacher_logits, masks, *, resolution):
    kd = student_loss_fn(self.cfg)
    def loss_fn(p):
      return kd(self._masked_logits({"params": p}, images, masks, resolution), teacher_logits)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    return jax.tree.map(jnp.add, acc, grads), loss

  # -- update ------------------------------------------------------------------------------
  def _update(self, state, acc, used, step_losses):
    """Applies the summed gradients. A parameter no subnet used keeps its value and optimizer
    state exactly. A step whose losses are not all finite changes nothing and is recorded in
    `state['nonfinite']` as (step, index of the first non-finite subnet)."""
    params, opt_state = state["params"], state["opt_state"]
    updates, new_opt = self.tx.update(acc, opt_state, params)
    finite = jnp.all(jnp.isfinite(step_losses))
    keep = lambda u: jnp.logical_and(finite, u > 0)
    new_params = jax.tree.map(lambda p, d, u: jnp.where(keep(u), p + d, p), params, updates, used)
    used_state = optax.tree_utils.tree_map_params(
        self.tx, lambda _, u: u, new_opt, used,
        transform_non_params=lambda _: jnp.float32(1.0))
    new_opt = jax.tree.map(lambda n, o, u: jnp.where(keep(u), n, o), new_opt, opt_state,
                           used_state)
    first_bad = jnp.argmin(jnp.isfinite(step_losses))
    record = jnp.logical_and(jnp.logical_not(finite), state["nonfinite"][0] < 0)
    nonfinite = jnp.where(record, jnp.stack([state["step"], first_bad.astype(jnp.int32)]),
                          state["nonfinite"])
    return dict(state, params=new_params, opt_state=new_opt, step=state["step"] + 1,
                nonfinite=nonfinite)


def init_train_state(variables: dict, tx) -> dict:
  """The training state: variables, optimizer state, step and the non-finite record."""
  return {"params": variables["params"], "batch_stats": variables["batch_stats"],
          "opt_state": tx.init(variables["params"]), "step": jnp.zeros((), jnp.int32),
          "nonfinite": jnp.full((2,), -1, jnp.int32)}


def sandwich_gradients(programs: SandwichPrograms, state: dict, images, labels,
                       subnets: Sequence[space_lib.SubnetConfig], key, put=lambda x: x):
  """The gradient half of a sandwich step: dispatches the teacher, the masked students and the
  min subnet (no host sync) and returns (summed gradients, [loss per subnet] as device scalars).

  `subnets` is [max, random..., min] as the sampler returns it; `put` places host arrays
  (masks) on the devices (replicated).
  """
  if subnets[0] != programs.max_subnet or subnets[-1] != programs.min_subnet:
    raise ValueError("A sandwich step's subnets start with the max and end with the min subnet.")
  params = state["params"]
  acc, loss_max, teacher = programs.teacher_grad(params, state["batch_stats"], images, labels,
                                                 key)
  step_losses = [loss_max]
  for cfg in subnets[1:-1]:
    acc, loss = programs.masked_student_grad(params, acc, images, teacher,
                                             put(masks_lib.subnet_masks(programs.space, cfg)),
                                             resolution=cfg.resolution)
    step_losses.append(loss)
  acc, loss_min = programs.static_student_grad(params, state["batch_stats"], acc, images,
                                                teacher)
  step_losses.append(loss_min)
  return acc, step_losses


def sandwich_step(programs: SandwichPrograms, state: dict, images, labels,
                  subnets: Sequence[space_lib.SubnetConfig], key, put=lambda x: x):
  """One sandwich step on the host: `sandwich_gradients`, then the update program. Returns
  (new state, per-subnet losses as a device array [max, random..., min])."""
  acc, step_losses = sandwich_gradients(programs, state, images, labels, subnets, key, put)
  used = put(used_params_mask(programs.space, subnets, state["params"]))
  step_losses = jnp.stack(step_losses)
  state = programs.update(state, acc, used, step_losses)
  return state, step_losses
