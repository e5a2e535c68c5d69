"""Checks this implementation against a directory of reference vectors from the original code.

  python -m alphanet_jax.parity ../shared/reference

Every JSON file of the directory is recognised by its machine-readable fields, never by its name
or case names:

  * model cases (`cases[*]` with `kind` in eval / calib_eval / train, `model_kind`, `config`,
    `input_key`, `output_key`, `tolerance`, optional `calib_key` and `intermediate_features`;
    the file names its weights in `state_dict_file` and its space in `supernet_config`);
  * loss cases (`cases[*]` with `compare` and `effective_alpha_min`/`effective_alpha_max`);
  * FLOPs rows (`rows[*]` with `config`, plus `compare_fields` and `tolerance`);
  * a static-export key table (`keys[*]` with `source_key` and `slice`);
  * training steps (`steps`, `settings`, `weights_file`): handled by `alphanet_jax.train_parity`
    once it exists, listed as skipped before.

One line per case: PASS/FAIL, file, case, max abs error, tolerance. Exit 0 when at least one case
ran and all passed, 1 when any failed, 2 when nothing could run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import re
import sys
from collections.abc import Callable, Iterator

import numpy as np


@dataclasses.dataclass
class Result:
  file: str
  case: str
  passed: bool
  max_abs_err: float
  tolerance: str
  note: str = ""

  def line(self) -> str:
    status = "PASS" if self.passed else "FAIL"
    note = f"  ({self.note})" if self.note else ""
    return (f"{status} {self.file} {self.case} max_abs_err={self.max_abs_err:.3g} "
            f"tol={self.tolerance}{note}")


@dataclasses.dataclass
class Report:
  results: list[Result] = dataclasses.field(default_factory=list)
  skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)

  @property
  def exit_code(self) -> int:
    if not self.results:
      return 2
    return 0 if all(r.passed for r in self.results) else 1


def _tol_str(tol: dict) -> str:
  return " ".join(f"{k}={v:g}" for k, v in tol.items() if isinstance(v, (int, float)))


def compare(ours, ref, tol: dict) -> tuple[bool, float]:
  """Elementwise |ours - ref| <= atol + rtol * |ref|; NaN in ours fails, NaN==NaN passes."""
  ours = np.asarray(ours, np.float64)
  ref = np.asarray(ref, np.float64)
  if ours.shape != ref.shape:
    return False, float("inf")
  both_nan = np.isnan(ours) & np.isnan(ref)
  diff = np.where(both_nan, 0.0, np.abs(ours - ref))
  bound = tol.get("atol", 0.0) + tol.get("rtol", 0.0) * np.abs(np.nan_to_num(ref))
  ok = bool(np.all(np.nan_to_num(diff, nan=np.inf) <= bound))
  return ok, float(np.nan_to_num(diff, nan=np.inf).max(initial=0.0))


# ------------------------------------------------------------------------------- model cases
class _Weights:
  """Loads and converts a weights file once per (file, space)."""

  def __init__(self):
    self._cache: dict = {}

  def supernet(self, path: pathlib.Path, space, transform: dict | None = None):
    key = (str(path), space, json.dumps(transform, sort_keys=True))
    if key not in self._cache:
      from alphanet_jax.convert import supernet as convert_supernet
      from alphanet_jax.convert import torch_io
      state_dict = torch_io.load_state_dict(path)
      state_dict = apply_weights_transform(state_dict, transform)
      variables, _ = convert_supernet.torch_to_jax(state_dict, space)
      self._cache[key] = (state_dict, variables)
    return self._cache[key]


def apply_weights_transform(state_dict, spec: dict | None):
  """Applies a `weights_transform_spec` ({'multiply': {key: factor}}) to a torch state_dict."""
  if not spec:
    return state_dict
  unknown = set(spec) - {"multiply"}
  if unknown:
    raise ValueError(f"Unsupported weights_transform_spec entries: {sorted(unknown)}.")
  out = dict(state_dict)
  for key, factor in spec.get("multiply", {}).items():
    name = key[len("module."):] if key.startswith("module.") else key
    if name not in out:
      raise KeyError(f"weights_transform_spec names {key!r}, which the weights do not have.")
    out[name] = out[name] * np.float32(factor)   # float32, in place in the original
  return out


def _nhwc(a):
  return np.ascontiguousarray(np.asarray(a, np.float32).transpose(0, 2, 3, 1))


def _feature_name(name: str) -> str | None:
  if name in ("first_conv", "final_expand_layer", "feature_mix_layer"):
    return name
  m = re.match(r"stage(\d+)_", name)
  return f"stage{m.group(1)}" if m else None


def _space_for(doc: dict, num_classes: int):
  from alphanet_jax import space as space_lib
  return space_lib.SearchSpace.from_supernet_config(doc["supernet_config"], num_classes)


def _model_cases(path: pathlib.Path, doc: dict, weights: _Weights) -> Iterator[Result]:
  import jax
  from alphanet_jax import calibrate, masks as masks_lib, models
  from alphanet_jax import space as space_lib
  from alphanet_jax.models import extract

  npz = np.load(path.with_suffix(".npz"))
  weights_file = path.parent / doc["state_dict_file"]
  for case in doc["cases"]:
    name = case.get("id", "?")
    try:
      ref = npz[case["output_key"]]
      space = _space_for(doc, int(ref.shape[-1]))
      cfg = space.validate(space_lib.SubnetConfig.from_dict(case["config"]))
      _, variables = weights.supernet(weights_file, space, doc.get("weights_transform_spec"))
      x = _nhwc(npz[case["input_key"]])
      if bool(case.get("resize", False)) != (x.shape[1] != cfg.resolution):
        raise ValueError(f"'resize' is {case.get('resize')} but the input is {x.shape[1]}px "
                         f"and the resolution {cfg.resolution}")
      if case["model_kind"] == "supernet":
        layout, masks = models.supernet_layout(space), masks_lib.subnet_masks(space, cfg)
        var = variables
      elif case["model_kind"] == "static":
        layout, masks = models.static_layout(space, cfg), None
        var = jax.tree.map(np.asarray, extract.extract_subnet(space, cfg, variables))
      else:
        raise ValueError(f"unknown model_kind {case['model_kind']!r}")
      kind = case["kind"]
      run = lambda v, bn, **kw: models.forward_jit(layout, v, x, masks, resolution=cfg.resolution,
                                                   bn=bn, **kw)
      feats = None
      if kind == "eval":
        logits, feats = run(var, models.BNMode("eval"), return_features=True)
      elif kind == "calib_eval":
        calib = _nhwc(npz[case["calib_key"]])
        var = calibrate.calibrate_bn(layout, var, [calib], masks, resolution=cfg.resolution)
        logits = run(var, models.BNMode("eval"))
      elif kind == "train":
        # Batch statistics over the whole batch (the original's per-GPU batch), no dropout.
        logits = run(var, models.BNMode("train", group_size=0))
      else:
        raise ValueError(f"unknown kind {kind!r}")
      tol = case["tolerance"]
      ok, err = compare(logits, ref, tol)
      note = ""
      if kind == "eval" and ref.shape[0] > 1:
        # Eval logits of most subnets barely depend on the input: check the differences too.
        ok_d, err_d = compare(np.asarray(logits)[0] - np.asarray(logits)[1], ref[0] - ref[1], tol)
        ok, note = ok and ok_d, f"row-difference err {err_d:.3g}"
      yield Result(path.name, name, ok, err, _tol_str(tol), note)
      for fname, spec in (case.get("intermediate_features") or {}).items():
        ours_name = _feature_name(fname)
        fref = npz[spec["key"]]
        if feats is None or ours_name is None or ours_name not in feats:
          yield Result(path.name, f"{name}/{fname}", False, float("inf"),
                       _tol_str(spec["tolerance"]), "feature not produced")
          continue
        f = np.asarray(feats[ours_name])
        f = f.reshape(f.shape[0], 1, 1, -1) if f.ndim == 2 else f
        f = f.transpose(0, 3, 1, 2)[:, :fref.shape[1]]   # NCHW, the subnet's channels
        ok, err = compare(f, fref, spec["tolerance"])
        yield Result(path.name, f"{name}/{fname}", ok, err, _tol_str(spec["tolerance"]))
    except Exception as e:  # noqa: BLE001  (a broken case is a failure, not a crash)
      yield Result(path.name, name, False, float("inf"), "-", f"error: {type(e).__name__}: {e}")


# ------------------------------------------------------------------------------- loss cases
def _loss_cases(path: pathlib.Path, doc: dict) -> Iterator[Result]:
  import jax
  from alphanet_jax import losses

  npz = np.load(path.with_suffix(".npz"))
  for case in doc["cases"]:
    name = case.get("name", case.get("id", "?"))
    try:
      s = npz[f"{name}/student_logits"]
      t = npz[f"{name}/teacher_logits"]
      kw = dict(alpha_min=float(case["effective_alpha_min"]),
                alpha_max=float(case["effective_alpha_max"]), iw_clip=float(case["iw_clip"]))
      reduction = case.get("reduction", "mean")
      fn = jax.jit(lambda s, t: losses.adaptive_alpha_divergence(s, t, reduction=reduction, **kw))
      ours = {"loss": fn(s, t)}
      if reduction == "mean":
        ours["grad_student_logits"] = jax.grad(fn)(s, t)
      worst = (True, 0.0, "")
      for field in case["compare"]:
        if field not in ours:
          raise ValueError(f"cannot compute field {field!r}")
        tol = case["tolerance"][field]
        ok, err = compare(ours[field], npz[f"{name}/{field}"], tol)
        if not ok or err >= worst[1]:
          worst = (worst[0] and ok, err, f"{field}: {_tol_str(tol)}")
      yield Result(path.name, name, worst[0], worst[1], worst[2])
    except Exception as e:  # noqa: BLE001
      yield Result(path.name, name, False, float("inf"), "-", f"error: {type(e).__name__}: {e}")


# ------------------------------------------------------------------------------- FLOPs rows
def _flops_rows(path: pathlib.Path, doc: dict) -> Iterator[Result]:
  from alphanet_jax import flops, space as space_lib

  space = (space_lib.SearchSpace.from_supernet_config(doc["supernet_config"])
           if "supernet_config" in doc else space_lib.alphanet_space())
  for row in doc["rows"]:
    name = row.get("name", "?")
    try:
      res = flops.count(space, space_lib.SubnetConfig.from_dict(row["config"]))
      ours = {"mflops": res.mflops, "params": res.params}
      passed, worst, tol_s = True, 0.0, ""
      for field, ref_field in doc["compare_fields"].items():
        tol = doc["tolerance"][field]
        ok, err = compare(ours[field], row[ref_field], tol)
        passed &= ok
        if err >= worst:
          worst, tol_s = err, f"{field}: {_tol_str(tol)}"
      yield Result(path.name, name, passed, worst, tol_s)
    except Exception as e:  # noqa: BLE001
      yield Result(path.name, name, False, float("inf"), "-", f"error: {type(e).__name__}: {e}")


# ------------------------------------------------------------------------------- export keys
def _parse_slice(text: str) -> tuple[slice, ...]:
  """'[:16,:1,1:4,1:4]' -> (slice(None,16), slice(None,1), slice(1,4), slice(1,4))."""
  out = []
  for part in text.strip()[1:-1].split(","):
    lo, _, hi = part.partition(":")
    out.append(slice(int(lo) if lo else None, int(hi) if hi else None))
  return tuple(out)


def infer_static_config(space, entries: list[dict], resolution: int):
  """The subnet a static state_dict key table describes, read from its shapes and the supernet
  block each static block comes from (`source_key` 'blocks.{b}...')."""
  from alphanet_jax import space as space_lib
  shapes = {e["key"]: e["shape"] for e in entries}
  stage_of = {b: s for s, group in enumerate(space.block_group_info) for b in group}
  blocks: dict[int, int] = {}
  for e in entries:
    m = re.match(r"blocks\.(\d+)\.", e["key"])
    src = re.match(r"blocks\.(\d+)\.", e.get("source_key") or "")
    if m and src:
      blocks[int(m.group(1))] = int(src.group(1))
  depth = [0] * len(space.stages)
  width = [shapes["first_conv.conv.weight"][0]] + [0] * len(space.stages) + [0]
  kernel, expand = [0] * len(space.stages), [0] * len(space.stages)
  for j in sorted(blocks):
    s = stage_of[blocks[j]]
    p = f"blocks.{j}.mobile_inverted_conv."
    mid = shapes[p + "depth_conv.conv.weight"][0]
    cin = shapes.get(p + "inverted_bottleneck.conv.weight", [mid, mid])[1]
    depth[s] += 1
    width[s + 1] = shapes[p + "point_linear.conv.weight"][0]
    kernel[s] = shapes[p + "depth_conv.conv.weight"][-1]
    if depth[s] == 1:
      expand[s] = round(mid / cin)
  width[-1] = shapes["last_conv.2.conv.weight"][0]
  return space.validate(space_lib.SubnetConfig(resolution, width, depth, kernel, expand))


def _export_keys(path: pathlib.Path, doc: dict, weights: _Weights,
                 supernet_doc: tuple[pathlib.Path, dict] | None) -> Iterator[Result]:
  import jax
  from alphanet_jax.convert import static as convert_static
  from alphanet_jax.models import extract

  case = "static_export"
  try:
    if supernet_doc is None:
      raise ValueError("no supernet weights file (a JSON with 'state_dict_file') in the directory")
    sdoc_path, sdoc = supernet_doc
    num_classes = [e["shape"][0] for e in doc["keys"] if e["key"] == "classifier.linear.weight"][0]
    space = _space_for(sdoc, num_classes)
    cfg = infer_static_config(space, doc["keys"], int(doc["resolution"]))
    case = f"static_export[{cfg.to_json()}]"
    torch_sd, variables = weights.supernet(sdoc_path.parent / sdoc["state_dict_file"], space)
    ours = convert_static.static_to_torch(
        jax.tree.map(np.asarray, extract.extract_subnet(space, cfg, variables)), space, cfg)
    problems, worst = [], 0.0
    if list(ours) != [e["key"] for e in doc["keys"]]:
      problems.append("key list or order differs")
    for e in doc["keys"]:
      t = ours.get(e["key"])
      if t is None:
        continue
      if list(t.shape) != list(e["shape"]) or str(t.dtype).replace("torch.", "") != e["dtype"]:
        problems.append(f"{e['key']}: {tuple(t.shape)} {t.dtype} != {e['shape']} {e['dtype']}")
      elif e.get("source_key"):
        src = torch_sd[e["source_key"]].numpy()[_parse_slice(e["slice"])]
        worst = max(worst, float(np.abs(t.numpy().astype(np.float64) - src).max(initial=0)))
    if worst != 0.0:
      problems.append("values differ from the supernet slices")
    yield Result(path.name, case, not problems, worst, "exact", "; ".join(problems[:3]) or
                 f"{len(doc['keys'])} keys, shapes, dtypes and slices equal")
  except Exception as e:  # noqa: BLE001
    yield Result(path.name, case, False, float("inf"), "-", f"error: {type(e).__name__}: {e}")


# ------------------------------------------------------------------------------- driver
def _classify(doc) -> str | None:
  if not isinstance(doc, dict):
    return None
  cases = doc.get("cases")
  if isinstance(cases, list) and cases and isinstance(cases[0], dict):
    if "kind" in cases[0] and "state_dict_file" in doc and "supernet_config" in doc:
      return "model"
    if "compare" in cases[0] and "effective_alpha_min" in cases[0]:
      return "loss"
  if isinstance(doc.get("rows"), list) and "compare_fields" in doc:
    return "flops"
  if isinstance(doc.get("keys"), list) and doc["keys"] and "source_key" in doc["keys"][0]:
    return "export"
  if "steps" in doc and "settings" in doc and "weights_file" in doc:
    return "train_step"
  return None


def _train_step_runner() -> Callable | None:
  try:
    from alphanet_jax import train_parity  # noqa: PLC0415  (arrives with the training engine)
  except ImportError:
    return None
  return train_parity.run_cases


KINDS = ("model", "loss", "flops", "export", "train_step")


def run(ref_dir, *, out=sys.stdout, kinds=KINDS) -> Report:
  """Runs every case of `ref_dir` (of the given file `kinds`), printing one line per case;
  returns the Report."""
  ref_dir = pathlib.Path(ref_dir)
  report = Report()
  if not ref_dir.is_dir():
    report.skipped.append((str(ref_dir), "not a directory"))
    print(f"SKIP {ref_dir}: not a directory", file=out)
    return report
  docs = []
  for path in sorted(ref_dir.glob("*.json")):
    try:
      doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
      report.skipped.append((path.name, f"unreadable JSON: {e}"))
      continue
    docs.append((path, doc, _classify(doc)))
  supernet_doc = next(((p, d) for p, d, k in docs if k == "model"), None)
  weights = _Weights()
  for path, doc, kind in docs:
    if kind is None:
      report.skipped.append((path.name, "not a reference format this tool handles"))
      continue
    if kind not in kinds:
      report.skipped.append((path.name, f"{kind} files not selected"))
      continue
    if kind in ("model", "export", "train_step"):
      try:
        import torch  # noqa: F401,PLC0415
      except ImportError:
        report.skipped.append((path.name, "needs torch to read .pth weights (pip install "
                               "'alphanet_jax[torch]')"))
        continue
    if kind == "model":
      results = _model_cases(path, doc, weights)
    elif kind == "loss":
      results = _loss_cases(path, doc)
    elif kind == "flops":
      results = _flops_rows(path, doc)
    elif kind == "export":
      results = _export_keys(path, doc, weights, supernet_doc)
    else:
      runner = _train_step_runner()
      if runner is None:
        report.skipped.append((path.name, "training-step parity is not implemented yet"))
        continue
      results = runner(path, doc, weights)
    for r in results:
      report.results.append(r)
      print(r.line(), file=out, flush=True)
  for name, why in report.skipped:
    print(f"SKIP {name}: {why}", file=out)
  n_fail = sum(not r.passed for r in report.results)
  print(f"parity: {len(report.results) - n_fail} passed, {n_fail} failed, "
        f"{len(report.skipped)} files skipped", file=out)
  return report


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="alphanet-parity", description=__doc__.split("\n")[0])
  parser.add_argument("ref_dir", help="directory of reference vectors (e.g. ../shared/reference)")
  parser.add_argument("--kinds", default=",".join(KINDS),
                      help=f"comma-separated file kinds to run (default: all of {KINDS})")
  args = parser.parse_args(argv)
  kinds = tuple(k for k in args.kinds.split(",") if k)
  unknown = set(kinds) - set(KINDS)
  if unknown:
    parser.error(f"unknown kinds {sorted(unknown)}; choose from {list(KINDS)}")
  from alphanet_jax import runtime
  runtime.setup_for_parity()
  return run(args.ref_dir, kinds=kinds).exit_code


if __name__ == "__main__":
  sys.exit(main())
