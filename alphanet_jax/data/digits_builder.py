"""`alphanet_digits`: scikit-learn's handwritten digits as a TFDS dataset, built offline.

scikit-learn ships the UCI optical-recognition digits inside the package
(`sklearn.datasets.load_digits`: 1797 grey 8x8 images, values 0-16, 10 classes), so this dataset
builds with no network in a few seconds. It is what `configs/tiny.py` trains on.

Stored form:
  * image: 32x32x3 uint8 PNG. The 8x8 grid is scaled to 0-255 (v * 255 / 16), upsampled 4x with
    separable linear interpolation at pixel centres (align_corners=False; edges replicated;
    rounded half up), and the grey channel is replicated to RGB. Ink is bright on black.
  * label: the digit, 0-9.
  * index: the row of `load_digits()`, so every example traces back to its source.

Splits (fixed, stratified, about 80/20): for each class in order, its row indices are permuted
with `numpy.random.RandomState(0)` (one generator shared by the classes, in class order) and the
first round(0.2 * n_class) go to `test`, the rest to `train`. That gives 1438 train and 359 test
images. The split uses only numpy's legacy generator, whose streams are frozen, so it does not
change with the scikit-learn version.

Build it from the command line with `python -m alphanet_jax.data.digits --data_dir DIR`.
"""

from __future__ import annotations

import io

import numpy as np
import tensorflow_datasets as tfds

NAME = "alphanet_digits"
IMAGE_SIZE = 32
TEST_FRACTION = 0.2
SPLIT_SEED = 0


def _upsample_linear(images: np.ndarray, size: int) -> np.ndarray:
  """[N, h, w] float -> [N, size, size] float, linear at pixel centres, edges replicated."""
  n, h, w = images.shape

  def weights(n_in):
    src = (np.arange(size) + 0.5) * n_in / size - 0.5
    src = np.clip(src, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    matrix = np.zeros((size, n_in))
    matrix[np.arange(size), lo] += 1 - frac
    matrix[np.arange(size), hi] += frac
    return matrix

  rows, cols = weights(h), weights(w)
  del n
  return np.einsum("ih,nhw,jw->nij", rows, images, cols)


def digits_images_and_labels():
  """All 1797 digits as (uint8 [N, 32, 32, 3], int64 [N]), in load_digits order."""
  from sklearn import datasets  # Imported lazily: only building needs scikit-learn.

  digits = datasets.load_digits()
  grey = digits.images.astype(np.float64) * (255.0 / 16.0)
  big = _upsample_linear(grey, IMAGE_SIZE)
  big = np.clip(np.floor(big + 0.5), 0, 255).astype(np.uint8)
  rgb = np.repeat(big[..., None], 3, axis=-1)
  return rgb, digits.target.astype(np.int64)


def _png(image: np.ndarray) -> bytes:
  # Encoded here with PIL: TFDS would start a TF session per image, which is slower.
  from PIL import Image  # pylint: disable=g-import-not-at-top

  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


def stratified_split(labels: np.ndarray, test_fraction=TEST_FRACTION, seed=SPLIT_SEED):
  """The fixed split described in the module docstring: (train_indices, test_indices), sorted."""
  rng = np.random.RandomState(seed)
  train, test = [], []
  for label in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == label))
    n_test = int(round(test_fraction * len(members)))
    test.extend(members[:n_test])
    train.extend(members[n_test:])
  return np.sort(np.array(train)), np.sort(np.array(test))


class AlphanetDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 handwritten digits, stored as 32x32 RGB, fixed stratified split."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3),
                                         encoding_format="png"),
            "label": tfds.features.ClassLabel(num_classes=10),
            "index": np.int64,
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the data ships inside scikit-learn.
    images, labels = digits_images_and_labels()
    train, test = stratified_split(labels)
    return {
        "train": self._generate_examples(images, labels, train),
        "test": self._generate_examples(images, labels, test),
    }

  def _generate_examples(self, images, labels, indices):
    for i in indices:
      yield int(i), {"image": _png(images[i]), "label": int(labels[i]), "index": int(i)}


def default_file_format() -> str:
  """ArrayRecord (random access: cheap exact resume) where the package exists, else TFRecord."""
  try:
    import array_record  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    return "array_record"
  except ImportError:
    return "tfrecord"


def build(data_dir: str | None = None, file_format: str | None = None) -> tfds.core.DatasetBuilder:
  """Builds the dataset into `data_dir` unless it is there already; returns the builder."""
  builder = AlphanetDigits(data_dir=data_dir)
  if not builder.is_prepared():
    builder.download_and_prepare(
        file_format=file_format or default_file_format(),
        download_config=tfds.download.DownloadConfig(
            try_download_gcs=False,
            compute_stats=tfds.download.ComputeStatsMode.SKIP,
        ))
  return builder
