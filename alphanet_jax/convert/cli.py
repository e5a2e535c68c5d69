"""Checkpoint converter: official PyTorch supernet <-> orbax, and orbax -> PyTorch subnets.

  python -m alphanet_jax.convert.cli to-orbax SRC.pth[.tar] DIR [--config configs/tiny.py]
  python -m alphanet_jax.convert.cli to-pytorch DIR OUT.pth [--subnet a4]
      [--family alphanet|attentivenas] [--config ...] [--plain]

`to-orbax` reads a supernet checkpoint (a plain state_dict, or the official container
`{'state_dict': {'module.' + key: ...}, 'args': ..., ...}`, zip or legacy format; nothing in the
file is executed) and writes DIR. `to-pytorch` reads DIR and writes either the whole supernet,
as `{'state_dict': {'module.' + key: tensor}}` with all keys in the original order (the form the
original `load_weights_from_pretrained_models` reads; `--plain` writes the bare state_dict), or,
with `--subnet` (a name such as `a4`, `min`, `max`, an inline JSON config or a .json file), the
static subnet's plain state_dict, which `torch_model.StaticSubnet` and the original static model
load with `load_state_dict`. The search space is `--config`'s (default: AlphaNet's); for
`to-pytorch` without `--config`, the one recorded in DIR.

Orbax layout of DIR: one `orbax.checkpoint.StandardCheckpointer` checkpoint (no step
sub-directories) of the pytree

  {'params': {...}, 'batch_stats': {...},   # the supernet variables, JAX layout, max shapes
   'extras': {...}}                         # only when converted from PyTorch

where `extras` holds every entry the JAX model does not read (`num_batches_tracked`, the
`bn_tracking` buffers) under its PyTorch name split at the dots (e.g.
`extras['first_conv']['bn']['bn_tracking']['0']['running_mean']`), so that writing PyTorch again
is bit-exact. The checkpoint's custom metadata is `{'format': 'alphanet_jax.supernet',
'version': 1, 'supernet_config': ..., 'num_classes': ..., 'source': ...}`. Restore with
`load_converted(DIR)`, or `ocp.StandardCheckpointer().restore(DIR)` and take the keys you need.

Exit status: 0 on success, 1 on a bad input (missing file, foreign checkpoint, mis-shaped key,
unknown subnet), 2 on a usage error; user errors print one line, no traceback.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from alphanet_jax import space as space_lib
from alphanet_jax.convert.torch_io import CheckpointError

FORMAT = "alphanet_jax.supernet"
VERSION = 1


# --------------------------------------------------------------------------- orbax layout
def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for key, value in flat.items():
    node = out
    *parents, leaf = key.split(".")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out: dict[str, Any] = {}
  for k, v in tree.items():
    name = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(_flatten(v, name + "."))
    else:
      out[name] = v
  return out


def _space_metadata(space: space_lib.SearchSpace) -> dict[str, Any]:
  return {"supernet_config": space.to_supernet_config(), "num_classes": space.num_classes}


def save_converted(directory: str | os.PathLike, variables: Mapping[str, Any],
                   space: space_lib.SearchSpace, extras: Mapping[str, Any] | None = None,
                   source: str = "") -> None:
  """Writes supernet variables (and extras) as the orbax checkpoint DIR described above.

  Raises:
    FileExistsError: `directory` exists and is not empty.
  """
  import orbax.checkpoint as ocp  # noqa: PLC0415

  path = pathlib.Path(directory).absolute()
  if path.exists():
    if not path.is_dir() or any(path.iterdir()):
      raise FileExistsError(f"Output {str(directory)!r} already exists; choose a new directory.")
    path.rmdir()  # orbax creates the directory itself
  tree: dict[str, Any] = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
  if extras is not None:
    tree["extras"] = _nest(extras)
  meta = {"format": FORMAT, "version": VERSION, "source": source, **_space_metadata(space)}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, tree, custom_metadata=meta)


def load_converted(directory: str | os.PathLike
                   ) -> tuple[dict[str, Any], dict[str, np.ndarray] | None, dict[str, Any]]:
  """Reads an orbax checkpoint written by `save_converted` (or any with params/batch_stats).

  Returns:
    `(variables, extras or None, custom_metadata)`; arrays are numpy, dtypes as saved.

  Raises:
    FileNotFoundError / CheckpointError: no such directory, or not such a checkpoint.
  """
  import orbax.checkpoint as ocp  # noqa: PLC0415

  path = pathlib.Path(directory).absolute()
  if not path.is_dir():
    raise FileNotFoundError(f"No such checkpoint directory: {str(directory)!r}.")
  if not (path / "_METADATA").is_file():
    raise CheckpointError(f"{str(directory)!r} is not an orbax checkpoint written by "
                          "`to-orbax` (no _METADATA file).")
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(path)
    tree_meta = getattr(meta, "item_metadata", None)
    tree_meta = getattr(tree_meta, "tree", tree_meta)
    # Restore every leaf as numpy, exactly as saved: int64 counters must not go through jax
    # (x64 is off by default and would narrow them to int32).
    target = None
    if isinstance(tree_meta, Mapping):
      import jax  # noqa: PLC0415
      target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), dict(tree_meta))
    tree = ckptr.restore(path, target) if target is not None else ckptr.restore(path)
    custom = dict(getattr(meta, "custom_metadata", None) or {})
  if not isinstance(tree, Mapping) or "params" not in tree or "batch_stats" not in tree:
    raise CheckpointError(f"{str(directory)!r} holds no 'params' / 'batch_stats' tree.")

  def to_np(t):
    return {k: to_np(v) if isinstance(v, Mapping) else np.asarray(v) for k, v in t.items()}

  variables = {"params": to_np(tree["params"]), "batch_stats": to_np(tree["batch_stats"])}
  extras = _flatten(to_np(tree["extras"])) if "extras" in tree else None
  return variables, extras, custom


# --------------------------------------------------------------------------- commands
def _space(config: str | None) -> space_lib.SearchSpace:
  if config is None:
    return space_lib.alphanet_space()
  from alphanet_jax import config_lib  # noqa: PLC0415
  return config_lib.space_from_config(config_lib.load_config(config))


def _to_orbax(args) -> str:
  from alphanet_jax.convert import supernet, torch_io  # noqa: PLC0415
  space = _space(args.config)
  state_dict = torch_io.load_state_dict(args.src)
  variables, extras = supernet.torch_to_jax(state_dict, space)
  save_converted(args.dir, variables, space, extras, source=os.path.abspath(args.src))
  return f"Wrote {args.dir}: {len(state_dict)} PyTorch keys ({len(extras)} kept as extras)."


def _to_pytorch(args) -> str:
  from alphanet_jax.convert import static, supernet, torch_io  # noqa: PLC0415
  from alphanet_jax.models import extract  # noqa: PLC0415
  variables, extras, meta = load_converted(args.dir)
  if args.config is not None:
    space = _space(args.config)
    if "supernet_config" in meta and (_space_metadata(space)
                                      != {k: meta[k] for k in _space_metadata(space)}):
      raise CheckpointError(f"{args.dir!r} was converted for a different search space than "
                            f"{args.config!r} (see its metadata); drop --config or fix it.")
  elif "supernet_config" in meta:
    space = space_lib.SearchSpace.from_supernet_config(meta["supernet_config"],
                                                       int(meta.get("num_classes", 1000)))
  else:
    space = space_lib.alphanet_space()
  out = pathlib.Path(args.out)
  if not out.parent.is_dir():
    raise FileNotFoundError(f"Output directory {str(out.parent)!r} does not exist.")
  if args.subnet is None:
    state_dict = supernet.jax_to_torch(variables, space, extras)
    torch_io.save_state_dict(state_dict, out, container=not args.plain)
    what = "supernet" + (" (regenerated bn_tracking buffers)" if extras is None else "")
  else:
    cfg = space_lib.load_subnet(args.subnet, space, args.family)
    state_dict = static.static_to_torch(extract.extract_subnet(space, cfg, variables), space,
                                        cfg)
    torch_io.save_state_dict(state_dict, out)
    what = f"subnet {args.subnet} ({cfg.to_json()})"
  return f"Wrote {out}: {what}, {len(state_dict)} keys."


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m alphanet_jax.convert.cli",
                                   description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("to-orbax", help="PyTorch supernet checkpoint -> orbax directory")
  p.add_argument("src", help="supernet .pth / .pth.tar (plain state_dict or official container)")
  p.add_argument("dir", help="new orbax checkpoint directory")
  p.add_argument("--config", help="config file naming the search space (default: AlphaNet)")
  p.set_defaults(run=_to_orbax)
  p = sub.add_parser("to-pytorch", help="orbax directory -> PyTorch supernet or static subnet")
  p.add_argument("dir", help="orbax checkpoint directory written by to-orbax")
  p.add_argument("out", help="output .pth file")
  p.add_argument("--subnet", help="write this static subnet instead of the supernet: a name "
                 "(a0..a6, a5_base, min, max), an inline JSON config or a .json file")
  p.add_argument("--family", default="alphanet", choices=sorted(space_lib.FAMILIES),
                 help="which published model zoo --subnet names refer to")
  p.add_argument("--config", help="config file naming the search space (default: the one "
                 "recorded in DIR, else AlphaNet)")
  p.add_argument("--plain", action="store_true", help="supernet: write the bare state_dict "
                 "instead of {'state_dict': {'module.' + key: ...}}")
  p.set_defaults(run=_to_pytorch)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the converter; returns the exit status (0 ok, 1 bad input, 2 usage)."""
  args = _parser().parse_args(argv)
  try:
    message = args.run(args)
  except (CheckpointError, FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
    text = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"error: {text}", file=sys.stderr)
    return 1
  except ImportError as e:
    if e.name != "torch":
      raise
    print("error: the converter needs PyTorch: pip install 'alphanet_jax[torch]'.",
          file=sys.stderr)
    return 1
  print(message)
  return 0


if __name__ == "__main__":
  sys.exit(main())
