"""Training checkpoints (orbax `CheckpointManager`) and the `init_from` loader.

Layout of `<workdir>/checkpoints/` (orbax's own; one directory per saved step):

  <step>/state/       PyTreeSave of the train state {'params', 'batch_stats', 'opt_state',
                      'step', 'nonfinite'} (OCDBT; restores onto any device count)
  <step>/metadata/    JsonSave of small JSON metadata (config, supernet_config, stages_done, ...)
  <step>/extras/      PyTreeSave of the PyTorch-only buffers (numpy, nested at the dots of their
                      PyTorch names, as in the converter's orbax dirs); only when given
  <step>/commit_success.txt, _CHECKPOINT_METADATA   written by orbax when the step is complete

In the loop: `restore` once (None: no checkpoint at all), `install_preemption_handler`, then
per step `save(step, state, metadata=..., force=preemption_requested(step))`, breaking after a
preemption save; `close` (or `wait`) before exiting.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from alphanet_jax.convert.cli import _flatten, _nest, load_converted  # the converter's layout
from alphanet_jax.convert.torch_io import CheckpointError

COMMIT_FILE = "commit_success.txt"   # orbax 0.12 writes it last, on every filesystem
_ORBAX_ROOT_ENTRIES = ("metadata",)  # the manager's root metadata directory


def _handlers():
  """Item handlers: PyTree (the format behind StandardSave) for the arrays, JSON for metadata."""
  # orbax's default jax.Array handler saves replicated arrays "replica-parallel": it slices each
  # array across its replicas, dispatching one slice program per shape and device. For our few
  # hundred small replicated leaves that compiles thousands of programs on the first save (28 s
  # vs 0.3 s for the tiny supernet on 8 CPU devices) for no I/O gain, so it is off.
  registry = ocp.type_handlers.create_type_handler_registry(
      (jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False)),
      (np.ndarray, ocp.type_handlers.NumpyHandler()),
      (np.number, ocp.type_handlers.ScalarHandler()),
      (int, ocp.type_handlers.ScalarHandler()), (float, ocp.type_handlers.ScalarHandler()))
  pytree = lambda: ocp.PyTreeCheckpointHandler(type_handler_registry=registry)  # noqa: E731
  return {"state": pytree(), "metadata": ocp.JsonCheckpointHandler(), "extras": pytree()}


def _short(error: BaseException, limit: int = 400) -> str:
  text = f"{type(error).__name__}: {error}".replace("\n", " ")
  return text if len(text) <= limit else text[:limit] + "..."  # tensorstore errors are huge


def _step_dirs(directory: epath.Path) -> list[int]:
  """Every step directory, committed or not, newest first."""
  if not directory.is_dir():
    return []
  return sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit()), reverse=True)


def _restore_newest(directory: epath.Path, restore_step: Callable[[int], Any],
                    step: int | None = None):
  """`(restore_step(s), s)` for the newest step `s` that restores; None if there is none.

  A step without the commit marker (a save that never finished) or one that fails to restore is
  skipped with a warning. Raises `CheckpointError` if steps exist but none restores: a run must
  never silently start over next to its checkpoints.
  """
  steps = [step] if step is not None else _step_dirs(directory)
  if not steps:
    return None
  errors = []
  for s in steps:
    try:
      if not (directory / str(s) / COMMIT_FILE).exists():
        raise CheckpointError(f"no {COMMIT_FILE}: the save of this step never finished")
      return restore_step(s), s
    except Exception as e:  # noqa: BLE001  (orbax and tensorstore raise many types)
      errors.append(f"step {s}: {_short(e)}")
      if step is None:
        logging.warning("Checkpoint step %d in %s is unusable (%s); trying an older one.", s,
                        directory, _short(e))
  raise CheckpointError(f"No checkpoint in {directory} could be restored ({'; '.join(errors)}). "
                        "Refusing to start over: fix the cause or move the directory away.")


class Checkpointer:
  """Saves and restores the train state in `<workdir>/checkpoints` (see the module docstring).

  Args:
    workdir: the run's directory (local or gs://).
    save_every_steps: `save` writes steps that are multiples of this (and preemption steps).
    keep: how many of the newest checkpoints to keep.
    async_save: write in a background thread; `save` only waits for the device-to-host copy,
      so the caller may donate the state right after it returns.
  """

  def __init__(self, workdir, *, save_every_steps: int, keep: int = 3, async_save: bool = True):
    self.directory = epath.Path(workdir) / "checkpoints"
    if self.directory.exists():
      foreign = sorted(p.name for p in self.directory.iterdir()
                       if not (p.name.isdigit() or ".orbax-checkpoint-tmp" in p.name
                               or p.name.startswith(".") or p.name in _ORBAX_ROOT_ENTRIES))
      if foreign:
        raise CheckpointError(f"{self.directory} is not an orbax CheckpointManager directory "
                              f"(it holds {foreign[:5]}); use another workdir.")
    # No InitialSavePolicy (orbax's default): the first `save` of a run obeys the interval too.
    policy = ocp.checkpoint_managers.AnySavePolicy([
        ocp.checkpoint_managers.FixedIntervalPolicy(save_every_steps),
        ocp.checkpoint_managers.PreemptionCheckpointingPolicy()])
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policy, preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)   # leftovers of a save killed mid-way
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_handlers=_handlers())
    self._preempted = threading.Event()
    self._previous_handler = None
    self._handler = None

  def save(self, step: int, state, *, metadata: Mapping[str, Any],
           extras: Mapping[str, Any] | None = None, force: bool = False) -> bool:
    """Saves `state` at `step` if the policy says so, or if `force`; returns whether it did.

    A forced save of a step that already exists replaces it: the state is the same, but the
    metadata may have moved on (e.g. a stage finished). Older steps stay until it is committed.
    """
    step = int(step)
    if force and step in self._manager.all_steps():
      self._manager.wait_until_finished()
      self._manager.delete(step)
    items = {"state": ocp.args.PyTreeSave(state), "metadata": ocp.args.JsonSave(dict(metadata))}
    if extras is not None:
      items["extras"] = ocp.args.PyTreeSave(_nest(extras))
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract_state, step: int | None = None):
    """Restores the newest usable step (or `step`) straight into `abstract_state`'s shardings.

    Args:
      abstract_state: the state's pytree of `jax.ShapeDtypeStruct`s with `.sharding`.
      step: a specific step (no fallback); default: the newest that restores.

    Returns:
      `(state, metadata, extras or None, step)`, or None if there is no checkpoint at all.

    Raises:
      CheckpointError: checkpoints exist but none restores (each one's error is named).
    """
    self._manager.reload()

    def restore_step(s):
      restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)  # strict shapes
      items = {"state": ocp.args.PyTreeRestore(abstract_state, restore_args=restore_args),
               "metadata": ocp.args.JsonRestore()}
      if (self.directory / str(s) / "extras").is_dir():
        items["extras"] = ocp.args.PyTreeRestore()   # saved as numpy: restored as numpy
      out = self._manager.restore(s, args=ocp.args.Composite(**items))
      extras = _flatten(out["extras"]) if "extras" in items else None
      return out["state"], out["metadata"], extras

    found = _restore_newest(self.directory, restore_step, step)
    return None if found is None else (*found[0], found[1])

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def wait(self) -> None:
    """Blocks until the background save (if any) is committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves, releases the manager and restores the previous SIGTERM handler."""
    self._manager.wait_until_finished()
    self._manager.close()
    if self._handler is not None and signal.getsignal(signal.SIGTERM) is self._handler:
      signal.signal(signal.SIGTERM, self._previous_handler)
    self._handler = None

  # ------------------------------------------------------------------------------ preemption
  def install_preemption_handler(self) -> bool:
    """Makes SIGTERM set the preemption flag instead of killing the process; idempotent.

    Returns whether the handler is installed. It is not on multi-host runs, where JAX's
    preemption service owns SIGTERM and `reached_preemption` gives every host the same step
    (a flag seen by one host alone would make it save, a collective, without the others), nor
    off the main thread (Python only allows it there).
    """
    if self._handler is not None:
      return True
    if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
      return False
    previous = signal.getsignal(signal.SIGTERM)
    if previous is None:   # a handler installed from C, which we could neither call nor restore
      logging.warning("SIGTERM already has a non-Python handler; not installing ours.")
      return False

    def handler(signum, frame):
      self._preempted.set()   # no logging here: handlers may run inside a logging call
      if callable(previous):  # chain to a Python handler; SIG_DFL would kill us, SIG_IGN is moot
        previous(signum, frame)

    signal.signal(signal.SIGTERM, handler)
    self._previous_handler, self._handler = previous, handler
    return True

  def preemption_requested(self, step: int) -> bool:
    """True after SIGTERM, or at the multi-host preemption sync point (call on every host)."""
    if self._preempted.is_set():
      return True
    return self._manager.reached_preemption(step)


# ------------------------------------------------------------------------------ init_from
_KINDS = ("(a) an orbax directory written by `convert.cli to-orbax` (save_converted), (b) a "
          "training workdir or its checkpoints/ directory, (c) a PyTorch supernet .pth[.tar] file")


def _restore_training_variables(directory: epath.Path):
  """params, batch_stats (numpy) and extras of the newest usable step of a manager directory."""
  options = ocp.CheckpointManagerOptions(create=False)  # not read_only: that one warns
  with ocp.CheckpointManager(directory, options=options, item_handlers=_handlers()) as manager:
    def restore_step(s):
      tree = manager.item_metadata(s)["state"].tree
      target = {k: jax.tree.map(lambda m: np.empty(m.shape, m.dtype), tree[k])
                for k in ("params", "batch_stats")}
      host = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
      # partial_restore: only these two subtrees, whatever the optimizer's state looks like.
      items = {"state": ocp.args.PyTreeRestore(target, restore_args=host, partial_restore=True)}
      if (directory / str(s) / "extras").is_dir():
        items["extras"] = ocp.args.PyTreeRestore()
      out = manager.restore(s, args=ocp.args.Composite(**items))
      return out["state"], (_flatten(out["extras"]) if "extras" in items else None)

    found = _restore_newest(directory, restore_step)
  if found is None:
    raise CheckpointError(f"{directory} holds no checkpoint.")
  logging.info("init_from: step %d of %s.", found[1], directory)
  return found[0]


def check_variable_shapes(variables: Mapping[str, Any], space, source: str) -> None:
  """Raises `CheckpointError` naming the first variable whose shape `space` does not expect."""
  from alphanet_jax.convert import supernet  # noqa: PLC0415

  expected = _flatten(supernet.supernet_variable_shapes(space))
  got = _flatten({k: variables.get(k, {}) for k in ("params", "batch_stats")})
  for name, shape in expected.items():
    if name not in got:
      raise CheckpointError(f"{source} lacks {name} (shape {list(shape)}) of this search space.")
    if tuple(got[name].shape) != tuple(shape):
      raise CheckpointError(f"{source}: {name} has shape {list(got[name].shape)}, this search "
                            f"space needs {list(shape)}; was it trained with another config?")
  for name in got:
    if name not in expected:
      raise CheckpointError(f"{source} has {name}, which this search space does not have.")


def load_initial_variables(path, space):
  """Supernet variables for `config.init_from`, checked against `space`.

  Args:
    path: one of: (a) an orbax directory written by `convert.cli.save_converted`; (b) a training
      workdir or its `checkpoints/` directory (params and batch_stats of its newest usable step);
      (c) a PyTorch supernet `.pth` / `.pth.tar` file.
    space: the search space the variables must fit.

  Returns:
    `({'params', 'batch_stats'} of numpy arrays, extras by PyTorch name or None)`.

  Raises:
    FileNotFoundError: no such path.
    CheckpointError: an unknown kind of path, an unreadable one, or mismatched shapes.
  """
  p = epath.Path(path)
  if not p.exists():
    raise FileNotFoundError(f"init_from: no such file or directory: {str(path)!r}.")
  if p.is_dir() and (p / "_METADATA").exists():
    variables, extras, _ = load_converted(str(p))
  elif p.is_dir() and (p / "checkpoints").is_dir():
    variables, extras = _restore_training_variables(p / "checkpoints")
  elif p.is_dir() and _step_dirs(p):
    variables, extras = _restore_training_variables(p)
  elif p.is_file() and p.name.endswith((".pth", ".pth.tar")):
    from alphanet_jax.convert import supernet, torch_io  # noqa: PLC0415  (torch is optional)
    variables, extras = supernet.torch_to_jax(torch_io.load_state_dict(str(p)), space)
  else:
    raise CheckpointError(f"init_from={str(path)!r} is none of the accepted kinds: {_KINDS}.")
  check_variable_shapes(variables, space, f"init_from={str(path)!r}")
  return variables, extras
