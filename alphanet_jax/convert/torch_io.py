"""Safe reading and writing of PyTorch checkpoints (`.pth`, `.pth.tar`).

Loading never runs code from the file (DESIGN.md decision 8):

1. `torch.load(path, weights_only=True, map_location='cpu')`, PyTorch's own restricted
   unpickler. It reads plain state_dicts and containers of tensors in both the zip and the
   legacy (non-zip) serialisation.
2. If that refuses the file, typically because the official training container
   (`utils/saver.py`: legacy format, SPEC §5.1) holds `args`, a pickled `utils.config.Config`
   (a dict subclass) that no allowlist can rebuild, a restricted unpickler of our own reads it:
   only tensor rebuilding, `OrderedDict`, plain builtin containers and dtypes resolve to real
   objects; every other global becomes an inert `ForeignObject` placeholder that merely records
   the arguments and state it was given. No foreign class or function is imported, constructed
   or called, so `__reduce__` / `__setstate__` payloads never run.

`weights_only=False` is never used. A file that is not a checkpoint, or holds no tensors, raises
`CheckpointError`. torch is imported only inside functions, so this module imports without it.
"""

from __future__ import annotations

import collections
import io
import os
import pathlib
import pickle
import pickletools
import struct
import zipfile
from collections.abc import Mapping
from typing import Any


class CheckpointError(ValueError):
  """A file is not a usable checkpoint: unreadable, foreign, or missing / mis-shaped keys."""


# --------------------------------------------------------------------------- placeholders
class ForeignObject:
  """Inert stand-in for an object of a class (or a call of a function) we do not import.

  Attributes:
    foreign_name: `module.qualname` of the global the pickle referenced.
    args: positional arguments the pickle passed when constructing / calling it.
    state: what the pickle passed to `__setstate__` (BUILD), if anything.
    items: key/value pairs set on it (dict subclasses), in order.
    list_items: items appended to it (list subclasses).
  """
  foreign_name = "?"

  def __new__(cls, *args, **kwargs):
    obj = object.__new__(cls)
    obj.__dict__.update(args=args, kwargs=kwargs, state=None, items={}, list_items=[])
    return obj

  def __init__(self, *args, **kwargs):  # noqa: D107  (records nothing more; see __new__)
    del args, kwargs

  def __setstate__(self, state):
    self.__dict__["state"] = state

  def __setitem__(self, key, value):
    self.__dict__["items"][key] = value

  def append(self, value):
    self.__dict__["list_items"].append(value)

  def extend(self, values):
    self.__dict__["list_items"].extend(values)

  def __repr__(self):
    return f"<ForeignObject {self.foreign_name} (not loaded)>"


_FOREIGN_CLASSES: dict[str, type] = {}


def foreign_class(full_name: str) -> type:
  """The placeholder class standing for the global `full_name` (one class per name)."""
  if full_name not in _FOREIGN_CLASSES:
    _FOREIGN_CLASSES[full_name] = type(full_name.rpartition(".")[2] or "Foreign",
                                       (ForeignObject,), {"foreign_name": full_name})
  return _FOREIGN_CLASSES[full_name]


# --------------------------------------------------------------------------- restricted loader
# Storage class names of the original serialisation -> torch dtype names.
_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "UntypedStorage": "uint8",
}
_DTYPE_NAMES = ("float32", "float", "float64", "double", "float16", "half", "bfloat16", "int64",
                "long", "int32", "int", "int16", "short", "int8", "uint8", "bool", "complex64",
                "complex128")
_SAFE_BUILTINS = ("set", "frozenset", "list", "dict", "tuple", "int", "float", "complex", "str",
                  "bool", "bytes", "bytearray", "slice", "range")
_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # legacy torch.save header
_LEGACY_PROTOCOL = 1001


class _StorageType:
  """What a pickled `torch.<X>Storage` global resolves to: just its dtype."""

  def __init__(self, dtype_name: str):
    self.dtype_name = dtype_name


def _safe_encode(text, encoding="latin1"):
  # Protocol-2 pickles store bytes as _codecs.encode(str, 'latin1').
  if encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
    raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
  return text.encode(encoding)


def _safe_reconstructor(cls, base, state):
  # Protocol 0/1 objects: copyreg._reconstructor(cls, base, state). cls is always one of our
  # placeholders here (find_class never returns a foreign class).
  if isinstance(cls, type) and issubclass(cls, ForeignObject):
    obj = cls()
    obj.__dict__["state"] = state
    return obj
  return foreign_class("copyreg._reconstructor")(cls, base, state)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  """torch._utils._rebuild_tensor{,_v2}: a strided view into a 1-D storage tensor."""
  import torch  # noqa: PLC0415
  if storage is None:  # first pass of the legacy reader: only storage dtypes are collected
    return None
  return torch.as_strided(storage, tuple(size), tuple(stride),
                          storage.storage_offset() + int(storage_offset))


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, hooks, dtype,
                       *unused):
  if storage is None:
    return None
  return _rebuild_tensor(storage.view(dtype), storage_offset, size, stride)


def _rebuild_parameter(data, *unused):
  return data  # a state_dict needs the values, not nn.Parameter objects


class _RestrictedUnpickler(pickle.Unpickler):
  """`pickle.Unpickler` whose `find_class` resolves only an allowlist of harmless globals.

  `find_class` is the only way a pickle reaches Python globals (GLOBAL, STACK_GLOBAL, INST,
  OBJ and the extension registry all go through it), so nothing outside the allowlist can be
  called: anything else is a `ForeignObject` placeholder class.
  """

  def __init__(self, file, storage_loader):
    super().__init__(file, encoding="utf-8")
    self._storage_loader = storage_loader

  def find_class(self, module, name):
    import torch  # noqa: PLC0415
    full = f"{module}.{name}"
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module == "torch._utils":
      if name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
        return _rebuild_tensor
      if name == "_rebuild_tensor_v3":
        return _rebuild_tensor_v3
      if name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
        return _rebuild_parameter
    if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
      return _StorageType(_STORAGE_DTYPES[name])
    if module == "torch" and name in _DTYPE_NAMES:
      return getattr(torch, name)
    if module == "torch" and name in ("Size", "device"):
      return getattr(torch, name)
    if module == "_codecs" and name == "encode":
      return _safe_encode
    if module == "copyreg" and name == "_reconstructor":
      return _safe_reconstructor
    if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
      return getattr(__import__("builtins"), name)
    return foreign_class(full)

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or not pid:
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
    kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
    if kind != "storage":
      raise pickle.UnpicklingError(f"unsupported persistent id type {kind!r}")
    storage_type, key, _, numel = pid[1:5]
    view = pid[5] if len(pid) > 5 else None
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
    return self._storage_loader(str(key), storage_type.dtype_name, int(numel), view)


def _storage_tensor(raw: bytes, dtype_name: str, numel: int):
  import torch  # noqa: PLC0415
  dtype = getattr(torch, dtype_name)
  if numel == 0:
    return torch.empty(0, dtype=dtype)
  itemsize = torch.empty(0, dtype=dtype).element_size()
  if len(raw) != numel * itemsize:
    raise CheckpointError(f"storage holds {len(raw)} bytes, expected {numel * itemsize}")
  # frombuffer keeps the bytearray alive for as long as the tensor.
  return torch.frombuffer(bytearray(raw), dtype=dtype)


def _load_zip(path: pathlib.Path) -> Any:
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if not pkl:
      if any(n.endswith("constants.pkl") for n in names):
        raise CheckpointError("it is a TorchScript archive (torch.jit.save), not a checkpoint")
      raise CheckpointError("zip archive without data.pkl: not a torch.save checkpoint")
    prefix = pkl[0][:-len("data.pkl")]
    if prefix + "byteorder" in names and zf.read(prefix + "byteorder").strip() != b"little":
      raise CheckpointError("big-endian checkpoints are not supported")
    cache: dict[str, Any] = {}

    def load_storage(key, dtype_name, numel, view):
      del view  # the zip format has no storage views
      if key not in cache:
        cache[key] = _storage_tensor(zf.read(f"{prefix}data/{key}"), dtype_name, numel)
      return cache[key]

    return _RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), load_storage).load()


def _load_legacy(path: pathlib.Path) -> Any:
  import torch  # noqa: PLC0415
  with open(path, "rb") as f:
    def header():
      return _RestrictedUnpickler(f, None).load()
    if header() != _MAGIC_NUMBER:
      raise CheckpointError("not a torch.save file (bad magic number)")
    if header() != _LEGACY_PROTOCOL:
      raise CheckpointError("unknown legacy serialisation protocol")
    sys_info = header()
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
      raise CheckpointError("big-endian checkpoints are not supported")
    start = f.tell()
    # Pass 1: learn each storage's dtype (the raw bytes follow the object pickle and carry
    # only an element count). Tensor rebuilding is skipped.
    specs: dict[str, str] = {}

    def note_storage(key, dtype_name, numel, view):
      del numel, view
      specs.setdefault(key, dtype_name)
      return None

    _RestrictedUnpickler(f, note_storage).load()
    keys = header()
    data = {}
    for key in keys:
      key = str(key)
      if key not in specs:
        raise CheckpointError(f"storage {key!r} is not referenced by the object pickle")
      (numel,) = struct.unpack("<q", f.read(8))
      itemsize = torch.empty(0, dtype=getattr(torch, specs[key])).element_size()
      data[key] = _storage_tensor(f.read(numel * itemsize), specs[key], numel)
    end = f.tell()
    # Pass 2: rebuild the objects with the storages in hand.
    f.seek(start)

    def load_storage(key, dtype_name, numel, view):
      del dtype_name, numel
      root = data[key]
      if view is not None:  # (view_key, offset, size) of old storage views, in elements
        _, offset, size = view
        return root[int(offset):int(offset) + int(size)]
      return root

    obj = _RestrictedUnpickler(f, load_storage).load()
    f.seek(end)
    return obj


def _load_restricted(path: pathlib.Path) -> Any:
  if zipfile.is_zipfile(path):
    return _load_zip(path)
  return _load_legacy(path)


# --------------------------------------------------------------------------- public API
def load_checkpoint(path: str | os.PathLike) -> Any:
  """Reads a `torch.save` file without executing code from it.

  Args:
    path: a `.pth` / `.pth.tar` file (zip or legacy serialisation).

  Returns:
    The saved object, tensors on CPU. Objects of foreign classes (only possible through the
    fallback) are `ForeignObject` placeholders.

  Raises:
    FileNotFoundError: no such file.
    CheckpointError: the file is not a readable torch checkpoint.
  """
  import torch  # noqa: PLC0415
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"No such checkpoint file: {str(path)!r}.")
  try:
    return torch.load(path, weights_only=True, map_location="cpu")
  except Exception as first:  # noqa: BLE001  (any refusal: try the restricted reader)
    torch_error = str(first).strip().splitlines()[0] if str(first).strip() else repr(first)
  try:
    return _load_restricted(path)
  except CheckpointError as e:
    raise CheckpointError(f"{str(path)!r} is not a readable PyTorch checkpoint: {e} "
                          f"(torch.load said: {torch_error})") from None
  except Exception as e:  # noqa: BLE001  (corrupt or foreign bytes)
    raise CheckpointError(f"{str(path)!r} is not a readable PyTorch checkpoint "
                          f"({type(e).__name__}: {e}; torch.load said: {torch_error}).") from None


def state_dict_from_checkpoint(obj: Any, source: str = "checkpoint"):
  """The tensor state_dict inside a loaded checkpoint, without the `module.` prefix.

  Accepts a plain `{name: tensor}` mapping or the official container
  `{'state_dict': {'module.' + name: tensor}, 'epoch': ..., 'args': ..., ...}`.

  Raises:
    CheckpointError: no state_dict of tensors in `obj`.
  """
  import torch  # noqa: PLC0415
  if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a state_dict.")
  tensors = collections.OrderedDict((k, v) for k, v in obj.items()
                                    if isinstance(k, str) and isinstance(v, torch.Tensor))
  if not tensors:
    raise CheckpointError(f"{source} holds no tensors (keys: {list(obj)[:8]}); it is not a "
                          "model checkpoint.")
  others = [k for k in obj if k not in tensors]
  if others:
    raise CheckpointError(f"{source}'s state_dict has non-tensor entries: {others[:5]}.")
  if all(k.startswith("module.") for k in tensors):
    tensors = collections.OrderedDict((k[len("module."):], v) for k, v in tensors.items())
  return tensors


def load_state_dict(path: str | os.PathLike):
  """`state_dict_from_checkpoint(load_checkpoint(path))`: an `OrderedDict[str, Tensor]`."""
  return state_dict_from_checkpoint(load_checkpoint(path), source=repr(str(path)))


def save_state_dict(state_dict: Mapping[str, Any], path: str | os.PathLike, *,
                    container: bool = False) -> None:
  """Writes a state_dict with `torch.save` (zip format; `torch.load` reads it everywhere).

  Args:
    state_dict: name -> tensor.
    path: output file; its directory must exist.
    container: write `{'state_dict': {'module.' + name: tensor}}`, the form the original
      `load_weights_from_pretrained_models` reads (SPEC §5.1), instead of the bare mapping.
  """
  import torch  # noqa: PLC0415
  obj: Any = collections.OrderedDict(state_dict)
  if container:
    obj = {"state_dict": collections.OrderedDict(("module." + k, v) for k, v in obj.items())}
  torch.save(obj, os.fspath(path))


def pickle_globals(path: str | os.PathLike) -> set[str]:
  """Every `module.name` global a torch checkpoint's object pickle refers to (not executed).

  A diagnostic for foreign checkpoints; only GLOBAL opcodes (pickle protocols <= 3, which
  torch.save uses) are reported.
  """
  path = pathlib.Path(path)
  found: set[str] = set()

  def scan(stream):
    for op, arg, _ in pickletools.genops(stream):
      if op.name == "GLOBAL":
        found.add(str(arg).replace(" ", "."))

  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as zf:
      for n in zf.namelist():
        if n.endswith("data.pkl"):
          scan(io.BytesIO(zf.read(n)))
  else:
    with open(path, "rb") as f:
      for _ in range(4):  # magic, protocol, sys_info, objects
        scan(f)
  return found
