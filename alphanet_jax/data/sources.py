"""Finding TFDS datasets and reading their raw records, by index or as a stream.

Two readers, chosen by how the dataset was prepared (`config.input.reader = "auto"`):

* **index** (ArrayRecord files, `--file_format=array_record`): random access to any record by
  its index in the split. The training order is then an explicit permutation and a resumed run
  starts reading at its step directly.
* **stream** (TFRecord files, TFDS's default): sequential reading of a per-host part. Resuming
  re-reads (but does not decode) the records of the current epoch up to the resume step.

Both return examples as {'image': encoded bytes, 'label': int64}; decoding happens later, where
corrupt images can be caught.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from alphanet_jax.data import digits_builder

# Datasets that ship with the package and are built on first use.
_BUILT_ON_DEMAND = {digits_builder.NAME: digits_builder.build}


class DatasetNotFoundError(FileNotFoundError):
  """The dataset named by the config is not prepared where TFDS looks for it."""


def data_dir_of(config) -> str:
  """config.data_dir, else $TFDS_DATA_DIR, else TFDS's default (~/tensorflow_datasets)."""
  data_dir = config.get("data_dir", None) or os.environ.get("TFDS_DATA_DIR")
  if not data_dir:
    data_dir = tfds.core.constants.DATA_DIR
  return os.path.expanduser(os.fspath(data_dir))


def _imagenet_steps(data_dir: str) -> str:
  manual = os.path.join(data_dir, "downloads", "manual")
  return (
      "To prepare ImageNet (ILSVRC 2012):\n"
      "  1. Download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from "
      "https://image-net.org/download-images (registration needed).\n"
      f"  2. Put them at {os.path.join(manual, 'ILSVRC2012_img_train.tar')}\n"
      f"             and {os.path.join(manual, 'ILSVRC2012_img_val.tar')}\n"
      f"  3. Run: tfds build imagenet2012 --data_dir={data_dir} --file_format=array_record\n"
      "     (hours; array_record allows exact resume without re-reading, tfrecord works too).")


def _missing_message(name: str, data_path: str, data_dir: str) -> str:
  head = (f"Dataset {name!r} is not prepared: TFDS looked for it in {data_path} (data_dir "
          f"{data_dir}; set config.data_dir or $TFDS_DATA_DIR to look elsewhere).\n")
  if name.split(":")[0] == "imagenet2012":
    return head + _imagenet_steps(data_dir)
  return head + (f"Prepare it with: tfds build {name} --data_dir={data_dir} "
                 "--file_format=array_record")


def get_builder(config) -> tfds.core.DatasetBuilder:
  """The prepared TFDS builder for config.dataset; builds the bundled datasets if needed.

  Raises:
    DatasetNotFoundError: the dataset is unknown to TFDS or not prepared in the data dir.
  """
  name = config.dataset
  data_dir = data_dir_of(config)
  if name in _BUILT_ON_DEMAND:
    return _BUILT_ON_DEMAND[name](data_dir)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DatasetNotFoundError(
        f"TFDS knows no dataset {name!r} (config.dataset); data_dir {data_dir}. {e}") from None
  if not builder.is_prepared():
    raise DatasetNotFoundError(_missing_message(name, os.fspath(builder.data_path), data_dir))
  return builder


def uses_index_reader(builder, reader: str = "auto") -> bool:
  """Index access needs ArrayRecord files; "auto" uses it whenever they are there."""
  if reader not in ("auto", "index", "stream"):
    raise ValueError(f"config.input.reader must be auto, index or stream, not {reader!r}")
  if reader == "auto":
    return builder.info.file_format == tfds.core.file_adapters.FileFormat.ARRAY_RECORD
  return reader == "index"


def split_size(builder, split) -> int:
  return int(builder.info.splits[split].num_examples)


def host_split(split: str, process_index: int, process_count: int):
  """This host's contiguous part of `split`; sizes differ by at most one between hosts."""
  return tfds.even_splits(split, n=process_count, drop_remainder=False)[process_index]


def parse_fn(builder):
  """Serialized tf.Example -> {'image': encoded bytes, 'label': int64}, in graph mode."""
  features = builder.info.features

  def parse(serialized):
    example = features.deserialize_example(
        serialized, decoders={"image": tfds.decode.SkipDecoding()})
    return {"image": example["image"], "label": tf.cast(example["label"], tf.int64)}

  return parse


def record_fetcher(builder, split):
  """A graph function int64 [n] indices -> string [n] serialized records (index reader).

  The records come from TFDS's ArrayRecord data source as raw bytes; only the lookup runs in
  Python (`tf.numpy_function`), parsing and decoding stay in TF ops.
  """
  source = builder.as_data_source(
      split=split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)

  def fetch_numpy(indices):
    records = source.__getitems__([int(i) for i in indices])
    return np.array([bytes(r) for r in records], dtype=object)

  def fetch(indices):
    records = tf.numpy_function(fetch_numpy, [indices], tf.string, stateful=False)
    return tf.ensure_shape(records, indices.shape)

  return fetch, len(source)


def stream_dataset(builder, split, *, shuffle_files: bool = False, seed: int = 0,
                   cycle_length: int = 16) -> tf.data.Dataset:
  """The records of `split` in a deterministic order (stream reader), parsed, not decoded."""
  read_config = tfds.ReadConfig(
      shuffle_seed=seed if shuffle_files else None,
      shuffle_reshuffle_each_iteration=False,
      interleave_cycle_length=cycle_length,
      skip_prefetch=True,
      try_autocache=False,
  )
  ds = builder.as_dataset(split=split, shuffle_files=shuffle_files, read_config=read_config,
                          decoders={"image": tfds.decode.SkipDecoding()})
  return ds.map(lambda ex: {"image": ex["image"], "label": tf.cast(ex["label"], tf.int64)})
