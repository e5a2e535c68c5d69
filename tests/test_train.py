"""The training engine on the tiny space: the sandwich step, usage masks, device-count
invariance, program counts, non-finite handling, and (in subprocesses) resume after SIGKILL,
SIGTERM and two hosts."""

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from alphanet_jax import checkpoint, config_lib, losses, masks as masks_lib, models, sampling
from alphanet_jax import steps as steps_lib, train
from alphanet_jax.models import extract

from conftest import CACHE_DIR, REPO_ROOT

BATCH = 16


def _programs(space, **kw):
  tx, _ = steps_lib.make_optimizer(base_lr=0.1, warmup_steps=2, total_steps=50,
                                   weight_decay=1e-5, grad_clip_value=1.0)
  cfg = steps_lib.StepConfig(dropout=0.0, drop_connect=0.0, bn_group_size=8, **kw)
  return steps_lib.SandwichPrograms(space, cfg, tx), tx


def _batch(space, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(BATCH, 32, 32, 3)), jnp.float32),
          jnp.asarray(rng.integers(0, space.num_classes, BATCH), jnp.int32))


@pytest.fixture(scope="module")
def tiny_setup(tiny_space):
  programs, tx = _programs(tiny_space)
  variables = models.init_variables(models.supernet_layout(tiny_space), 0)
  # Non-zero project-BN gammas, so every block's gradient is non-trivial.
  variables = jax.tree_util.tree_map_with_path(
      lambda p, v: v + 0.5 if "point_linear" in jax.tree_util.keystr(p) and
      "scale" in jax.tree_util.keystr(p) else v, variables)
  # Host copies: the update program donates the state it is given, so every test places its own.
  return programs, tx, jax.tree.map(np.array, variables)


def test_one_step_updates_exactly_the_used_parameters(tiny_space, tiny_setup):
  programs, tx, variables = tiny_setup
  state = steps_lib.init_train_state(variables, tx)
  before = jax.tree.map(np.array, state["params"])
  subnets = sampling.UniformSampler(tiny_space, 0, 4).subnets(0)
  images, labels = _batch(tiny_space)
  state, step_losses = steps_lib.sandwich_step(programs, state, images, labels, subnets,
                                               jax.random.key(0))
  assert np.all(np.isfinite(np.asarray(step_losses)))
  used = steps_lib.used_params_mask(tiny_space, subnets, before)
  flat_used = jax.tree_util.tree_flatten_with_path(used)[0]
  n_changed = 0
  for (path, u), old, new in zip(flat_used, jax.tree.leaves(before),
                                 jax.tree.leaves(state["params"])):
    if u:
      n_changed += int(not np.array_equal(old, np.asarray(new)))
    else:   # e.g. identity-shortcut convs: bitwise untouched, no decay, no momentum
      assert np.array_equal(old, np.asarray(new)), jax.tree_util.keystr(path)
  assert n_changed > 0.9 * sum(int(u) for _, u in flat_used)
  assert int(state["step"]) == 1


def test_sandwich_gradient_is_the_sum_of_separate_subnet_gradients(tiny_space, tiny_setup):
  programs, _, variables = tiny_setup
  images, labels = _batch(tiny_space, seed=1)
  subnets = sampling.UniformSampler(tiny_space, 0, 4).subnets(3)
  params = jax.tree.map(jnp.asarray, variables["params"])
  stats = variables["batch_stats"]
  acc, loss_max, teacher = programs.teacher_grad(params, stats, images, labels, jax.random.key(0))
  acc = jax.tree.map(jnp.copy, acc)
  got = [loss_max]
  for cfg in subnets[1:-1]:
    acc, loss = programs.masked_student_grad(params, acc, images, teacher,
                                             masks_lib.subnet_masks(tiny_space, cfg),
                                             resolution=cfg.resolution)
    got.append(loss)
  acc, loss_min = programs.static_student_grad(params, stats, acc, images, teacher)
  got.append(loss_min)

  # Each subnet on its own, through the masked supernet only.
  layout = models.supernet_layout(tiny_space)
  bn = models.BNMode("train", group_size=8)

  def logits_of(p, cfg):
    return models.forward(layout, {"params": p}, images, masks_lib.subnet_masks(tiny_space, cfg),
                          resolution=cfg.resolution, bn=bn)

  def total(p):
    t_logits = logits_of(p, subnets[0])
    parts = [losses.label_smoothed_cross_entropy(t_logits, labels, 0.1)]
    teacher_ref = jax.lax.stop_gradient(t_logits)
    parts += [losses.adaptive_alpha_divergence(logits_of(p, c), teacher_ref) for c in subnets[1:]]
    return sum(parts), jnp.stack(parts)

  (_, parts), grads = jax.jit(jax.value_and_grad(total, has_aux=True))(params)
  np.testing.assert_allclose(np.asarray(got), np.asarray(parts), rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(acc), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-3)


def test_same_step_on_one_and_on_eight_devices(tiny_space, tiny_setup):
  programs, tx, variables = tiny_setup
  subnets = sampling.UniformSampler(tiny_space, 0, 4).subnets(5)
  images, labels = _batch(tiny_space, seed=2)
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = Mesh(np.array(devices), ("data",))
    rep, dat = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    state = jax.device_put(steps_lib.init_train_state(variables, tx), rep)
    state, step_losses = steps_lib.sandwich_step(
        programs, state, jax.device_put(images, dat), jax.device_put(labels, dat), subnets,
        jax.random.key(0), put=lambda t, rep=rep: jax.device_put(t, rep))
    results.append((np.asarray(step_losses), jax.tree.map(np.asarray, state["params"])))
  np.testing.assert_allclose(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_programs_are_bounded_by_resolutions(tiny_space):
  programs, tx = _programs(tiny_space)
  state = steps_lib.init_train_state(
      models.init_variables(models.supernet_layout(tiny_space), 0), tx)
  sampler = sampling.UniformSampler(tiny_space, 1, 4)
  images, labels = _batch(tiny_space)
  for step in range(200):
    state, _ = steps_lib.sandwich_step(programs, state, images, labels, sampler.subnets(step),
                                       jax.random.key(step))
  jax.block_until_ready(state)
  fns = (programs.teacher_grad, programs.static_student_grad, programs.masked_student_grad,
         programs.update)
  n_programs = sum(f._cache_size() for f in fns)
  assert programs.masked_student_grad._cache_size() <= len(tiny_space.resolutions)
  assert n_programs <= 2 * len(tiny_space.resolutions) + 2, n_programs


def test_lr_schedule_matches_the_original_table():
  # SPEC §6.5: I = 625, W = 3,125, T = 225,000, base 0.8.
  sched = steps_lib.warmup_cosine(0.8, 3125, 225000)
  for t, lr in [(0, 8.0e-4), (1, 1.05574e-3), (3124, 0.799364), (3125, 0.799619),
                (56250, 0.682843), (112500, 0.4), (168750, 0.117157)]:
    np.testing.assert_allclose(float(sched(t)), lr, rtol=2e-5)
  assert 0 <= float(sched(224999)) < 1e-8
  assert float(sched(300000)) == 0.0


def test_weight_decay_mask_follows_pytorch_names(tiny_space):
  params = models.init_variables(models.supernet_layout(tiny_space), 0)["params"]
  mask = steps_lib.weight_decay_mask(params)
  assert mask["first_conv"]["conv"]["kernel"] and not mask["first_conv"]["bn"]["scale"]
  assert mask["blocks_4"]["depth_conv"]["se"]["reduce"]["kernel"]
  assert not mask["blocks_4"]["depth_conv"]["se"]["reduce"]["bias"]
  assert mask["blocks_4"]["shortcut"]["conv"]["kernel"]
  assert mask["classifier"]["kernel"] and not mask["classifier"]["bias"]


# ------------------------------------------------------------------------------ the loop
def _tiny_config(**overrides):
  c = config_lib.load_config(str(REPO_ROOT / "configs" / "tiny.py"))
  c.dataset = "synthetic"
  c.batch_size = BATCH
  c.log_every_steps = 2
  c.checkpoint_every_steps = 2
  c.total_steps = 6
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def test_nonfinite_loss_stops_naming_step_and_subnet(tmp_path):
  config = _tiny_config(base_lr=1e12, warmup_epochs=0, checkpoint_every_steps=1,
                        log_every_steps=1, total_steps=20)
  with pytest.raises(train.NonFiniteLossError, match=r"step (\d+) in subnet #\d") as info:
    train.run(config, str(tmp_path))
  bad_step = int(re.search(r"step (\d+)", str(info.value)).group(1))
  saved = checkpoint.Checkpointer(tmp_path, save_every_steps=1).all_steps()
  assert all(s <= bad_step for s in saved), (saved, bad_step)   # nothing after the bad step
  state = checkpoint.load_initial_variables(str(tmp_path), config_lib.space_from_config(config))
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state[0]))


def test_bad_config_gives_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="not divisible by bn_group_size"):
    train.run(_tiny_config(batch_size=12), str(tmp_path))
  with pytest.raises(ValueError, match="unknown stages"):
    train.run(_tiny_config(stages=("train", "dance")), str(tmp_path))


def _main_cmd(workdir, *extra, steps=6, every=2):
  return [sys.executable, "-m", "alphanet_jax.main", "--config", "configs/tiny.py",
          "--workdir", str(workdir), "--config.dataset=synthetic",
          f"--config.batch_size={BATCH}", f"--config.total_steps={steps}",
          f"--config.checkpoint_every_steps={every}", "--config.log_every_steps=1", *extra]


def _env(devices=8):
  env = dict(os.environ, ALPHANET_JAX_CACHE=CACHE_DIR, JAX_PLATFORMS="cpu",
             TF_CPP_MIN_LOG_LEVEL="2")
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _run(cmd, env, timeout=900):
  proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _summary(workdir):
  return json.loads((pathlib.Path(workdir) / "summary.json").read_text())


def _wait_for(predicate, proc, timeout=900):
  t0 = time.time()
  while not predicate():
    assert proc.poll() is None, proc.stderr.read()[-3000:] if proc.stderr else "exited"
    assert time.time() - t0 < timeout, "timed out"
    time.sleep(0.2)


def test_resume_after_sigkill_is_bitwise_exact(tmp_path):
  env = _env()
  _run(_main_cmd(tmp_path / "straight", steps=8, every=4), env)
  resumed = tmp_path / "resumed"
  proc = subprocess.Popen(_main_cmd(resumed, steps=8, every=4), cwd=REPO_ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    _wait_for(lambda: (resumed / "checkpoints" / "4" / "commit_success.txt").exists(), proc)
    proc.kill()   # SIGKILL right after the step-4 checkpoint is committed
  finally:
    proc.wait()
  assert not (resumed / "summary.json").exists()
  _run(_main_cmd(resumed, steps=8, every=4), env)
  assert _summary(resumed)["step"] == 8
  assert _summary(resumed)["params_sha256"] == _summary(tmp_path / "straight")["params_sha256"]


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
  proc = subprocess.Popen(_main_cmd(tmp_path, steps=100000, every=100000), cwd=REPO_ROOT,
                          env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
  lines = []
  try:
    for line in proc.stderr:   # wait until steps are running
      lines.append(line)
      if "train/loss_max" in line:
        break
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=300)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, "".join(lines)[-2000:] + rest[-2000:]
  summary = _summary(tmp_path)
  assert summary["status"] == "preempted" and summary["step"] > 0
  assert checkpoint.Checkpointer(tmp_path, save_every_steps=100000).latest_step() == \
      summary["step"]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
  one = tmp_path / "one"
  _run(_main_cmd(one, steps=2, every=2), _env(devices=4))
  two = tmp_path / "two"
  # gloo's rendezvous deadline (30 s, not configurable in jax 0.10.2) can expire when one
  # process finishes compiling a program much later than the other on a loaded CI machine.
  # A second attempt finds every program in the compile cache the first one filled.
  for attempt in range(2):
    shutil.rmtree(two, ignore_errors=True)
    port = _free_port()
    procs = [subprocess.Popen(
        _main_cmd(two, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                  f"--process_id={i}", steps=2, every=2),
        cwd=REPO_ROOT, env=_env(devices=2), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True) for i in range(2)]
    errs = [p.communicate(timeout=900)[1] for p in procs]
    ok = all(p.returncode == 0 for p in procs)
    if ok or not any("Gloo context initialization failed" in e for e in errs):
      break
  assert ok, errs[0][-2000:] + errs[1][-2000:]
  a, b = _summary(one), _summary(two)
  assert a["step"] == b["step"] == 2
  for role in ("max", "min", "random"):
    np.testing.assert_allclose(a["losses"][role], b["losses"][role], rtol=1e-5)
  space = config_lib.space_from_config(_tiny_config())
  va, _ = checkpoint.load_initial_variables(str(one), space)
  vb, _ = checkpoint.load_initial_variables(str(two), space)
  for x, y in zip(jax.tree.leaves(va), jax.tree.leaves(vb)):
    np.testing.assert_allclose(x, y, atol=1e-5)
