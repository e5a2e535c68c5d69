"""MACs and parameter counts against reference/flops.json (the original's counters), and the CLI."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from alphanet_jax import flops
from alphanet_jax import space as space_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_CONFIG = str(REPO_ROOT / "configs" / "tiny.py")


@pytest.fixture(scope="module")
def flops_ref(ref_dir):
  with open(ref_dir / "flops.json") as f:
    return json.load(f)


@pytest.fixture(scope="module")
def alphanet():
  return space_lib.alphanet_space()


def _within(ours, ref, tol):
  return abs(ours - ref) <= tol["atol"] + tol["rtol"] * abs(ref)


# ------------------------------------------------------------------------------ reference rows
def test_every_reference_row(flops_ref, alphanet):
  """MFLOPs within the file's tolerance of the hook counter, params exact, on every row."""
  tol = flops_ref["tolerance"]
  fields = flops_ref["compare_fields"]
  assert len(flops_ref["rows"]) >= 10
  failures = []
  for row in flops_ref["rows"]:
    result = flops.count(alphanet, space_lib.SubnetConfig.from_dict(row["config"]))
    checks = {
        "mflops": (result.mflops, row[fields["mflops"]], _within(result.mflops,
                                                                 row[fields["mflops"]],
                                                                 tol["mflops"])),
        "params": (result.params, row[fields["params"]], _within(result.params,
                                                                 row[fields["params"]],
                                                                 tol["params"])),
        # Integer counts: exactly, also the ones the compare fields do not name.
        "params_exact": (result.params, row["params_exact"],
                         result.params == row["params_exact"]),
        "params_excluding": (result.params_excluding_unused_shortcuts,
                             row["params_excluding_unused_shortcut_convs"],
                             result.params_excluding_unused_shortcuts
                             == row["params_excluding_unused_shortcut_convs"]),
        "unused_shortcuts": (result.params - result.params_excluding_unused_shortcuts,
                             row["params_unused_identity_shortcut_convs"],
                             result.params - result.params_excluding_unused_shortcuts
                             == row["params_unused_identity_shortcut_convs"]),
        "mparams": (result.mparams, row["mparams_count_net_flops_and_params"],
                    abs(result.mparams - row["mparams_count_net_flops_and_params"]) < 1e-9),
        # The analytic formula is exact integer arithmetic, as ours.
        "mflops_analytic": (result.mflops, row["mflops_compute_active_subnet_flops"],
                            abs(result.mflops - row["mflops_compute_active_subnet_flops"]) < 1e-9),
    }
    failures += [f"{row['name']}.{k}: ours {o} ref {r}"
                 for k, (o, r, ok) in checks.items() if not ok]
  assert not failures, "\n".join(failures)


def test_hook_counter_gap_is_float32_accumulation(flops_ref, alphanet):
  """The hook column differs from the exact MACs by up to 1.3e-4 M: it sums per-module MACs in
  float32. Summing our breakdown the same way reproduces it exactly, which also checks the
  breakdown's per-layer MACs and their forward order."""
  for row in flops_ref["rows"]:
    result = flops.count(alphanet, row["config"])
    total = np.float32(0)
    for layer in result.layers:
      if layer.runs:
        total = np.float32(total + np.float32(layer.macs))
    assert float(total) / 1e6 == pytest.approx(row["mflops_count_net_flops_and_params"],
                                                abs=1e-12), row["name"]


def test_supernet_total(flops_ref, alphanet):
  assert flops.supernet_params(alphanet) == flops_ref["supernet_total_params"] == 23_934_704
  # The max subnet's static model has exactly the supernet's shapes.
  assert flops.count(alphanet, alphanet.max_subnet()).params == flops.supernet_params(alphanet)


def test_attentivenas_a5(alphanet):
  result = flops.count(alphanet, space_lib.named_subnet("a5", "attentivenas"))
  assert result.mflops == pytest.approx(490.52, abs=0.01)  # SPEC.md §11.2


def test_breakdown_matches_static_export_keys(ref_dir, alphanet):
  """Per-module params of A0 equal the exported static state_dict's shapes, module by module."""
  with open(ref_dir / "subnet_export_ref.json") as f:
    export = json.load(f)
  expected = {}
  for entry in export["keys"]:
    module, _, leaf = entry["key"].rpartition(".")
    if leaf not in ("weight", "bias"):
      continue  # running statistics and counters are buffers, not parameters
    for suffix in (".conv", ".bn", ".linear"):  # the static wrappers inside each counted module
      if module.endswith(suffix):
        module = module[:-len(suffix)]
    expected[module] = expected.get(module, 0) + int(np.prod(entry["shape"]))
  result = flops.count(alphanet, space_lib.named_subnet("a0"))
  assert {layer.name: layer.params for layer in result.layers} == expected
  assert result.params == export["num_params"]


# ------------------------------------------------------------------------------ other spaces
def test_tiny_space_odd_sizes(tiny_space):
  """Resolution 24 halves to 12, 6, 3, then rounds up: 2, 1."""
  cfg = tiny_space.min_subnet()
  assert cfg.resolution == 24 and cfg.depth == (1,) * 7
  result = flops.count(tiny_space, cfg)
  sizes = {layer.name: layer.out_size_px for layer in result.layers}
  assert sizes["first_conv"] == 12
  per_block = [sizes[f"blocks.{j}.mobile_inverted_conv.point_linear"] for j in range(7)]
  assert per_block == [12, 6, 3, 2, 2, 1, 1]
  assert sizes["last_conv.0"] == 1

  # Hand count of this subnet: widths 8,8,16,24,32,40,48,56,128; k 3; e 1,3,3,3,3,4,4; 10 classes.
  def block(cin, cout, e, h_in, h_out, se):
    mid = cin * e
    macs = (cin * mid * h_in**2 if e != 1 else 0) + mid * 9 * h_out**2 + mid * cout * h_out**2
    params = (cin * mid + 2 * mid if e != 1 else 0) + mid * 9 + 2 * mid + mid * cout + 2 * cout
    if se:
      s = space_lib.se_channels(mid)
      macs += 2 * mid * s
      params += 2 * mid * s + s + mid
    if cin != cout:
      macs += cin * cout * h_out**2
    return macs, params + cin * cout

  blocks = [block(8, 8, 1, 12, 12, False), block(8, 16, 3, 12, 6, False),
            block(16, 24, 3, 6, 3, True), block(24, 32, 3, 3, 2, False),
            block(32, 40, 3, 2, 2, True), block(40, 48, 4, 2, 1, True),
            block(48, 56, 4, 1, 1, True)]
  stem = (3 * 8 * 9 * 12**2, 3 * 8 * 9 + 16)
  head = (56 * 336 * 1 + 336 * 128 + 128 * 10, 56 * 336 + 2 * 336 + 336 * 128 + 128 * 10 + 10)
  assert result.macs == stem[0] + sum(m for m, _ in blocks) + head[0]
  assert result.params == stem[1] + sum(p for _, p in blocks) + head[1]
  # Only mb1's shortcut is an identity here: 8 x 8.
  assert result.params - result.params_excluding_unused_shortcuts == 64


def test_tiny_supernet_equals_max_subnet(tiny_space):
  assert (flops.supernet_params(tiny_space)
          == flops.count(tiny_space, tiny_space.max_subnet()).params)


@pytest.mark.parametrize("in_size, kernel, stride, out_size",
                         [(224, 3, 2, 112), (7, 3, 2, 4), (7, 5, 2, 4), (3, 5, 2, 2), (2, 3, 2, 1),
                          (1, 5, 2, 1), (9, 5, 1, 9)])
def test_conv_out_size(in_size, kernel, stride, out_size):
  assert flops.conv_out_size(in_size, kernel, stride) == out_size


# ------------------------------------------------------------------------------ errors
def test_count_rejects_out_of_space(alphanet):
  bad = space_lib.named_subnet("a0").replace(kernel_size=(3, 3, 3, 7, 3, 3, 3))
  with pytest.raises(ValueError, match=r"kernel_size\[3\]"):
    flops.count(alphanet, bad)
  with pytest.raises(ValueError, match="keys"):
    flops.count(alphanet, {"resolution": 192})


def test_count_accepts_dict(alphanet):
  cfg = space_lib.named_subnet("a2")
  assert flops.count(alphanet, cfg.to_dict()) == flops.count(alphanet, cfg)


# ------------------------------------------------------------------------------ CLI
def _run(capsys, *argv):
  code = flops.main(list(argv))
  out, err = capsys.readouterr()
  return code, out, err


def test_cli_json_every_row(capsys, flops_ref):
  tol = flops_ref["tolerance"]
  for row in flops_ref["rows"]:
    code, out, err = _run(capsys, row["name"], "--json")
    assert code == 0, err
    got = json.loads(out)
    assert got["config"] == row["config"], row["name"]
    assert _within(got["mflops"], row["mflops_count_net_flops_and_params"], tol["mflops"])
    assert got["params"] == row["params_exact"]
    assert got["params_excluding_unused_shortcuts"] == row["params_excluding_unused_shortcut_convs"]


def test_cli_readable_line(capsys):
  code, out, _ = _run(capsys, "a0")
  assert code == 0
  assert out.strip() == ("a0: resolution 192, 203.390 MFLOPs, 9.0646 M params "
                         "(8.9542 M without unused shortcut convs)")
  code, out, _ = _run(capsys, "a5", "--family", "attentivenas")
  assert code == 0 and "490.520 MFLOPs" in out
  code, out, _ = _run(capsys, "a5_base", "--layers")
  assert code == 0 and "594.786 MFLOPs" in out and "(never runs)" in out
  assert "blocks.0.shortcut" in out and "classifier" in out


def test_cli_inline_json_and_file(capsys, tmp_path, flops_ref):
  row = flops_ref["rows"][-1]
  code, out, _ = _run(capsys, json.dumps(row["config"]), "--json")
  assert code == 0 and json.loads(out)["params"] == row["params_exact"]
  for name in ("cfg.json", "cfg.txt"):
    path = tmp_path / name
    path.write_text(json.dumps(row["config"]))
    code, out, _ = _run(capsys, str(path), "--json")
    assert code == 0 and json.loads(out)["params"] == row["params_exact"], name


def test_cli_tiny_config(capsys, tiny_space):
  code, out, err = _run(capsys, "min", "--config", TINY_CONFIG, "--json")
  assert code == 0, err
  got = json.loads(out)
  assert got["resolution"] == 24
  assert got["params"] == flops.count(tiny_space, tiny_space.min_subnet()).params


@pytest.mark.parametrize("argv, message", [
    (["a9"], "Unknown alphanet subnet 'a9'"),
    (["a5_1", "--family", "attentivenas"], "Unknown attentivenas subnet"),
    (['{"resolution": 200, "width": [16,16,24,32,64,112,192,216,1792], "depth": [1,3,3,3,3,3,1],'
      ' "kernel_size": [3,3,3,3,3,3,3], "expand_ratio": [1,4,4,4,4,6,6]}'],
     "'resolution' = 200 is outside the search space"),
    (['{"resolution": 192}'], "needs exactly the keys"),
    (["{not json"], "error:"),
    (["missing_subnet.json"], "No such file"),
    (["a0", "--config", "no/such/config.py"], "does not exist"),
    (["max", "--config", TINY_CONFIG, "--family", "alphanet"], None),  # valid: control case
])
def test_cli_errors(capsys, argv, message):
  code, out, err = _run(capsys, *argv)
  if message is None:
    assert code == 0
    return
  assert code == 2 and out == ""
  assert message in err and "Traceback" not in err


def test_cli_out_of_space_for_tiny(capsys):
  # A0 is an AlphaNet config: the tiny space must reject it by name, not crash.
  code, _, err = _run(capsys, "a0", "--config", TINY_CONFIG)
  assert code == 2 and "outside the search space" in err


def test_cli_usage_errors(capsys):
  code, _, err = _run(capsys, "a0", "--family", "ofa")
  assert code == 2 and "invalid choice" in err
  code, _, _ = _run(capsys)
  assert code == 2
  code, out, _ = _run(capsys, "--help")
  assert code == 0 and "MFLOPs" in out


def test_module_entry_point():
  """`python -m alphanet_jax.flops` runs and reports errors without a traceback."""
  ok = subprocess.run([sys.executable, "-m", "alphanet_jax.flops", "a4"], cwd=REPO_ROOT,
                      capture_output=True, text=True, check=False)
  assert ok.returncode == 0 and "443.531 MFLOPs" in ok.stdout
  bad = subprocess.run([sys.executable, "-m", "alphanet_jax.flops", "a42"], cwd=REPO_ROOT,
                       capture_output=True, text=True, check=False)
  assert bad.returncode == 2 and "Traceback" not in bad.stderr and "a42" in bad.stderr
