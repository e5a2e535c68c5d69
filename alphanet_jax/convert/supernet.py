"""Supernet variables <-> the original PyTorch supernet state_dict (SPEC.md §5.1, §5.4).

The JAX tree stores the same max-shaped tensors as the PyTorch module, so conversion is a name
table plus transposes:

  conv       OIHW  [O, I, kh, kw] <-> HWIO [kh, kw, I, O]  (axes 2,3,1,0); depthwise
             [C, 1, k, k] <-> [k, k, 1, C] is the same transpose
  linear     [out, in] <-> Dense kernel [in, out]
  BN         weight, bias -> params {scale, bias}; running_mean, running_var -> batch_stats
             {mean, var}

Entries the JAX model never reads (every `num_batches_tracked` and the 666 `bn_tracking.{0,1}.*`
buffers, SPEC §5.1) are returned by `torch_to_jax` as `extras` (numpy arrays keyed by PyTorch
name) so PyTorch -> JAX -> PyTorch is bit-exact; `jax_to_torch` writes them back, or regenerates
them as a freshly built module holds them (running_mean 0, running_var 1, counters int64 0) when
no extras are given, e.g. for a supernet trained in JAX.

All shapes derive from the `SearchSpace`, so any space (the tiny demo space, another
`num_classes`) converts the same way. torch is imported only inside functions.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from alphanet_jax import space as space_lib
from alphanet_jax.convert.torch_io import CheckpointError

# Layout transposes, PyTorch -> JAX and back (SPEC §5.4).
_TO_JAX = {"conv": (2, 3, 1, 0), "linear": (1, 0)}
_TO_TORCH = {"conv": (3, 2, 0, 1), "linear": (1, 0)}


@dataclasses.dataclass(frozen=True)
class Entry:
  """One PyTorch state_dict entry and where it lives in the JAX tree.

  Attributes:
    key: PyTorch name (no `module.` prefix).
    shape: PyTorch shape.
    dtype: 'float32' or 'int64'.
    collection: 'params', 'batch_stats', or None for an entry JAX does not use (an extra).
    path: path inside the collection, e.g. ('blocks_3', 'depth_conv', 'bn', 'scale').
    layout: 'conv', 'linear' or 'vector' (no transpose).
  """
  key: str
  shape: tuple[int, ...]
  dtype: str = "float32"
  collection: str | None = None
  path: tuple[str, ...] = ()
  layout: str = "vector"

  @property
  def jax_shape(self) -> tuple[int, ...]:
    perm = _TO_JAX.get(self.layout)
    return self.shape if perm is None else tuple(self.shape[a] for a in perm)

  @property
  def jax_name(self) -> str:
    return "/".join((self.collection or "extras",) + self.path)


@dataclasses.dataclass(frozen=True)
class NetBlock:
  """Shapes of one block as stored (max shapes in the supernet, real ones in a subnet)."""
  index: int       # b for the supernet, j for a static subnet
  cin: int
  mid: int
  cout: int
  se: int
  kernel: int
  has_expand: bool


@dataclasses.dataclass(frozen=True)
class NetShape:
  """Everything `build_entries` needs: stem, blocks and head widths."""
  stem: int
  blocks: tuple[NetBlock, ...]
  final_expand_in: int
  final_expand: int
  feature_mix: int
  num_classes: int


# ----------------------------------------------------------------------------- name table
def _conv(prefix: str, path: tuple[str, ...], o: int, i: int, k: int, wrapped: bool) -> Entry:
  # Supernet dynamic convs wrap an nn.Conv2d as `.conv.conv`; static ones are plain `.conv`.
  key = f"{prefix}.conv.conv.weight" if wrapped else f"{prefix}.conv.weight"
  return Entry(key, (o, i, k, k), "float32", "params", path + ("conv", "kernel"), "conv")


def _bn(prefix: str, path: tuple[str, ...], c: int, supernet: bool) -> list[Entry]:
  """BN₁₁ for the supernet (bn.bn.* then bn.bn_tracking.{0,1}.*), 5 keys for a static BN."""
  bn = f"{prefix}.bn.bn" if supernet else f"{prefix}.bn"
  out = [Entry(f"{bn}.weight", (c,), "float32", "params", path + ("bn", "scale")),
         Entry(f"{bn}.bias", (c,), "float32", "params", path + ("bn", "bias")),
         Entry(f"{bn}.running_mean", (c,), "float32", "batch_stats", path + ("bn", "mean")),
         Entry(f"{bn}.running_var", (c,), "float32", "batch_stats", path + ("bn", "var")),
         Entry(f"{bn}.num_batches_tracked", (), "int64")]
  if supernet:
    # Two affine-free BNs per dynamic BN that the forward never runs (SPEC §5.1,
    # AttentiveNAS issue #2); the original loader still reads them.
    for t in (0, 1):
      out += [Entry(f"{prefix}.bn.bn_tracking.{t}.running_mean", (c,)),
              Entry(f"{prefix}.bn.bn_tracking.{t}.running_var", (c,)),
              Entry(f"{prefix}.bn.bn_tracking.{t}.num_batches_tracked", (), "int64")]
  return out


def build_entries(net: NetShape, supernet: bool) -> list[Entry]:
  """All entries in the order the PyTorch module's state_dict() emits them (SPEC §5.1, §5.3).

  Args:
    net: the stored shapes.
    supernet: the dynamic supernet's names (`.conv.conv`, `.bn.bn`, `bn_tracking`, named head
      layers) or the static model's (`.conv`, `.bn`, `last_conv.0` / `last_conv.2`).
  """
  out = [_conv("first_conv", ("first_conv",), net.stem, 3, 3, supernet)]
  out += _bn("first_conv", ("first_conv",), net.stem, supernet)
  for blk in net.blocks:
    name, root = f"blocks.{blk.index}.mobile_inverted_conv", (f"blocks_{blk.index}",)
    if blk.has_expand:
      p, q = f"{name}.inverted_bottleneck", root + ("inverted_bottleneck",)
      out += [_conv(p, q, blk.mid, blk.cin, 1, supernet)] + _bn(p, q, blk.mid, supernet)
    p, q = f"{name}.depth_conv", root + ("depth_conv",)
    out += [_conv(p, q, blk.mid, 1, blk.kernel, supernet)] + _bn(p, q, blk.mid, supernet)
    if blk.se:
      # SE sits inside depth_conv, after its BN; both 1x1 convs have biases (SPEC §2.3).
      for fc, o, i in (("reduce", blk.se, blk.mid), ("expand", blk.mid, blk.se)):
        out += [Entry(f"{p}.se.fc.{fc}.weight", (o, i, 1, 1), "float32", "params",
                      q + ("se", fc, "kernel"), "conv"),
                Entry(f"{p}.se.fc.{fc}.bias", (o,), "float32", "params", q + ("se", fc, "bias"))]
    p, q = f"{name}.point_linear", root + ("point_linear",)
    out += [_conv(p, q, blk.cout, blk.mid, 1, supernet)] + _bn(p, q, blk.cout, supernet)
    # Every block stores a shortcut conv, also the identity ones that never run (SPEC §5.1).
    out.append(_conv(f"blocks.{blk.index}.shortcut", root + ("shortcut",), blk.cout, blk.cin, 1,
                     supernet))
  fe_name = "last_conv.final_expand_layer" if supernet else "last_conv.0"
  fm_name = "last_conv.feature_mix_layer" if supernet else "last_conv.2"  # 1 is the pool
  fe_path, fm_path = ("last_conv", "final_expand_layer"), ("last_conv", "feature_mix_layer")
  out.append(_conv(fe_name, fe_path, net.final_expand, net.final_expand_in, 1, supernet))
  out += _bn(fe_name, fe_path, net.final_expand, supernet)
  # feature_mix has no BN and no bias (SPEC §2.5).
  out.append(_conv(fm_name, fm_path, net.feature_mix, net.final_expand, 1, supernet))
  lin = "classifier.linear.linear" if supernet else "classifier.linear"
  out += [Entry(f"{lin}.weight", (net.num_classes, net.feature_mix), "float32", "params",
                ("classifier", "kernel"), "linear"),
          Entry(f"{lin}.bias", (net.num_classes,), "float32", "params", ("classifier", "bias"))]
  return out


def supernet_entries(space: space_lib.SearchSpace) -> list[Entry]:
  """The supernet's state_dict entries (1468 for AlphaNet), in `state_dict()` order."""
  blocks = tuple(NetBlock(index=b.index, cin=b.max_in, mid=b.max_mid, cout=b.max_out,
                        se=b.se_max, kernel=b.max_kernel, has_expand=b.has_expand)
                 for b in space.blocks)
  c7 = max(space.stages[-1].widths)
  net = NetShape(stem=max(space.stem_widths), blocks=blocks, final_expand_in=c7,
             final_expand=space.max_final_expand, feature_mix=max(space.last_widths),
             num_classes=space.num_classes)
  return build_entries(net, supernet=True)


def variable_shapes(entries: Iterable[Entry]) -> dict[str, Any]:
  """`{'params': ..., 'batch_stats': ...}` of JAX shapes (tuples) for a list of entries."""
  out: dict[str, Any] = {"params": {}, "batch_stats": {}}
  for e in entries:
    if e.collection is not None:
      _set(out[e.collection], e.path, e.jax_shape)
  return out


def supernet_variable_shapes(space: space_lib.SearchSpace) -> dict[str, Any]:
  """The agreed JAX variable layout of the supernet, with shapes as tuples."""
  return variable_shapes(supernet_entries(space))


# ----------------------------------------------------------------------------- tree helpers
def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]) -> Any:
  for name in path:
    if not isinstance(tree, Mapping) or name not in tree:
      raise KeyError(name)
    tree = tree[name]
  return tree


def _leaf_paths(tree: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
  if isinstance(tree, Mapping):
    return [p for k, v in tree.items() for p in _leaf_paths(v, prefix + (str(k),))]
  return [prefix]


def strip_module_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Drops the DistributedDataParallel `module.` prefix when every key has it (SPEC §5.1)."""
  keys = list(state_dict)
  if keys and all(k.startswith("module.") for k in keys):
    return {k[len("module."):]: v for k, v in state_dict.items()}
  return dict(state_dict)


def _describe(keys: list[str], limit: int = 5) -> str:
  shown = ", ".join(keys[:limit])
  return f"{shown}{f', ... ({len(keys)} in all)' if len(keys) > limit else ''}"


# ----------------------------------------------------------------------------- conversion
def _as_numpy(value: Any, entry: Entry) -> np.ndarray:
  try:
    import torch  # noqa: PLC0415  (torch is optional for the rest of the package)
  except ImportError:  # pragma: no cover
    torch = None
  if torch is not None and isinstance(value, torch.Tensor):
    if value.dtype not in (torch.float32, torch.int64):
      raise CheckpointError(f"{entry.key}: expected dtype {entry.dtype}, got {value.dtype}.")
    # A copy, so the JAX tree never aliases the caller's tensors.
    return value.detach().cpu().numpy().copy()
  return np.array(value, copy=True)


def _shape_message(what: str, expected: tuple[int, ...], got: tuple[int, ...]) -> str:
  return (f"{what}: expected shape {list(expected)}, got {list(got)}. Is it from a different "
          "search space (check --config and num_classes)?")


def _check(arr: np.ndarray, entry: Entry, shape: tuple[int, ...], what: str) -> None:
  if tuple(arr.shape) != tuple(shape):
    raise CheckpointError(_shape_message(what, shape, arr.shape))
  if arr.dtype != np.dtype(entry.dtype):
    raise CheckpointError(f"{what}: expected dtype {entry.dtype}, got {arr.dtype}.")


def from_torch(state_dict: Mapping[str, Any], entries: list[Entry], *, strict: bool = True,
               what: str = "checkpoint") -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Renames and transposes a state_dict into `(variables, extras)` along `entries`.

  Args:
    state_dict: PyTorch name -> tensor (or array); a `module.` prefix is dropped.
    entries: the expected entries, e.g. `supernet_entries(space)`.
    strict: also reject keys that are not in `entries`.
    what: a name for error messages.

  Returns:
    `({'params', 'batch_stats'}, extras)`: numpy arrays in the JAX layout, and every entry JAX
    does not use, untouched, in state_dict order.

  Raises:
    CheckpointError: a missing or unexpected key, or a wrong shape or dtype (named).
  """
  sd = strip_module_prefix(state_dict)
  expected = {e.key for e in entries}
  missing = [e.key for e in entries if e.key not in sd]
  if len(missing) < len(entries):
    # Shapes first: a checkpoint of another search space then names its first differing
    # tensor rather than the keys the other space happens to lack.
    for e in entries:
      if e.key in sd and tuple(np.shape(sd[e.key])) != e.shape:
        raise CheckpointError(_shape_message(f"Key {e.key!r}", e.shape, np.shape(sd[e.key])))
  if missing:
    raise CheckpointError(f"The {what} lacks {len(missing)} of {len(entries)} expected keys: "
                          f"{_describe(missing)}. Is it a checkpoint of this search space?")
  unexpected = [k for k in sd if k not in expected]
  if strict and unexpected:
    raise CheckpointError(f"The {what} has {len(unexpected)} unexpected keys: "
                          f"{_describe(unexpected)}.")
  variables: dict[str, Any] = {"params": {}, "batch_stats": {}}
  extras: dict[str, np.ndarray] = collections.OrderedDict()
  for e in entries:
    arr = _as_numpy(sd[e.key], e)
    _check(arr, e, e.shape, f"Key {e.key!r}")
    if e.collection is None:
      extras[e.key] = arr
    else:
      perm = _TO_JAX.get(e.layout)
      _set(variables[e.collection], e.path,
           arr if perm is None else np.ascontiguousarray(arr.transpose(perm)))
  return variables, extras


def _fresh_extra(entry: Entry) -> np.ndarray:
  # As a freshly built PyTorch BN holds them: running_mean 0, running_var 1, counter 0.
  if entry.dtype == "int64":
    return np.zeros(entry.shape, np.int64)
  fill = 1.0 if entry.key.endswith("running_var") else 0.0
  return np.full(entry.shape, fill, np.float32)


def to_torch(variables: Mapping[str, Any], entries: list[Entry],
             extras: Mapping[str, Any] | None = None, *, what: str = "variables"):
  """Builds an `OrderedDict[str, torch.Tensor]` in `entries` order from JAX variables.

  Args:
    variables: `{'params', 'batch_stats'}` in the JAX layout (numpy or jax arrays).
    entries: the entries to emit, e.g. `supernet_entries(space)`.
    extras: values of the entries JAX does not use, keyed by PyTorch name; None regenerates
      them as freshly built PyTorch modules hold them.
    what: a name for error messages.

  Raises:
    CheckpointError: a missing or unexpected variable or extra, or a wrong shape or dtype.
  """
  import torch  # noqa: PLC0415

  known = {(e.collection,) + e.path for e in entries if e.collection is not None}
  present = set(_leaf_paths({c: variables[c] for c in ("params", "batch_stats")
                             if c in variables}))
  unexpected = sorted("/".join(p) for p in present - known)
  if unexpected:
    raise CheckpointError(f"The {what} have {len(unexpected)} variables this search space does "
                          f"not define: {_describe(unexpected)}.")
  if extras is not None:
    extra_keys = {e.key for e in entries if e.collection is None}
    stray = [k for k in extras if k not in extra_keys]
    if stray:
      raise CheckpointError(f"The extras have {len(stray)} unexpected keys: {_describe(stray)}.")
  out = collections.OrderedDict()
  for e in entries:
    if e.collection is None:
      if extras is None:
        arr = _fresh_extra(e)
      elif e.key not in extras:
        raise CheckpointError(f"The extras lack the key {e.key!r} (shape {list(e.shape)}).")
      else:
        arr = np.array(extras[e.key], copy=True)
      _check(arr, e, e.shape, f"Extra {e.key!r}")
    else:
      try:
        value = _get(variables, (e.collection,) + e.path)
      except KeyError:
        raise CheckpointError(f"The {what} lack {e.jax_name} (PyTorch {e.key!r}, JAX shape "
                              f"{list(e.jax_shape)}).") from None
      arr = np.asarray(value)
      _check(arr, e, e.jax_shape, f"{e.jax_name} (PyTorch {e.key!r})")
      perm = _TO_TORCH.get(e.layout)
      # A fresh contiguous copy: torch tensors never alias the (possibly read-only) inputs.
      arr = np.array(arr if perm is None else arr.transpose(perm), copy=True, order="C")
    out[e.key] = torch.from_numpy(arr)
  return out


def torch_to_jax(state_dict: Mapping[str, Any], space: space_lib.SearchSpace, *,
                 strict: bool = True) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """PyTorch supernet state_dict -> (JAX variables, extras).

  Args:
    state_dict: the supernet state_dict, with or without the `module.` prefix.
    space: the search space the checkpoint was trained on.
    strict: reject keys the supernet does not have (the original loader ignores them).

  Returns:
    `(variables, extras)`: `{'params', 'batch_stats'}` of numpy arrays at the supernet's max
    shapes in the JAX layout, and every `num_batches_tracked` / `bn_tracking` entry as a numpy
    array keyed by PyTorch name.
  """
  return from_torch(state_dict, supernet_entries(space), strict=strict,
                    what="supernet checkpoint")


def jax_to_torch(variables: Mapping[str, Any], space: space_lib.SearchSpace,
                 extras: Mapping[str, Any] | None = None):
  """JAX supernet variables -> the full PyTorch state_dict (all keys, SPEC §5.1 order).

  Args:
    variables: `{'params', 'batch_stats'}` at max shapes (numpy or jax arrays).
    space: the search space.
    extras: from `torch_to_jax`, for a bit-exact round trip; None regenerates the
      `bn_tracking` buffers (0 / 1) and counters (int64 0).

  Returns:
    `OrderedDict[str, torch.Tensor]` without the `module.` prefix; the original loader wants it
    as `{'state_dict': {'module.' + key: ...}}` (see `torch_io.save_state_dict`).
  """
  return to_torch(variables, supernet_entries(space), extras, what="supernet variables")
