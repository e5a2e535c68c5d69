"""Per-host input pipelines: training, BN calibration and evaluation batches as numpy dicts.

Determinism and resume (the training and calibration streams):
  Batch `step` on host `process_index` is a pure function of (seed, step, process_index,
  process_count, local_batch_size), augmentation included; a run restarted at step k sees the
  same batches, bit for bit, as an uninterrupted run from step k on.

  * Order. With the index reader (ArrayRecord datasets), epoch e visits the split in the order
    of a keyed bijection `RandomIndexShuffle(position, key=(seed, stream, e))`. Global step s is
    positions [j * G, (j + 1) * G) of its epoch (j = s mod steps_per_epoch, G = the global
    batch); host p takes its slice [p * B, (p + 1) * B) of them. Hosts therefore read disjoint
    parts at every step and the union of the hosts' batches does not depend on the number of
    hosts. Epochs drop their last N mod G positions, so every host has the same number of steps
    (N // G per epoch), like the original's drop_last. Starting at step k computes its indices
    directly: nothing before k is read or decoded.
  * With the stream reader (TFRecord datasets), host p reads its even part of the split
    (`tfds.even_splits`) in file order, shuffled per epoch by a buffer seeded with (seed,
    stream, e). Resuming at step k re-reads, without decoding, the records of k's epoch that
    come before it (at most one epoch of raw bytes per host): prepare with
    `--file_format=array_record` to avoid that.
  * Augmentation. Example slot i of host p at step s draws every random number (crop window,
    flip, AutoAugment sub-policy, probabilities, magnitudes, signs, filters) from the stateless
    key (seed * 16 + stream, s * G + p * B + i).

Corrupt images: decoding errors are caught per image (`transforms.safe_decode`). In a training
batch, a corrupt image's row is replaced by the next good row of the same batch (so the batch
size and the rest of the stream do not change); in evaluation its mask is 0. Each iterator
counts them in `num_corrupt` and logs a warning.

Config fields read (all but `dataset` optional):
  dataset: TFDS name ('imagenet2012', 'alphanet_digits', ...); data_dir; image_size (224);
  train_split / eval_split (default 'train' / 'validation', or 'test' if there is no
  validation split);
  augment: crop ('random_resized' | 'pad' | 'none'), crop_scale, crop_ratio, pad, flip,
    autoaugment ('v0' | None), eval_resize (shorter side before the centre crop);
    defaults follow SPEC §6.2/§8 for ImageNet-like data and are digit-friendly (pad 2, no flip,
    no AutoAugment, no eval resize) for alphanet_digits;
  input: reader ('auto' | 'index' | 'stream'), threads (tf.data private thread pool, None = TF's
    default), prefetch (batches, 2), shuffle_buffer (stream reader, 10000), dtype ('float32' |
    'bfloat16').
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import math
from typing import Any
import weakref

from absl import logging
import ml_collections
import numpy as np
import tensorflow as tf

from alphanet_jax.data import autoaugment
from alphanet_jax.data import digits_builder
from alphanet_jax.data import sources
from alphanet_jax.data import transforms

# Stream ids keep the training and calibration streams apart for the same seed.
TRAIN_STREAM = 0
CALIB_STREAM = 1
_NUM_STREAMS = 16
_FOREVER = 2**62


@dataclasses.dataclass(frozen=True)
class Options:
  """Resolved augmentation and reader options (see the module docstring)."""
  image_size: int
  crop: str
  crop_scale: tuple[float, float]
  crop_ratio: tuple[float, float]
  pad: int
  flip: bool
  autoaugment: str | None
  eval_resize: int
  reader: str
  threads: int | None
  prefetch: int
  shuffle_buffer: int
  dtype: Any


def _get(section, key, default):
  """section[key] if set (None included: autoaugment=None means off), else the default."""
  if section is None or key not in section:
    return default
  return section[key]


def options_from_config(config) -> Options:
  """Fills the per-dataset defaults of config.augment / config.input."""
  image_size = int(config.get("image_size", 224))
  digits = config.dataset == digits_builder.NAME
  augment = config.get("augment", None)
  inputs = config.get("input", None)
  defaults = dict(
      crop="pad" if digits else "random_resized",
      flip=not digits,
      autoaugment=None if digits else "v0",
      # SPEC §8: shorter side 256 for 224 crops; digits are stored at their final size.
      eval_resize=image_size if digits else int(round(image_size * 256 / 224)),
  )
  dtype = _get(inputs, "dtype", "float32")
  return Options(
      image_size=image_size,
      crop=_get(augment, "crop", defaults["crop"]),
      crop_scale=tuple(_get(augment, "crop_scale", (0.08, 1.0))),
      crop_ratio=tuple(_get(augment, "crop_ratio", (3.0 / 4.0, 4.0 / 3.0))),
      pad=int(_get(augment, "pad", 2)),
      flip=bool(_get(augment, "flip", defaults["flip"])),
      autoaugment=_get(augment, "autoaugment", defaults["autoaugment"]),
      eval_resize=int(_get(augment, "eval_resize", defaults["eval_resize"])),
      reader=_get(inputs, "reader", "auto"),
      threads=_get(inputs, "threads", None),
      prefetch=int(_get(inputs, "prefetch", 2)),
      shuffle_buffer=int(_get(inputs, "shuffle_buffer", 10_000)),
      dtype={"float32": tf.float32, "bfloat16": tf.bfloat16}[dtype],
  )


def _process_defaults(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top  (only the defaults need jax)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  return int(process_index), int(process_count)


def _tf_options(opts: Options) -> tf.data.Options:
  options = tf.data.Options()
  # Determinism is the contract; parallel maps keep their order.
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  # One thread per op: parallelism comes from the parallel maps, as on TPU hosts.
  options.threading.max_intra_op_parallelism = 1
  if opts.threads:
    options.threading.private_threadpool_size = int(opts.threads)
  return options


# ---------------------------------------------------------------------------------------------
# Per-example processing.
# ---------------------------------------------------------------------------------------------


def _example_key(seed_key, step, slot, global_batch):
  return tf.stack([tf.cast(seed_key, tf.int64),
                   tf.cast(step, tf.int64) * global_batch + tf.cast(slot, tf.int64)])


@functools.lru_cache(maxsize=None)
def _augment_fn(opts: Options):
  """The traced flip + AutoAugment for `opts`, shared by every pipeline of the process.

  Tracing AutoAugment's switch over 14 ops takes seconds; a `tf.function` with a fixed signature
  is traced once and then only copied into each new pipeline. AutoGraph is off: the Python
  control flow here runs at trace time. (The decode stays outside: its nested one-element
  dataset deadlocks inside a function called from a tf.data map.)
  """

  def augment(image, flip_key, aa_key):
    if opts.flip:
      image = transforms.random_flip(image, flip_key)
    if opts.autoaugment == "v0":
      image = autoaugment.autoaugment(image, aa_key)
    elif opts.autoaugment:
      raise ValueError(f"augment.autoaugment must be 'v0' or None, not {opts.autoaugment!r}")
    return image

  size = opts.image_size
  return tf.function(augment, autograph=False, input_signature=[
      tf.TensorSpec([size, size, 3], tf.uint8), tf.TensorSpec([2], tf.int64),
      tf.TensorSpec([2], tf.int64)])


def _train_preprocess(image_bytes, key, opts: Options):
  """Encoded image + key -> (normalised [S, S, 3] image, ok)."""
  size = opts.image_size
  crop_key, flip_key, aa_key = tf.unstack(tf.random.experimental.stateless_split(key, 3))

  def decode(image_bytes):
    if opts.crop == "random_resized":
      image = transforms.decode_and_random_crop(image_bytes, crop_key, opts.crop_scale,
                                                opts.crop_ratio)
      return transforms.resize_uint8(image, [size, size])
    image = transforms.decode_rgb(image_bytes)
    image = tf.cond(tf.reduce_all(tf.shape(image)[:2] == size), lambda: image,
                    lambda: transforms.resize_uint8(image, [size, size]))
    if opts.crop == "pad":
      image = transforms.pad_and_random_crop(image, crop_key, opts.pad)
    elif opts.crop != "none":
      raise ValueError(f"augment.crop must be random_resized, pad or none, not {opts.crop!r}")
    return image

  image, ok = transforms.safe_decode(image_bytes, decode, size)
  if opts.flip or opts.autoaugment:
    image = _augment_fn(opts)(image, flip_key, aa_key)
  return transforms.normalize(image, opts.dtype), ok


def _eval_preprocess(image_bytes, opts: Options):
  size = opts.image_size

  def decode(image_bytes):
    image = transforms.decode_rgb(image_bytes)
    return transforms.resize_shorter_and_center_crop(image, opts.eval_resize, size)

  image, ok = transforms.safe_decode(image_bytes, decode, size)
  return transforms.normalize(image, opts.dtype), ok


# ---------------------------------------------------------------------------------------------
# Training / calibration stream.
# ---------------------------------------------------------------------------------------------


def _train_dataset(config, *, seed, stream, start_step, local_batch_size, process_index,
                   process_count, split=None):
  opts = options_from_config(config)
  builder = sources.get_builder(config)
  split = split or dataset_info(config, builder)["train_split"]
  batch = int(local_batch_size)
  global_batch = batch * process_count
  first_slot = process_index * batch
  seed_key = int(seed) * _NUM_STREAMS + stream

  if sources.uses_index_reader(builder, opts.reader):
    fetch, num = sources.record_fetcher(builder, split)
    steps_per_epoch = num // global_batch
    _check_steps(steps_per_epoch, num, global_batch, split)
    parse = sources.parse_fn(builder)

    def step_records(step):
      epoch = step // steps_per_epoch
      positions = (step % steps_per_epoch) * global_batch + first_slot + tf.range(
          batch, dtype=tf.int64)
      indices = tf.raw_ops.RandomIndexShuffle(
          index=positions, seed=tf.stack([tf.constant(seed_key, tf.int64), epoch,
                                          tf.constant(0x5EED, tf.int64)]),
          max_index=tf.constant(num - 1, tf.int64))
      return {"step": tf.fill([batch], step), "slot": first_slot + tf.range(batch),
              "record": fetch(indices)}

    def parse_record(ex):
      parsed = parse(ex["record"])
      return {"step": ex["step"], "slot": ex["slot"], **parsed}

    ds = tf.data.Dataset.range(start_step, _FOREVER)
    ds = ds.map(step_records, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
    ds = ds.map(parse_record, num_parallel_calls=tf.data.AUTOTUNE)
  else:
    part = sources.host_split(split, process_index, process_count)
    # even_splits(drop_remainder=False) sizes differ by one: use the smallest part's steps.
    num = sources.split_size(builder, split)
    steps_per_epoch = (num // process_count) // batch
    _check_steps(steps_per_epoch, num, global_batch, split)
    records = sources.stream_dataset(builder, part)
    per_epoch = steps_per_epoch * batch

    def epoch_records(epoch):
      shuffled = records.shuffle(opts.shuffle_buffer,
                                 seed=epoch * _NUM_STREAMS * 65536 + seed_key,
                                 reshuffle_each_iteration=False).take(per_epoch)

      def label(k, ex):
        return {"step": epoch * steps_per_epoch + k // batch,
                "slot": first_slot + tf.cast(k % batch, tf.int32), **ex}

      return shuffled.enumerate().map(label)

    start_epoch = start_step // steps_per_epoch
    ds = tf.data.Dataset.range(start_epoch, _FOREVER).flat_map(epoch_records)
    # The cost of resuming with a stream: records before the start step are read, not decoded.
    ds = ds.skip((start_step - start_epoch * steps_per_epoch) * batch)

  def preprocess(ex):
    key = _example_key(seed_key, ex["step"], ex["slot"], global_batch)
    image, ok = _train_preprocess(ex["image"], key, opts)
    return {"image": image, "label": tf.cast(ex["label"], tf.int32), "ok": ok}

  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch, drop_remainder=True).prefetch(opts.prefetch)
  return ds.with_options(_tf_options(opts))


def _check_steps(steps_per_epoch, num, global_batch, split):
  if steps_per_epoch < 1:
    raise ValueError(f"The global batch ({global_batch}) is larger than split {split!r} "
                     f"({num} examples).")


class BatchIterator:
  """Numpy batches from a tf.data pipeline; counts and patches corrupt images.

  Attributes:
    num_corrupt: images that failed to decode so far (training: replaced by another image of
      the same batch; evaluation: masked out).
  """

  def __init__(self, ds: tf.data.Dataset, *, evaluation: bool, num_batches: int | None = None):
    self._it = ds.take(num_batches).as_numpy_iterator() if num_batches is not None else (
        ds.as_numpy_iterator())
    self._evaluation = evaluation
    self.num_batches = num_batches
    self.num_corrupt = 0
    _LIVE.add(self)

  def close(self) -> None:
    """Stops the background pipeline (also done on errors and at interpreter exit)."""
    self._it = None

  def __iter__(self):
    return self

  def __len__(self):
    if self.num_batches is None:
      raise TypeError("an infinite iterator has no length")
    return self.num_batches

  def __next__(self) -> dict[str, np.ndarray]:
    if self._it is None:
      raise StopIteration
    try:
      batch = next(self._it)
    except StopIteration:
      self.close()
      raise
    except Exception:
      # A failed pipeline still has threads that call back into Python (record lookups); left
      # alive until interpreter exit, they can hang it. Stop them before the error propagates.
      self.close()
      raise
    ok = batch.pop("ok")
    if self._evaluation:
      corrupt = (batch["mask"] > 0) & ~ok
      batch["mask"] = batch["mask"] * ok.astype(np.float32)
    else:
      corrupt = ~ok
      if corrupt.any():
        _replace_bad_rows(batch, ok)
    if corrupt.any():
      self.num_corrupt += int(corrupt.sum())
      logging.warning("Skipped %d corrupt image(s) in this batch (%d so far).",
                      int(corrupt.sum()), self.num_corrupt)
    return batch


_LIVE = weakref.WeakSet()


@atexit.register
def _close_live_iterators():
  for iterator in list(_LIVE):
    iterator.close()


def _replace_bad_rows(batch, ok):
  good = np.flatnonzero(ok)
  if good.size == 0:
    logging.error("Every image of a training batch is corrupt; the batch is all zeros.")
    return
  for i in np.flatnonzero(~ok):
    # The next good row, cyclically: a fixed rule, so the batch stays a function of the step.
    later = good[good > i]
    donor = later[0] if later.size else good[0]
    for key in ("image", "label"):
      if not batch[key].flags.writeable:  # as_numpy_iterator may hand out read-only views
        batch[key] = batch[key].copy()
      batch[key][i] = batch[key][donor]


def train_iterator(config: ml_collections.ConfigDict, *, seed: int, start_step: int,
                   local_batch_size: int, process_index: int | None = None,
                   process_count: int | None = None) -> BatchIterator:
  """Infinite training batches from `start_step` on, for this host.

  Args:
    config: the experiment config (see the module docstring for the fields read).
    seed: the data seed; order and augmentation are functions of (seed, step).
    start_step: the global step of the first batch (0, or the step a run resumes at).
    local_batch_size: images per batch on this host.
    process_index: this host; default jax.process_index().
    process_count: number of hosts; default jax.process_count().

  Returns:
    An iterator of {'image': float32 [B, S, S, 3] normalised NHWC, 'label': int32 [B]}.
  """
  process_index, process_count = _process_defaults(process_index, process_count)
  ds = _train_dataset(config, seed=seed, stream=TRAIN_STREAM, start_step=int(start_step),
                      local_batch_size=local_batch_size, process_index=process_index,
                      process_count=process_count)
  return BatchIterator(ds, evaluation=False)


def calib_iterator(config: ml_collections.ConfigDict, *, seed: int, local_batch_size: int,
                   num_batches: int, process_index: int | None = None,
                   process_count: int | None = None, split: str | None = None) -> BatchIterator:
  """`num_batches` augmented training batches for BN recalibration (SPEC §3, §8).

  The same preprocessing as training, from a stream of its own: calibration with seed 5 never
  repeats the training batches of seed 5.
  """
  process_index, process_count = _process_defaults(process_index, process_count)
  ds = _train_dataset(config, seed=seed, stream=CALIB_STREAM, start_step=0,
                      local_batch_size=local_batch_size, process_index=process_index,
                      process_count=process_count, split=split)
  return BatchIterator(ds, evaluation=False, num_batches=int(num_batches))


# ---------------------------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------------------------


def eval_num_batches(num: int, local_batch_size: int, process_count: int) -> int:
  """Batches per host: enough for the largest host part (ceil(N / hosts) images)."""
  return max(1, math.ceil(math.ceil(num / process_count) / local_batch_size))


def eval_iterator(config: ml_collections.ConfigDict, *, split: str | None = None,
                  local_batch_size: int, process_index: int | None = None,
                  process_count: int | None = None) -> BatchIterator:
  """Every image of `split` exactly once over all hosts, padded with mask 0.

  Host p reads its even part of the split (sizes differ by at most one) and pads it to
  `eval_num_batches` batches, the same number on every host, so the sum of masks over all hosts
  is the split size (less any corrupt images).

  Returns:
    A finite iterator (with len()) of {'image': float32 [B, S, S, 3], 'label': int32 [B],
    'mask': float32 [B]}.
  """
  process_index, process_count = _process_defaults(process_index, process_count)
  opts = options_from_config(config)
  builder = sources.get_builder(config)
  split = split or dataset_info(config, builder)["eval_split"]
  batch = int(local_batch_size)
  num = sources.split_size(builder, split)
  num_batches = eval_num_batches(num, batch, process_count)
  part = sources.host_split(split, process_index, process_count)
  part_size = sources.split_size(builder, part)

  if sources.uses_index_reader(builder, opts.reader):
    fetch, _ = sources.record_fetcher(builder, part)
    parse = sources.parse_fn(builder)
    ds = tf.data.Dataset.range(part_size).batch(max(batch, 1))
    ds = ds.map(lambda idx: {"record": fetch(idx)}, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.unbatch().map(lambda ex: parse(ex["record"]), num_parallel_calls=tf.data.AUTOTUNE)
  else:
    ds = sources.stream_dataset(builder, part)

  def real(ex):
    image, ok = _eval_preprocess(ex["image"], opts)
    return {"image": image, "label": tf.cast(ex["label"], tf.int32), "mask": 1.0, "ok": ok}

  # take(): the padding below assumes exactly part_size real examples.
  ds = ds.take(part_size).map(real, num_parallel_calls=tf.data.AUTOTUNE)
  padding = tf.data.Dataset.from_tensors({
      "image": tf.zeros([opts.image_size, opts.image_size, 3], opts.dtype),
      "label": tf.constant(0, tf.int32), "mask": tf.constant(0.0), "ok": tf.constant(True)})
  ds = ds.concatenate(padding.repeat(max(0, num_batches * batch - part_size)))
  ds = ds.batch(batch, drop_remainder=True).prefetch(opts.prefetch)
  return BatchIterator(ds.with_options(_tf_options(opts)), evaluation=True,
                       num_batches=num_batches)


# ---------------------------------------------------------------------------------------------
# Metadata.
# ---------------------------------------------------------------------------------------------


def dataset_info(config: ml_collections.ConfigDict, builder=None) -> dict[str, Any]:
  """{'num_classes', 'train_split', 'eval_split', 'num_train', 'num_eval', 'image_size'}."""
  builder = builder or sources.get_builder(config)
  splits = builder.info.splits
  train_split = config.get("train_split", None) or "train"
  eval_split = config.get("eval_split", None) or (
      "validation" if "validation" in splits else "test")
  return {
      "num_classes": int(builder.info.features["label"].num_classes),
      "train_split": train_split,
      "eval_split": eval_split,
      "num_train": sources.split_size(builder, train_split),
      "num_eval": sources.split_size(builder, eval_split),
      "image_size": int(config.get("image_size", 224)),
  }


def num_examples(config: ml_collections.ConfigDict, split: str) -> int:
  """Number of examples of `split` (e.g. 'validation', or 'train[:10%]')."""
  return sources.split_size(sources.get_builder(config), split)


def steps_per_epoch(config: ml_collections.ConfigDict, global_batch_size: int) -> int:
  """Training steps per epoch: N // global batch (epochs drop their remainder)."""
  return dataset_info(config)["num_train"] // int(global_batch_size)


def preprocess_for_eval(image_bytes: tf.Tensor, config) -> tf.Tensor:
  """Eval preprocessing of one encoded image, for tools that feed their own images."""
  return _eval_preprocess(image_bytes, options_from_config(config))[0]

