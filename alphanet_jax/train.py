"""The supernet training loop (big_vision shape): mesh, input, model and optimizer, state on its
devices, restore, the sandwich step, logging, checkpoints, and the later stages.

`run(config, workdir)` executes `config.stages` in order; a finished stage (recorded in the
checkpoint metadata and in summary.json) is skipped on restart.
"""

from __future__ import annotations

import hashlib
import json
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

from alphanet_jax import checkpoint as checkpoint_lib
from alphanet_jax import config_lib, models, sampling
from alphanet_jax import steps as steps_lib

SYNTHETIC_STEPS_PER_EPOCH = 100


class NonFiniteLossError(FloatingPointError):
  pass


def params_sha256(params) -> str:
  """sha256 over every parameter in sorted flattened-path order: the path ('/'-joined keys,
  UTF-8) followed by the array's raw little-endian bytes. A reproducibility fingerprint."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  items = sorted(("/".join(str(getattr(k, "key", k)) for k in path), leaf) for path, leaf in flat)
  h = hashlib.sha256()
  for name, leaf in items:
    h.update(name.encode("utf-8"))
    h.update(np.ascontiguousarray(np.asarray(leaf)).astype(
        np.asarray(leaf).dtype.newbyteorder("<")).tobytes())
  return h.hexdigest()


# ------------------------------------------------------------------------------- summary
def read_summary(workdir) -> dict:
  path = epath.Path(workdir) / "summary.json"
  return json.loads(path.read_text()) if path.exists() else {}


def write_summary(workdir, summary: dict) -> None:
  if jax.process_index() != 0:
    return
  path = epath.Path(workdir) / "summary.json"
  tmp = epath.Path(str(path) + ".tmp")
  tmp.write_text(json.dumps(summary, indent=1, sort_keys=True))
  tmp.replace(path)   # atomic: a crash never leaves half a summary


# ------------------------------------------------------------------------------- setup
class Experiment:
  """Everything the stages share: config, space, mesh, schedule, optimizer and programs."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    config_lib.validate_config(config)
    self.config = config
    self.workdir = epath.Path(workdir)
    self.space = config_lib.space_from_config(config)
    self.layout = models.supernet_layout(self.space)

    # ---- Mesh: one 'data' axis over every device of every host.
    self.mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    self.replicated = NamedSharding(self.mesh, P())
    self.data_sharding = NamedSharding(self.mesh, P("data"))
    self.global_batch = int(config.batch_size)
    if self.global_batch % jax.device_count():
      raise ValueError(f"batch_size {self.global_batch} is not divisible by the "
                       f"{jax.device_count()} devices.")
    self.local_batch = self.global_batch // jax.process_count()

    # ---- Schedule (SPEC §6.5): per-iteration warmup-cosine, base LR x max(1, batch // 256).
    if config.dataset == "synthetic":
      self.steps_per_epoch = SYNTHETIC_STEPS_PER_EPOCH
    else:
      from alphanet_jax import data  # noqa: PLC0415  (TensorFlow only when needed)
      self.steps_per_epoch = max(1, data.steps_per_epoch(config, self.global_batch))
    self.total_steps = int(config.total_steps) or int(config.epochs * self.steps_per_epoch)
    self.warmup_steps = int(config.warmup_epochs * self.steps_per_epoch)
    self.lr = float(config.base_lr) * max(1, self.global_batch // 256)
    self.tx, self.schedule = steps_lib.make_optimizer(
        base_lr=self.lr, warmup_steps=self.warmup_steps, total_steps=self.total_steps,
        weight_decay=config.weight_decay, grad_clip_value=config.grad_clip_value,
        momentum=config.momentum, nesterov=config.nesterov, warmup_factor=config.warmup_factor)
    self.step_cfg = steps_lib.StepConfig(
        label_smoothing=config.label_smoothing, dropout=config.dropout,
        drop_connect=config.drop_connect, kd_loss=config.kd_loss, alpha_min=config.alpha_min,
        alpha_max=config.alpha_max, iw_clip=config.iw_clip, bn_group_size=config.bn_group_size,
        dw_impl=config.dw_impl, compute_dtype=config.compute_dtype)
    self.sampler = sampling.make_sampler(config.sampler, self.space, config.seed,
                                         config.num_arch_training)
    self.checkpointer = checkpoint_lib.Checkpointer(
        self.workdir, save_every_steps=config.checkpoint_every_steps,
        keep=config.keep_checkpoints)

  # ---- State directly on its devices (big_vision: eval_shape, then jit with out_shardings).
  def _init_state(self):
    return steps_lib.init_train_state(models.init_variables(self.layout, self.config.seed),
                                      self.tx)

  def abstract_state(self):
    shapes = jax.eval_shape(self._init_state)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                       sharding=self.replicated), shapes)

  def state_shardings(self):
    return jax.tree.map(lambda _: self.replicated, jax.eval_shape(self._init_state))

  def fresh_state(self):
    # Host-generated initial values (seeded: identical on every host), then placed; the jitted
    # optimizer init takes them as arguments, so no large constants enter the program.
    return self.state_from_variables(models.init_variables(self.layout, self.config.seed))

  def state_from_variables(self, variables):
    variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    make = lambda v: steps_lib.init_train_state(v, self.tx)
    return jax.jit(make, out_shardings=self.state_shardings())(variables)

  def put_replicated(self, tree):
    return jax.device_put(tree, self.replicated)

  def global_batch_arrays(self, batch: dict):
    make = lambda x: jax.make_array_from_process_local_data(self.data_sharding, x)
    return make(batch["image"]), make(batch["label"])

  def metadata(self, stages_done, extra=None) -> dict:
    return {"config": self.config.to_json_best_effort(),
            "supernet_config": self.space.to_supernet_config(),
            "num_classes": self.space.num_classes, "stages_done": list(stages_done),
            **(extra or {})}


# ------------------------------------------------------------------------------- training
def _train_input(exp: Experiment, start_step: int):
  c = exp.config
  if c.dataset == "synthetic":
    from alphanet_jax.data import synthetic  # noqa: PLC0415
    return synthetic.synthetic_iterator(seed=c.seed, start_step=start_step,
                                        global_batch_size=exp.global_batch,
                                        image_size=c.image_size, num_classes=exp.space.num_classes,
                                        process_index=jax.process_index(),
                                        process_count=jax.process_count())
  from alphanet_jax import data  # noqa: PLC0415
  return data.train_iterator(c, seed=c.seed, start_step=start_step,
                             local_batch_size=exp.local_batch)


def _check_finite(exp: Experiment, state) -> None:
  step, role = (int(v) for v in jax.device_get(state["nonfinite"]))
  if step >= 0:
    subnet = exp.sampler.subnets(step)[role]
    raise NonFiniteLossError(
        f"Non-finite loss at step {step} in subnet #{role} "
        f"({'max' if role == 0 else 'min' if role == exp.config.num_arch_training - 1 else 'random'}"
        f": {subnet.to_json()}). The state of that step was not applied and nothing "
        f"non-finite was saved; the last checkpoint is intact.")


def train_stage(exp: Experiment, state, start_step: int, summary: dict, t0: float):
  """Runs the sandwich steps from `start_step` to `exp.total_steps`; returns (state, status)."""
  c = exp.config
  writer = metric_writers.create_default_writer(str(exp.workdir),
                                                just_logging=jax.process_index() > 0)
  if start_step == 0:
    parameter_overview.log_parameter_overview(state["params"])
  writer.write_hparams({k: v for k, v in c.to_dict().items()
                        if isinstance(v, (int, float, str, bool))})
  progress = periodic_actions.ReportProgress(num_train_steps=exp.total_steps, writer=writer)
  exp.checkpointer.install_preemption_handler()
  base_key = jax.random.key(c.seed)
  batches = _train_input(exp, start_step)
  step_losses = None
  last_losses: dict[str, float] = {}
  logging.info("Training steps %d..%d (%d per epoch), global batch %d on %d devices.",
               start_step, exp.total_steps, exp.steps_per_epoch, exp.global_batch,
               jax.device_count())
  status = "done"
  step = start_step
  while step < exp.total_steps:
    images, labels = exp.global_batch_arrays(next(batches))
    subnets = exp.sampler.subnets(step)
    key = jax.random.fold_in(base_key, step)
    state, step_losses = steps_lib.sandwich_step(exp.programs, state, images, labels, subnets,
                                                 key, put=exp.put_replicated)
    step += 1
    progress(step)
    if step % c.log_every_steps == 0 or step == exp.total_steps:
      _check_finite(exp, state)   # metrics leave the device only here
      losses = np.asarray(jax.device_get(step_losses), np.float64)
      last_losses = {"max": float(losses[0]), "min": float(losses[-1]),
                     "random": float(np.mean(losses[1:-1])) if len(losses) > 2 else float("nan")}
      writer.write_scalars(step, {f"train/loss_{k}": v for k, v in last_losses.items()} |
                           {"train/lr": float(exp.schedule(step - 1))})
    preempted = exp.checkpointer.preemption_requested(step)
    # The last step is saved with the stage's completion (run()), not here.
    if preempted or (step % c.checkpoint_every_steps == 0 and step < exp.total_steps):
      _check_finite(exp, state)   # never save a state after a non-finite step
      exp.checkpointer.save(step, state, metadata=exp.metadata(summary.get("stages_done", [])),
                            extras=exp.extras, force=preempted)
    if preempted:
      status = "preempted"
      logging.warning("Preemption requested: saved step %d, exiting.", step)
      break
  exp.checkpointer.wait()
  writer.flush()
  if last_losses:
    summary["losses"] = last_losses
  summary["step"] = step
  summary["params_sha256"] = params_sha256(jax.device_get(state["params"]))
  summary["wall_s"] = summary.get("wall_s_before", 0.0) + time.time() - t0
  return state, status


# ------------------------------------------------------------------------------- driver
def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs `config.stages` in `workdir`; returns the summary (also in workdir/summary.json)."""
  t0 = time.time()
  exp = Experiment(config, workdir)
  exp.workdir.mkdir(parents=True, exist_ok=True)
  summary = read_summary(exp.workdir)
  summary["wall_s_before"] = summary.get("wall_s", 0.0)

  restored = exp.checkpointer.restore(exp.abstract_state())
  exp.extras = None
  if restored is not None:
    state, meta, exp.extras, start_step = restored
    stages_done = list(meta.get("stages_done", []))
    logging.info("Resumed from step %d (stages done: %s).", start_step, stages_done)
  else:
    stages_done, start_step = [], 0
    if config.init_from:
      variables, exp.extras = checkpoint_lib.load_initial_variables(config.init_from, exp.space)
      state = exp.state_from_variables(variables)
      logging.info("Initialised from %s.", config.init_from)
    else:
      state = exp.fresh_state()
  summary["stages_done"] = stages_done
  exp.programs = steps_lib.SandwichPrograms(exp.space, exp.step_cfg, exp.tx)

  for stage in config.stages:
    if stage in stages_done:
      logging.info("Stage %r already done; skipping.", stage)
      continue
    if stage == "train":
      state, status = train_stage(exp, state, start_step, summary, t0)
      summary["status"] = status
      if status != "done":
        summary.pop("wall_s_before", None)
        write_summary(exp.workdir, summary)
        return summary
    else:
      raise NotImplementedError(f"Stage {stage!r} is not available yet in this version.")
    stages_done.append(stage)
    summary["stages_done"] = stages_done
    # Record the finished stage in the checkpoint too, so a restart skips it.
    exp.checkpointer.save(int(jax.device_get(state["step"])), state,
                          metadata=exp.metadata(stages_done), extras=exp.extras, force=True)
    exp.checkpointer.wait()
    summary.pop("wall_s_before", None)
    write_summary(exp.workdir, summary)
    summary["wall_s_before"] = summary["wall_s"]
  summary.pop("wall_s_before", None)
  exp.checkpointer.close()
  write_summary(exp.workdir, summary)
  return summary

