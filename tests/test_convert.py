"""PyTorch <-> JAX checkpoint conversion, static export and the pure-PyTorch static subnet.

Checked against ../shared/reference: the supernet state_dict (supernet_ref.pth /
`state_dict_index`), the A0 static export (subnet_export_ref.json) and the logits of
supernet_ref.npz, which the PyTorch `StaticSubnet` fed with our exported weights must reproduce.
"""

import collections
import functools
import json
import os
import pickle
import re
import shlex

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from alphanet_jax import space as space_lib  # noqa: E402
from alphanet_jax.convert import cli, static, supernet, torch_io, torch_model  # noqa: E402
from alphanet_jax.models import extract  # noqa: E402

# ------------------------------------------------------------------ hostile pickles (test-only)
# Classes and functions defined only here. A loader that imported or called them would leave a
# trace in SIDE_EFFECTS (or create a marker file through os.system).
SIDE_EFFECTS = []


def record_side_effect(tag):
  SIDE_EFFECTS.append(tag)
  return tag


class HostilePayload:
  """Unpickling it calls record_side_effect through __reduce__."""

  def __reduce__(self):
    return (record_side_effect, ("__reduce__ ran",))


class SystemPayload:
  """Unpickling it would run a shell command through os.system."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (os.system, (f"touch {shlex.quote(self.marker)}",))


class ForeignConfig(dict):
  """Shaped like AttentiveNAS's utils.config.Config (a dict whose __dict__ is itself)."""

  def __init__(self, d):
    super().__init__(d)
    self.__dict__ = self

  def __setstate__(self, state):
    record_side_effect("__setstate__ ran")
    self.__dict__.update(state)


def official_container(state_dict, marker):
  """The training-checkpoint form of AttentiveNAS utils/saver.py, with hostile `args`."""
  args = ForeignConfig({"lr": 0.8, "sub": ForeignConfig({"k": [3, 5]}),
                        "payload": HostilePayload(), "system": SystemPayload(marker),
                        "raw": b"\x00\x01", "set": {1, 2}})
  return {"epoch": 3, "args": args,
          "state_dict": collections.OrderedDict(("module." + k, v) for k, v in state_dict.items()),
          "optimizer": {"state": {}, "param_groups": [{"lr": 0.8, "params": [0, 1]}]}}


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def space():
  return space_lib.alphanet_space()


@pytest.fixture(scope="session")
def ref_meta(ref_dir):
  with open(ref_dir / "supernet_ref.json") as f:
    return json.load(f)


@pytest.fixture(scope="session")
def ref_state_dict(ref_dir):
  """supernet_ref.pth (97 MB), loaded once per session. Never mutate it."""
  return torch.load(ref_dir / "supernet_ref.pth", weights_only=True, map_location="cpu")


@pytest.fixture(scope="session")
def ref_converted(ref_state_dict, space):
  return supernet.torch_to_jax(ref_state_dict, space)


@pytest.fixture(scope="session")
def ref_npz(ref_dir):
  return np.load(ref_dir / "supernet_ref.npz")


def assert_state_dicts_identical(got, want):
  assert list(got) == list(want)
  for k, v in want.items():
    assert got[k].dtype == v.dtype, k
    assert got[k].shape == v.shape, k
    assert torch.equal(got[k], v), k


def random_variables(shapes, seed=0):
  """Random float32 variables of the given layout; BN variances positive."""
  rng = np.random.default_rng(seed)

  def fill(tree, name=""):
    if isinstance(tree, dict):
      return {k: fill(v, k) for k, v in tree.items()}
    if name in ("var", "scale"):
      return rng.uniform(0.5, 1.5, tree).astype(np.float32)
    return (0.2 * rng.standard_normal(tree)).astype(np.float32)
  return fill(shapes)


# ------------------------------------------------------------------ supernet round trip
def test_supernet_entries_match_state_dict_index(space, ref_meta):
  entries = supernet.supernet_entries(space)
  want = [(e["key"], e["shape"], e["dtype"]) for e in ref_meta["state_dict_index"]]
  assert [(e.key, list(e.shape), e.dtype) for e in entries] == want
  assert len(entries) == 1468
  assert sum(e.collection is None for e in entries) == 666 + 111  # bn_tracking + counters


def test_torch_jax_torch_round_trip_is_bit_exact(ref_state_dict, ref_converted, space):
  variables, extras = ref_converted
  # Layout (SPEC §5.4): HWIO convs, [k, k, 1, C] depthwise, [in, out] Dense.
  p = variables["params"]
  assert p["first_conv"]["conv"]["kernel"].shape == (3, 3, 3, 24)
  assert p["blocks_7"]["depth_conv"]["conv"]["kernel"].shape == (5, 5, 1, 192)
  assert p["blocks_7"]["depth_conv"]["se"]["reduce"]["kernel"].shape == (1, 1, 192, 48)
  assert p["blocks_0"].keys() == {"depth_conv", "point_linear", "shortcut"}  # mb1: no expand
  assert p["classifier"]["kernel"].shape == (1984, 1000)
  assert variables["batch_stats"]["last_conv"]["final_expand_layer"]["bn"]["var"].shape == (1344,)
  np.testing.assert_array_equal(
      p["blocks_7"]["depth_conv"]["conv"]["kernel"][:, :, 0, 5],
      ref_state_dict["blocks.7.mobile_inverted_conv.depth_conv.conv.conv.weight"][5, 0].numpy())
  assert jax.tree.map(np.shape, variables) == supernet.supernet_variable_shapes(space)
  assert all(k.endswith("num_batches_tracked") or ".bn_tracking." in k for k in extras)

  back = supernet.jax_to_torch(variables, space, extras)
  assert_state_dicts_identical(back, ref_state_dict)


def test_jax_to_torch_regenerates_bn_tracking_without_extras(ref_state_dict, ref_converted,
                                                             space):
  back = supernet.jax_to_torch(ref_converted[0], space)
  assert list(back) == list(ref_state_dict)
  for k, v in back.items():
    assert v.shape == ref_state_dict[k].shape and v.dtype == ref_state_dict[k].dtype, k
    if k.endswith("num_batches_tracked"):
      assert v.dtype == torch.int64 and v.item() == 0
    elif ".bn_tracking." in k:
      assert torch.all(v == (1.0 if k.endswith("running_var") else 0.0)), k
    else:
      assert torch.equal(v, ref_state_dict[k]), k


def test_layout_matches_the_flax_model(space, tiny_space):
  """The converter's JAX layout is the one the Flax model initialises (shapes only)."""
  from alphanet_jax.models import network  # noqa: PLC0415
  from alphanet_jax.models import supernet as model  # noqa: PLC0415

  def model_shapes(layout):
    abstract = jax.eval_shape(lambda: model.init_variables(layout))
    return jax.tree.map(lambda x: tuple(x.shape), abstract)

  for sp in (space, tiny_space):
    assert model_shapes(network.supernet_layout(sp)) == supernet.supernet_variable_shapes(sp)
  a6 = space_lib.named_subnet("a6")
  assert (model_shapes(network.static_layout(space, a6))
          == static.static_variable_shapes(space, a6))


# ------------------------------------------------------------------ loading and errors
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_official_container_loads_without_executing_anything(tmp_path, zip_format):
  SIDE_EFFECTS.clear()
  marker = tmp_path / "PWNED"
  sd = collections.OrderedDict([("first.weight", torch.randn(4, 3, 3, 3)),
                                ("first.num_batches_tracked", torch.tensor(7)),
                                ("view", torch.arange(10.0)[2:6])])
  path = tmp_path / "ckpt.pth.tar"
  torch.save(official_container(sd, marker), path, _use_new_zipfile_serialization=zip_format)

  # The payloads are live: plain pickle would run them (shown without the shell command).
  pickle.loads(pickle.dumps(HostilePayload()))
  assert SIDE_EFFECTS == ["__reduce__ ran"]
  SIDE_EFFECTS.clear()
  # The file really references the hostile globals, and PyTorch's own safe loader refuses it,
  # so the restricted fallback is what reads it.
  names = torch_io.pickle_globals(path)
  assert any(n.endswith("ForeignConfig") for n in names)
  assert any(n.endswith("record_side_effect") for n in names)
  assert any(n.endswith(".system") for n in names)
  with pytest.raises(pickle.UnpicklingError):
    torch.load(path, weights_only=True)

  obj = torch_io.load_checkpoint(path)
  assert SIDE_EFFECTS == [] and not marker.exists()
  assert obj["epoch"] == 3
  args = obj["args"]
  assert isinstance(args, torch_io.ForeignObject)
  assert args.foreign_name.endswith("ForeignConfig")
  assert args.items["lr"] == 0.8 and args.items["raw"] == b"\x00\x01"
  assert isinstance(args.items["payload"], torch_io.ForeignObject)  # record_side_effect, uncalled
  assert args.items["system"].foreign_name.endswith(".system")
  assert args.items["system"].args == (f"touch {shlex.quote(str(marker))}",)

  loaded = torch_io.state_dict_from_checkpoint(obj)
  assert_state_dicts_identical(loaded, sd)
  assert_state_dicts_identical(torch_io.load_state_dict(path), sd)
  assert SIDE_EFFECTS == [] and not marker.exists()


def test_plain_and_module_prefixed_state_dicts_load(tmp_path):
  sd = collections.OrderedDict([("a.weight", torch.randn(2, 3)), ("a.bias", torch.randn(2))])
  torch_io.save_state_dict(sd, tmp_path / "plain.pth")
  torch_io.save_state_dict(sd, tmp_path / "container.pth", container=True)
  torch.save(sd, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
  assert_state_dicts_identical(torch_io.load_state_dict(tmp_path / "plain.pth"), sd)
  assert_state_dicts_identical(torch_io.load_state_dict(tmp_path / "legacy.pth"), sd)
  raw = torch.load(tmp_path / "container.pth", weights_only=True)
  assert list(raw["state_dict"]) == ["module.a.weight", "module.a.bias"]
  assert_state_dicts_identical(torch_io.load_state_dict(tmp_path / "container.pth"), sd)


def test_unreadable_and_tensorless_files_give_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="No such checkpoint file"):
    torch_io.load_checkpoint(tmp_path / "missing.pth")
  text = tmp_path / "notes.pth"
  text.write_text("this is not a checkpoint\n")
  with pytest.raises(torch_io.CheckpointError, match="not a readable PyTorch checkpoint"):
    torch_io.load_checkpoint(text)
  torch.save({"epoch": 3, "best_acc": 0.5}, tmp_path / "meta.pth")
  with pytest.raises(torch_io.CheckpointError, match="holds no tensors"):
    torch_io.load_state_dict(tmp_path / "meta.pth")


def test_foreign_missing_and_misshaped_keys_are_named(ref_state_dict, ref_converted, space,
                                                      tiny_space):
  foreign = {"encoder.weight": torch.zeros(3, 3), "decoder.bias": torch.zeros(3)}
  with pytest.raises(torch_io.CheckpointError, match=r"lacks 1468 of 1468.*first_conv\.conv"):
    supernet.torch_to_jax(foreign, space)

  missing = dict(ref_state_dict)
  key = "blocks.5.mobile_inverted_conv.depth_conv.bn.bn.running_var"
  del missing[key]
  with pytest.raises(torch_io.CheckpointError, match=re.escape(key)):
    supernet.torch_to_jax(missing, space)

  misshaped = dict(ref_state_dict)
  misshaped["classifier.linear.linear.weight"] = torch.zeros(10, 1984)
  with pytest.raises(torch_io.CheckpointError,
                     match=r"classifier\.linear\.linear\.weight.*expected shape \[1000, 1984\], "
                           r"got \[10, 1984\]"):
    supernet.torch_to_jax(misshaped, space)

  extra = dict(ref_state_dict)
  extra["blocks.99.shortcut.conv.conv.weight"] = torch.zeros(1)
  with pytest.raises(torch_io.CheckpointError, match=r"unexpected keys: blocks\.99"):
    supernet.torch_to_jax(extra, space)

  # The right checkpoint against the wrong space: the first differing shape is named.
  with pytest.raises(torch_io.CheckpointError,
                     match=r"first_conv\.conv\.conv\.weight.*expected shape \[16, 3, 3, 3\], "
                           r"got \[24, 3, 3, 3\]"):
    supernet.torch_to_jax(ref_state_dict, tiny_space)

  # JAX -> PyTorch: a mis-shaped or missing variable names its path and PyTorch key.
  variables = ref_converted[0]
  bad = {"params": dict(variables["params"]), "batch_stats": variables["batch_stats"]}
  bad["params"]["classifier"] = {"kernel": np.zeros((1000, 1984), np.float32),
                                 "bias": variables["params"]["classifier"]["bias"]}
  with pytest.raises(torch_io.CheckpointError,
                     match=r"params/classifier/kernel \(PyTorch 'classifier\.linear\.linear\."
                           r"weight'\): expected shape \[1984, 1000\], got \[1000, 1984\]"):
    supernet.jax_to_torch(bad, space)
  del bad["params"]["classifier"]
  with pytest.raises(torch_io.CheckpointError, match=r"lack params/classifier/kernel"):
    supernet.jax_to_torch(bad, space)


# ------------------------------------------------------------------ static export
def _apply_slice(tensor, text):
  parts = []
  for part in text.strip("[]").split(","):
    lo, hi = part.split(":")
    parts.append(slice(int(lo) if lo else None, int(hi) if hi else None))
  return tensor[tuple(parts)]


def test_static_export_of_a0_matches_reference(ref_dir, ref_state_dict, ref_converted, space):
  with open(ref_dir / "subnet_export_ref.json") as f:
    export = json.load(f)
  a0 = space_lib.named_subnet("a0")
  assert extract.static_block_map(space, a0) == [
      (0, 0), (1, 2), (2, 3), (3, 4), (4, 7), (5, 8), (6, 9), (7, 13), (8, 14), (9, 15),
      (10, 19), (11, 20), (12, 21), (13, 27), (14, 28), (15, 29), (16, 35)]
  static_vars = extract.extract_subnet(space, a0, ref_converted[0])
  sd = static.static_to_torch(static_vars, space, a0)

  assert [(k, list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in sd.items()] == [
      (e["key"], e["shape"], e["dtype"]) for e in export["keys"]]
  assert sum(v.numel() for k, v in sd.items()
             if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
             ) == export["num_params"]
  for e in export["keys"]:
    got = sd[e["key"]]
    if e["source_key"] is None:  # fresh counters, not copied (SPEC §5.3)
      assert got.dtype == torch.int64 and got.item() == 0, e["key"]
    else:
      want = _apply_slice(ref_state_dict[e["source_key"]], e["slice"])
      assert torch.equal(got, want), e["key"]

  # And back: the static state_dict converts to the same static variables.
  again = static.torch_to_static(sd, space, a0)
  jax.tree.map(np.testing.assert_array_equal, again, jax.tree.map(np.asarray, static_vars))


REFERENCE_CASES = ["a0_export_eval", "a6_eval_static", "rand1_eval_resize224",
                   "a0_calib_eval", "rand0_train"]


@pytest.mark.parametrize("case_id", REFERENCE_CASES)
def test_pytorch_static_subnet_reproduces_reference(case_id, ref_meta, ref_npz, ref_converted,
                                                    space):
  case = next(c for c in ref_meta["cases"] if c["id"] == case_id)
  cfg = space_lib.SubnetConfig.from_dict(case["config"])
  model = torch_model.StaticSubnet(space, cfg)
  state_dict = static.static_to_torch(extract.extract_subnet(space, cfg, ref_converted[0]),
                                      space, cfg)
  assert list(model.state_dict()) == list(state_dict)
  model.load_state_dict(state_dict, strict=True)
  x = torch.from_numpy(ref_npz[case["input_key"]])
  assert (x.shape[-1] != cfg.resolution) == case["resize"]
  with torch.no_grad():
    if case["kind"] == "eval":
      logits = model.eval()(x)
    elif case["kind"] == "train":
      for m in model.modules():  # batch statistics; running stats unchanged (momentum 0)
        if isinstance(m, torch.nn.BatchNorm2d):
          m.momentum = 0.0
      logits = model.train()(x)
    else:  # calib_eval: one cumulative-average calibration batch, then eval (SPEC §3)
      for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
          m.reset_running_stats()
          m.momentum = None
      model.train()(torch.from_numpy(ref_npz[case["calib_key"]]))
      logits = model.eval()(x)
  want = ref_npz[case["output_key"]]
  got = logits.numpy()
  tol = case["tolerance"]
  err = np.abs(got - want)
  assert np.all(err <= tol["atol"] + tol["rtol"] * np.abs(want)), err.max()
  if case["kind"] == "eval":  # eval logits vary little with the input: check the difference too
    np.testing.assert_allclose(got[0] - got[1], want[0] - want[1], rtol=0, atol=tol["atol"])


# ------------------------------------------------------------------ CLI
def test_cli_official_container_round_trip(tmp_path, ref_state_dict, space, capsys):
  src = tmp_path / "alphanet_pretrained.pth.tar"
  marker = tmp_path / "PWNED"
  torch.save(official_container(ref_state_dict, marker), src,
             _use_new_zipfile_serialization=False)
  orbax_dir = tmp_path / "orbax"
  assert cli.main(["to-orbax", str(src), str(orbax_dir)]) == 0
  assert SIDE_EFFECTS == [] and not marker.exists()

  out = tmp_path / "supernet.pth"
  assert cli.main(["to-pytorch", str(orbax_dir), str(out)]) == 0
  raw = torch.load(out, weights_only=True)
  assert list(raw) == ["state_dict"]  # what the original loader reads, 'module.' keys
  assert all(k.startswith("module.") for k in raw["state_dict"])
  assert_state_dicts_identical(torch_io.load_state_dict(out), ref_state_dict)

  plain = tmp_path / "plain.pth"
  assert cli.main(["to-pytorch", str(orbax_dir), str(plain), "--plain"]) == 0
  assert_state_dicts_identical(torch.load(plain, weights_only=True), ref_state_dict)

  sub = tmp_path / "a0.pth"
  assert cli.main(["to-pytorch", str(orbax_dir), str(sub), "--subnet", "a0"]) == 0
  a0 = space_lib.named_subnet("a0")
  want = static.static_to_torch(
      extract.extract_subnet(space, a0, supernet.torch_to_jax(ref_state_dict, space)[0]),
      space, a0)
  assert_state_dicts_identical(torch.load(sub, weights_only=True), want)
  capsys.readouterr()


def test_cli_bad_input_exits_nonzero_without_traceback(tmp_path, ref_state_dict, capsys):
  def run(*argv):
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err

  code, err = run("to-orbax", tmp_path / "missing.pth", tmp_path / "o1")
  assert code == 1 and "No such checkpoint file" in err
  foreign = tmp_path / "foreign.pth"
  torch.save({"encoder.weight": torch.zeros(2, 2)}, foreign)
  code, err = run("to-orbax", foreign, tmp_path / "o2")
  assert code == 1 and "first_conv.conv.conv.weight" in err
  text = tmp_path / "text.pth"
  text.write_text("hello")
  code, err = run("to-orbax", text, tmp_path / "o3")
  assert code == 1 and "not a readable PyTorch checkpoint" in err
  misshaped = dict(ref_state_dict)
  misshaped["first_conv.bn.bn.weight"] = torch.zeros(23)
  torch.save(misshaped, tmp_path / "misshaped.pth")
  code, err = run("to-orbax", tmp_path / "misshaped.pth", tmp_path / "o4")
  assert code == 1 and "first_conv.bn.bn.weight" in err and "[24]" in err and "[23]" in err
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "file").write_text("x")
  code, err = run("to-orbax", foreign, tmp_path / "busy")
  assert code == 1
  code, err = run("to-pytorch", tmp_path / "busy", tmp_path / "x.pth")
  assert code == 1 and "not an orbax checkpoint" in err
  code, err = run("to-pytorch", tmp_path / "nowhere", tmp_path / "x.pth")
  assert code == 1 and "No such checkpoint directory" in err
  with pytest.raises(SystemExit) as exc:
    cli.main(["to-pytorch"])
  assert exc.value.code == 2
  capsys.readouterr()


# ------------------------------------------------------------------ tiny space
def test_tiny_space_round_trip_and_static_subnet(tmp_path, tiny_space, tiny_config, capsys):
  variables = random_variables(supernet.supernet_variable_shapes(tiny_space))
  # jax arrays in, PyTorch out; no extras: bn_tracking and counters regenerated.
  sd = supernet.jax_to_torch(jax.tree.map(jnp.asarray, variables), tiny_space)
  assert list(sd) == [e.key for e in supernet.supernet_entries(tiny_space)]
  assert sd["classifier.linear.linear.weight"].shape == (10, 192)
  assert sd["blocks.13.mobile_inverted_conv.depth_conv.bn.bn_tracking.1.running_var"].eq(1).all()
  back, extras = supernet.torch_to_jax(sd, tiny_space)
  jax.tree.map(np.testing.assert_array_equal, back, variables)
  assert_state_dicts_identical(supernet.jax_to_torch(back, tiny_space, extras), sd)

  # CLI with --config, through the official container in the legacy format.
  config_path = str(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py"))
  src = tmp_path / "tiny.pth.tar"
  torch.save(official_container(sd, tmp_path / "PWNED"), src,
             _use_new_zipfile_serialization=False)
  assert cli.main(["to-orbax", str(src), str(tmp_path / "orbax"), "--config", config_path]) == 0
  assert cli.main(["to-pytorch", str(tmp_path / "orbax"), str(tmp_path / "out.pth")]) == 0
  assert_state_dicts_identical(torch_io.load_state_dict(tmp_path / "out.pth"), sd)
  assert cli.main(["to-pytorch", str(tmp_path / "orbax"), str(tmp_path / "out2.pth"),
                   "--config", config_path]) == 0
  assert_state_dicts_identical(torch_io.load_state_dict(tmp_path / "out2.pth"), sd)
  # Converting with the wrong space is refused with the reason.
  wrong = tmp_path / "alphanet_config.py"
  wrong.write_text("import ml_collections\n\n\ndef get_config(arg=None):\n"
                   "  return ml_collections.ConfigDict({'space': 'alphanet'})\n")
  capsys.readouterr()
  assert cli.main(["to-pytorch", str(tmp_path / "orbax"), str(tmp_path / "x.pth"),
                   "--config", str(wrong)]) == 1
  assert "different search space" in capsys.readouterr().err

  # Static export of a random subnet: numpy and jitted extraction agree, and PyTorch runs it.
  cfg = tiny_space.sample(np.random.default_rng(3))
  static_np = extract.extract_subnet(tiny_space, cfg, variables)
  static_jit = jax.jit(functools.partial(extract.extract_subnet, tiny_space, cfg))(
      jax.tree.map(jnp.asarray, variables))
  jax.tree.map(np.testing.assert_array_equal, static_jit, static_np)
  assert jax.tree.map(np.shape, static_np) == static.static_variable_shapes(tiny_space, cfg)
  static_sd = static.static_to_torch(static_jit, tiny_space, cfg)
  model = torch_model.StaticSubnet(tiny_space, cfg)
  model.load_state_dict(static_sd, strict=True)
  x = torch.randn(2, 3, tiny_config.image_size, tiny_config.image_size)
  with torch.no_grad():
    for mode in (model.eval, model.train):
      logits = mode()(x)
      assert logits.shape == (2, 10) and torch.isfinite(logits).all()
  jax.tree.map(np.testing.assert_array_equal, static.torch_to_static(static_sd, tiny_space, cfg),
               static_np)
