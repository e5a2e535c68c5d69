"""Training-step parity: replays recorded sandwich iterations of the original code.

Called by `alphanet_jax.parity` for reference files with `steps`, `settings` and
`weights_file` (format of `train_step_ref.json`): the same weights (after the file's
`weights_transform_spec`), images, labels, subnets and hyper-parameters must give the recorded
learning rates, losses, clipped step-0 gradients, per-parameter update norms and final
parameters within the file's tolerances, and leave the parameters that got no gradient exactly
untouched.
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Iterator

import numpy as np

from alphanet_jax.parity import Result, _tol_str, compare


def _loss_settings(doc: dict) -> dict:
  """Label smoothing and the KD loss from `loss_kinds` (e.g. 'label_smoothed_ce_0.1',
  'adaptive_alpha_divergence(-1,1,5) ...', 'kl ...'); recipe defaults otherwise."""
  out = {"label_smoothing": 0.1, "kd_loss": "alpha", "alpha_min": -1.0, "alpha_max": 1.0,
         "iw_clip": 5.0}
  kinds = doc["steps"][0].get("loss_kinds", [])
  if kinds:
    m = re.search(r"label_smoothed_ce_([0-9.]+)", kinds[0])
    if m:
      out["label_smoothing"] = float(m.group(1))
    student = kinds[-1]
    m = re.search(r"adaptive_alpha_divergence\(([-0-9.]+),([-0-9.]+),([-0-9.]+)\)", student)
    if m:
      out.update(alpha_min=float(m.group(1)), alpha_max=float(m.group(2)),
                 iw_clip=float(m.group(3)))
    elif student.lower().startswith("kl"):
      out["kd_loss"] = "kl"
  return out


def _per_tensor(errs: dict) -> str:
  """'N tensors: key=err, ...' with the worst first."""
  ranked = sorted(errs.items(), key=lambda kv: -kv[1][1])
  return f"{len(errs)} tensors: " + ", ".join(f"{k}={e:.2g}" for k, (_, e) in ranked)


def _find_space(path: pathlib.Path, doc: dict, num_classes: int):
  """The space of the weights: from a model reference file naming the same weights file, else
  the AlphaNet space (the converter then checks every shape)."""
  from alphanet_jax import space as space_lib
  for other in sorted(path.parent.glob("*.json")):
    try:
      d = json.loads(other.read_text())
    except (OSError, ValueError):
      continue
    if isinstance(d, dict) and d.get("state_dict_file") == doc["weights_file"] and \
        "supernet_config" in d:
      return space_lib.SearchSpace.from_supernet_config(d["supernet_config"], num_classes)
  return space_lib.alphanet_space(num_classes)


def run_cases(path: pathlib.Path, doc: dict, weights) -> Iterator[Result]:
  import jax
  import jax.numpy as jnp
  import torch

  from alphanet_jax import space as space_lib
  from alphanet_jax import steps as steps_lib
  from alphanet_jax.convert import supernet as convert_supernet
  from alphanet_jax.convert import torch_io

  name = path.name
  try:
    npz = np.load(path.with_suffix(".npz"))
    s = doc["settings"]
    tol = doc["tolerance"]
    weights_path = path.parent / doc["weights_file"]
    num_classes = int(torch_io.load_state_dict(weights_path)[
        "classifier.linear.linear.weight"].shape[0])
    space = _find_space(path, doc, num_classes)
    _, variables = weights.supernet(weights_path, space, doc.get("weights_transform_spec"))
    loss_cfg = _loss_settings(doc)
    step_cfg = steps_lib.StepConfig(
        dropout=float(s.get("dropout", 0.0)), drop_connect=float(s.get("drop_connect", 0.0)),
        bn_group_size=0, **loss_cfg)
    if step_cfg.dropout or step_cfg.drop_connect:
      raise ValueError("recorded steps with dropout/drop-connect depend on the framework RNG")
    tx, schedule = steps_lib.make_optimizer(
        base_lr=float(s["base_lr"]), warmup_steps=int(s["warmup_iters"]),
        total_steps=int(s["max_iters"]), weight_decay=float(s["weight_decay"]),
        grad_clip_value=float(s["grad_clip_value"]), momentum=float(s["momentum"]),
        nesterov=bool(s["nesterov"]), warmup_factor=float(s["warmup_factor"]))
    programs = steps_lib.SandwichPrograms(space, step_cfg, tx)
    state = steps_lib.init_train_state(jax.tree.map(jnp.asarray, variables), tx)
    zero_stats = jax.tree.map(np.zeros_like, variables["batch_stats"])
    to_torch = lambda p: convert_supernet.jax_to_torch(
        {"params": jax.tree.map(np.asarray, p), "batch_stats": zero_stats}, space)
    param_keys = [e.key for e in convert_supernet.supernet_entries(space)
                  if e.collection == "params"]
  except Exception as e:  # noqa: BLE001
    yield Result(name, "setup", False, float("inf"), "-", f"error: {type(e).__name__}: {e}")
    return

  key = jax.random.key(0)   # unused: no dropout / drop-connect in recorded steps
  for rec in doc["steps"]:
    t = int(rec["step"])
    case = f"step{t}"
    try:
      subnets = [space.validate(space_lib.SubnetConfig.from_dict(c)) for c in rec["subnets"]]
      images = jnp.asarray(np.ascontiguousarray(npz["images"][t].transpose(0, 2, 3, 1)))
      labels = jnp.asarray(npz["labels"][t].astype(np.int32))
      before = to_torch(state["params"])

      ok, err = compare(schedule(t), rec["lr"], tol["lr"])
      yield Result(name, f"{case}/lr", ok, err, _tol_str(tol["lr"]))

      # The gradient half first, so the step-0 gradient can be inspected before the update.
      params = state["params"]
      acc, step_losses = steps_lib.sandwich_gradients(programs, state, images, labels, subnets,
                                                      key)
      ok, err = compare(np.array(step_losses), rec["losses"], tol["losses"])
      yield Result(name, f"{case}/losses", ok, err, _tol_str(tol["losses"]))

      clip = float(s["grad_clip_value"])
      if t == 0:
        clipped = to_torch(jax.tree.map(lambda g: jnp.clip(g, -clip, clip), acc))
        errs = {k: compare(clipped[k].numpy(), npz[f"step0_clipped_grad/{k}"],
                           tol["step0_clipped_grad"]) for k in doc["tracked_keys"]}
        yield Result(name, f"{case}/clipped_grad", all(ok for ok, _ in errs.values()),
                     max(e for _, e in errs.values()), _tol_str(tol["step0_clipped_grad"]),
                     _per_tensor(errs))

      used = steps_lib.used_params_mask(space, subnets, params)
      state = programs.update(state, acc, used, jnp.stack(step_losses))
      after = to_torch(state["params"])
      norms = {k: float(np.linalg.norm((after[k].double() - before[k].double()).numpy()))
               for k in param_keys}

      # Parameters without gradient: exactly untouched.
      moved = [k for k in rec["params_without_grad"] if not torch.equal(after[k], before[k])]
      yield Result(name, f"{case}/params_without_grad", not moved,
                   max([norms[k] for k in moved], default=0.0), "exact",
                   f"{len(rec['params_without_grad'])} tensors" + (f"; moved: {moved[:3]}"
                                                                  if moved else ""))
      ul = tol["update_l2"]
      floor = ul.get("only_if_above_fraction_of_max", 0.0) * max(rec["update_l2"].values())
      worst_rel, bad = 0.0, []
      for k, ref_norm in rec["update_l2"].items():
        if ref_norm <= floor:
          continue
        rel = abs(norms[k] - ref_norm) / ref_norm
        worst_rel = max(worst_rel, rel)
        if rel > ul["rtol"]:
          bad.append(k)
      yield Result(name, f"{case}/update_l2", not bad, worst_rel, f"rtol={ul['rtol']:g} (relative)",
                   f"worst: {bad[:3]}" if bad else "")
    except Exception as e:  # noqa: BLE001
      yield Result(name, case, False, float("inf"), "-", f"error: {type(e).__name__}: {e}")
      return

  final = to_torch(state["params"])
  errs = {k: compare(final[k].numpy(), npz[f"final_param/{k}"], tol["final_param"])
          for k in doc["tracked_keys"]}
  yield Result(name, "final_param", all(ok for ok, _ in errs.values()),
               max(e for _, e in errs.values()),
               _tol_str(tol["final_param"]),
               _per_tensor(errs))
