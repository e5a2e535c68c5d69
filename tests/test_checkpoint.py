"""Checkpointer (orbax CheckpointManager) and init_from: round trips, resharding, retention,
async saves, the save policy, corrupt checkpoints, preemption and the three init_from kinds."""

import glob
import logging
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from alphanet_jax import checkpoint as ckpt_lib
from alphanet_jax import models
from alphanet_jax import steps as steps_lib
from alphanet_jax.convert import cli, supernet
from alphanet_jax.convert.torch_io import CheckpointError

# orbax leaves tensorstore callbacks on a closed event loop after some failed reads (harmless).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

META = {"config": "{}", "supernet_config": {"x": [1, 2]}, "stages_done": ["train"]}
EXTRAS = {"first_conv.bn.num_batches_tracked": np.array(7, np.int64),
          "blocks.0.bn.bn_tracking.0.running_mean": np.arange(3, dtype=np.float32)}


def replicated(n):
  return NamedSharding(Mesh(np.array(jax.devices()[:n]), ("data",)), P())


def small_state(n=8, seed=0):
  """A train state shaped like the real one (optax namedtuples, EmptyState, int32 scalars)."""
  rng = np.random.default_rng(seed)
  params = {"conv": {"kernel": rng.normal(size=(3, 3, 2, 4)).astype(np.float32)},
            "bn": {"scale": rng.normal(size=4).astype(np.float32)}}
  tx = optax.chain(optax.clip(1.0), optax.sgd(0.1, momentum=0.9, nesterov=True))
  opt_state = jax.tree.map(lambda x: x + 0.5, tx.init(params))
  state = {"params": params, "batch_stats": {"bn": {"mean": rng.normal(size=4).astype(np.float32)}},
           "opt_state": opt_state, "step": np.int32(seed), "nonfinite": np.full(2, -1, np.int32)}
  return jax.device_put(jax.tree.map(jnp.asarray, state), replicated(n))


def abstract(state, n):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated(n)),
                      state)


def assert_bitwise(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def saved(tmp_path, steps=(1, 2), extras=None, **kw):
  ck = ckpt_lib.Checkpointer(tmp_path, save_every_steps=1, **kw)
  for s in steps:
    assert ck.save(s, small_state(seed=s), metadata={**META, "step": s}, extras=extras)
  ck.wait()
  return ck


# ------------------------------------------------------------------------------ round trips
@pytest.fixture(scope="module")
def tiny_variables(tiny_space):
  """The tiny supernet's variables: the model's own tree (names, shapes, dtypes) with random
  values. `jax.eval_shape` because running `init_variables` takes ~30 s on 2 shared cores."""
  shapes = jax.eval_shape(lambda: models.init_variables(models.supernet_layout(tiny_space)))
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes)


@pytest.mark.parametrize("n", [8, 2, 1])
def test_round_trip_bitwise_onto_any_device_count(tmp_path, n):
  ck = saved(tmp_path, steps=(3,), extras=EXTRAS)   # written from a mesh of 8
  state, meta, extras, step = ck.restore(abstract(small_state(), n))
  assert step == 3 and meta == {**META, "step": 3}
  assert_bitwise(state, small_state(seed=3))
  assert all(x.sharding == replicated(n) for x in jax.tree.leaves(state))
  assert extras.keys() == EXTRAS.keys()
  assert_bitwise(extras, EXTRAS)   # int64 stays int64 (numpy, not narrowed by jax)
  ck.close()


def test_tiny_supernet_state_round_trip(tmp_path, tiny_variables):
  state = jax.device_put(steps_lib.init_train_state(tiny_variables, optax.sgd(0.1, momentum=0.9)),
                         replicated(8))
  ck = ckpt_lib.Checkpointer(tmp_path, save_every_steps=10)
  assert ck.save(10, state, metadata=META)
  ck.wait()
  restored, _, extras, _ = ck.restore(abstract(state, 2))
  assert extras is None
  assert_bitwise(restored, state)
  ck.close()


def test_no_checkpoint_restores_none(tmp_path):
  ck = ckpt_lib.Checkpointer(tmp_path, save_every_steps=1)
  assert ck.restore(abstract(small_state(), 1)) is None
  assert ck.latest_step() is None and ck.all_steps() == []


def test_keep_prunes_old_steps(tmp_path):
  ck = saved(tmp_path, steps=(1, 2, 3, 4, 5), keep=2)
  assert ck.all_steps() == [4, 5] and ck.latest_step() == 5
  assert sorted(os.listdir(ck.directory)) == ["4", "5"]
  ck.close()


def test_async_save_survives_donation_then_wait(tmp_path):
  ck = ckpt_lib.Checkpointer(tmp_path, save_every_steps=1, async_save=True)
  state = small_state(seed=4)
  assert ck.save(4, state, metadata=META)
  for x in jax.tree.leaves(state):   # what a donating step does to the buffers right after
    x.delete()
  ck.wait()
  assert ck.all_steps() == [4]
  assert_bitwise(ck.restore(abstract(small_state(), 1))[0], small_state(seed=4))
  ck.close()


def test_policy_saves_every_n_steps_unless_forced(tmp_path):
  ck = ckpt_lib.Checkpointer(tmp_path, save_every_steps=3)
  state = small_state()
  did = [ck.save(s, state, metadata=META) for s in range(1, 8)]
  assert did == [False, False, True, False, False, True, False]
  assert ck.save(7, state, metadata=META, force=True)
  ck.wait()
  assert ck.all_steps() == [3, 6, 7]
  ck.close()


def test_forced_save_of_an_existing_step_replaces_its_metadata(tmp_path):
  ck = saved(tmp_path, steps=(2,))
  assert not ck.save(2, small_state(seed=2), metadata={"stages_done": ["x"]})
  assert ck.save(2, small_state(seed=2), metadata={"stages_done": ["train", "calib"]}, force=True)
  ck.wait()
  assert ck.all_steps() == [2]
  assert ck.restore(abstract(small_state(), 1))[1] == {"stages_done": ["train", "calib"]}
  ck.close()


# ------------------------------------------------------------------------------ corruption
def _garble_data(step_dir):
  for f in glob.glob(f"{step_dir}/state/d/*"):
    with open(f, "r+b") as fh:
      fh.truncate(10)


CORRUPTIONS = {
    "garbled_array_data": _garble_data,
    "missing_manifest": lambda d: os.remove(f"{d}/state/manifest.ocdbt"),
    "garbled_metadata_json": lambda d: open(f"{d}/metadata/metadata", "w").write("{oops"),
    "missing_commit_marker": lambda d: os.remove(f"{d}/{ckpt_lib.COMMIT_FILE}"),
    "missing_state_item": lambda d: shutil.rmtree(f"{d}/state"),
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_corrupt_latest_falls_back_with_a_warning(tmp_path, caplog, corrupt):
  saved(tmp_path, steps=(1, 2)).close()
  corrupt(tmp_path / "checkpoints" / "2")
  ck = ckpt_lib.Checkpointer(tmp_path, save_every_steps=1)
  with caplog.at_level(logging.WARNING):
    state, meta, _, step = ck.restore(abstract(small_state(), 1))
  assert step == 1 and meta["step"] == 1
  assert_bitwise(state, small_state(seed=1))
  assert any("step 2" in r.getMessage() and "unusable" in r.getMessage() for r in caplog.records)
  with pytest.raises(CheckpointError, match="step 2"):   # an explicit step never falls back
    ck.restore(abstract(small_state(), 1), step=2)
  ck.close()


def test_all_corrupt_raises_instead_of_starting_over(tmp_path):
  saved(tmp_path, steps=(1, 2)).close()
  for s in (1, 2):
    _garble_data(tmp_path / "checkpoints" / str(s))
  ck = ckpt_lib.Checkpointer(tmp_path, save_every_steps=1)
  with pytest.raises(CheckpointError, match="step 2.*step 1.*Refusing to start over"):
    ck.restore(abstract(small_state(), 1))
  ck.close()


def test_wrong_target_is_an_error_not_a_fresh_start(tmp_path):
  ck = saved(tmp_path, steps=(1,))
  state = small_state()
  other_tree = {**state, "params": {"w": jnp.zeros(3)}}
  other_shape = {**state, "batch_stats": {"bn": {"mean": jnp.zeros(5)}}}
  for other in (other_tree, other_shape):
    with pytest.raises(CheckpointError, match="step 1"):
      ck.restore(abstract(other, 1))
  ck.close()


def test_leftover_of_an_interrupted_save_is_not_foreign(tmp_path):
  saved(tmp_path, steps=(1,)).close()
  leftover = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-1234567"
  (leftover / "state").mkdir(parents=True)
  ck = ckpt_lib.Checkpointer(tmp_path, save_every_steps=1)
  assert ck.all_steps() == [1] and ck.restore(abstract(small_state(), 1))[3] == 1
  ck.close()


def test_foreign_directory_is_refused(tmp_path):
  (tmp_path / "checkpoints").mkdir()
  (tmp_path / "checkpoints" / "model.pth").write_bytes(b"x")
  with pytest.raises(CheckpointError, match="not an orbax CheckpointManager directory"):
    ckpt_lib.Checkpointer(tmp_path, save_every_steps=1)


# ------------------------------------------------------------------------------ preemption
def test_sigterm_sets_the_flag_and_chains(tmp_path):
  seen = []
  chained = lambda signum, frame: seen.append(signum)  # noqa: E731
  original = signal.signal(signal.SIGTERM, chained)
  try:
    ck = ckpt_lib.Checkpointer(tmp_path, save_every_steps=100)
    assert not ck.preemption_requested(5)
    assert ck.install_preemption_handler() and ck.install_preemption_handler()  # idempotent
    os.kill(os.getpid(), signal.SIGTERM)
    assert ck.preemption_requested(5) and seen == [signal.SIGTERM]   # still alive, and chained
    assert ck.save(5, small_state(), metadata=META, force=True)
    ck.close()   # waits for the save, and gives SIGTERM back to the previous handler
    assert signal.getsignal(signal.SIGTERM) is chained
    assert ckpt_lib.Checkpointer(tmp_path, save_every_steps=100).all_steps() == [5]
  finally:
    signal.signal(signal.SIGTERM, original)


# ------------------------------------------------------------------------------ init_from
def _check_loaded(loaded, expected_variables, expected_extras):
  variables, extras = loaded
  assert_bitwise(variables, expected_variables)
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(variables))
  if expected_extras is None:
    assert extras is None
  else:
    assert_bitwise(dict(extras), dict(expected_extras))


def test_init_from_converted_orbax_dir(tmp_path, tiny_space, tiny_variables):
  cli.save_converted(tmp_path / "conv", tiny_variables, tiny_space, EXTRAS)
  _check_loaded(ckpt_lib.load_initial_variables(tmp_path / "conv", tiny_space), tiny_variables,
                EXTRAS)


def test_init_from_training_workdir(tmp_path, tiny_space, tiny_variables):
  state = jax.device_put(steps_lib.init_train_state(tiny_variables, optax.sgd(0.1, momentum=0.9)),
                         replicated(8))
  ck = ckpt_lib.Checkpointer(tmp_path, save_every_steps=1)
  ck.save(1, state, metadata=META, extras=EXTRAS)
  ck.close()
  for path in (tmp_path, tmp_path / "checkpoints"):
    _check_loaded(ckpt_lib.load_initial_variables(path, tiny_space), tiny_variables, EXTRAS)


def test_init_from_pytorch_file(tmp_path, tiny_space, tiny_variables):
  pytest.importorskip("torch")
  from alphanet_jax.convert import torch_io  # noqa: PLC0415
  sd = supernet.jax_to_torch(tiny_variables, tiny_space)
  torch_io.save_state_dict(sd, tmp_path / "tiny.pth.tar", container=True)
  variables, extras = ckpt_lib.load_initial_variables(tmp_path / "tiny.pth.tar", tiny_space)
  assert_bitwise(variables, tiny_variables)
  assert set(extras) == {k for k in sd if "num_batches_tracked" in k or "bn_tracking" in k}


def test_init_from_errors(tmp_path, tiny_space, tiny_variables):
  bad = jax.tree.map(np.copy, tiny_variables)
  name = sorted(bad["params"]["classifier"])[0]
  bad["params"]["classifier"][name] = np.zeros((1, 1), np.float32)
  cli.save_converted(tmp_path / "bad", bad, tiny_space)
  with pytest.raises(CheckpointError, match=f"params.classifier.{name} has shape"):
    ckpt_lib.load_initial_variables(tmp_path / "bad", tiny_space)
  (tmp_path / "weights.npz").write_bytes(b"x")
  with pytest.raises(CheckpointError, match=r"\(a\).*\(b\).*\(c\)"):
    ckpt_lib.load_initial_variables(tmp_path / "weights.npz", tiny_space)
  with pytest.raises(FileNotFoundError):
    ckpt_lib.load_initial_variables(tmp_path / "missing", tiny_space)
