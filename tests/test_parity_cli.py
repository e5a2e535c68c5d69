"""The parity tool as users run it: on other directories of the reference format, with other
case names, tolerances and inputs, and its exit codes."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np

from alphanet_jax import parity

from conftest import CACHE_DIR, REPO_ROOT


def _cli(ref_dir, *args):
  env = dict(os.environ, ALPHANET_JAX_CACHE=CACHE_DIR, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "alphanet_jax.parity", str(ref_dir), *args],
                        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_empty_directory_exits_2(tmp_path):
  proc = _cli(tmp_path)
  assert proc.returncode == 2, proc.stdout + proc.stderr
  assert "0 passed, 0 failed" in proc.stdout


def test_other_cases_and_tolerances_drive_the_result(ref_dir, tmp_path):
  """A directory with renamed cases, renamed npz keys and an impossible tolerance: the tool
  follows the files' fields, not names it knows."""
  doc = json.loads((ref_dir / "alpha_loss.json").read_text())
  npz = dict(np.load(ref_dir / "alpha_loss.npz"))
  cases, arrays = [], {}
  for i, case in enumerate(doc["cases"][:3]):
    new = dict(case, name=f"renamed{i}")
    for key in case["keys"]:
      arrays[f"renamed{i}/{key}"] = npz[f"{case['name']}/{key}"]
    cases.append(new)
  cases[2] = dict(cases[2], tolerance={"loss": {"atol": 0.0, "rtol": 0.0},
                                       "grad_student_logits": {"atol": 0.0, "rtol": 0.0}})
  # A perturbed teacher for case 2, so zero tolerance cannot pass by accident.
  arrays["renamed2/loss"] = arrays["renamed2/loss"] + np.float32(1e-3)
  (tmp_path / "my_losses.json").write_text(json.dumps(dict(doc, cases=cases)))
  np.savez(tmp_path / "my_losses.npz", **arrays)
  shutil.copy(ref_dir / "flops.json", tmp_path / "sizes.json")
  (tmp_path / "notes.json").write_text(json.dumps({"hello": 1}))

  report = parity.run(tmp_path, out=open(os.devnull, "w"))
  by_case = {r.case: r for r in report.results}
  assert by_case["renamed0"].passed and by_case["renamed1"].passed
  assert not by_case["renamed2"].passed
  assert sum(r.file == "sizes.json" and r.passed for r in report.results) == 10
  assert ("notes.json", "not a reference format this tool handles") in report.skipped
  assert report.exit_code == 1

  proc = _cli(tmp_path, "--kinds", "loss,flops")
  assert proc.returncode == 1
  lines = proc.stdout.splitlines()
  assert any(line.startswith("FAIL my_losses.json renamed2") for line in lines)
  assert any(line.startswith("PASS sizes.json a4") for line in lines)


def test_bad_kinds_argument(tmp_path):
  proc = _cli(tmp_path, "--kinds", "model,nonsense")
  assert proc.returncode == 2 and "unknown kinds" in proc.stderr
