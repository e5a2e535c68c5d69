"""Training-step parity with the original code: three recorded sandwich iterations."""

import io
import json

import pytest

from alphanet_jax import parity, train_parity


@pytest.fixture(scope="module")
def step_results(ref_dir):
  path = ref_dir / "train_step_ref.json"
  results = list(train_parity.run_cases(path, json.loads(path.read_text()), parity._Weights()))
  out = io.StringIO()
  for r in results:
    print(r.line(), file=out)
  print(out.getvalue())
  return {r.case: r for r in results}


def _steps(ref_dir):
  return [s["step"] for s in json.loads((ref_dir / "train_step_ref.json").read_text())["steps"]]


@pytest.mark.parametrize("check", ["lr", "losses", "params_without_grad", "update_l2"])
def test_each_recorded_step(ref_dir, step_results, check):
  for t in _steps(ref_dir):
    r = step_results.get(f"step{t}/{check}")
    assert r is not None, f"step{t}/{check} did not run: {list(step_results)}"
    assert r.passed, r.line()


def test_step0_clipped_gradients(step_results):
  assert step_results["step0/clipped_grad"].passed, step_results["step0/clipped_grad"].line()


def test_final_parameters(step_results):
  assert step_results["final_param"].passed, step_results["final_param"].line()
