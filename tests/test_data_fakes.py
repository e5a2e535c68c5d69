"""Helpers for the data tests: a fake ImageNet manual download and its TFDS build.

`make_manual_dir` writes the two tars TFDS's `imagenet2012` builder reads from
`<data_dir>/downloads/manual/`:
  * ILSVRC2012_img_train.tar: one `<synset>.tar` per class, each holding `<synset>_<k>.JPEG`;
  * ILSVRC2012_img_val.tar: `ILSVRC2012_val_<8 digits>.JPEG`. The builder labels them from the
    validation_labels.txt it ships, matched to the sorted file names, so the first V names get
    the first V labels of that file.
Run directly, it builds a larger fake ImageNet for measuring throughput:
  python tests/test_data_fakes.py DATA_DIR [NUM_TRAIN]
"""

from __future__ import annotations

import io
import os
import sys
import tarfile

import numpy as np
from PIL import Image

SYNSETS = ("n01440764", "n01443537", "n01484850", "n01491361", "n01494475")


def jpeg_bytes(rng, height, width, quality=90) -> bytes:
  """A smooth random colour field with noise (compresses like a photo, not like noise)."""
  y, x = np.mgrid[0:height, 0:width] / max(height, width)
  phases = rng.rand(3, 3) * 6.0
  channels = [np.sin(p[0] + 5 * x * p[1] + 3 * y * p[2]) for p in phases]
  image = 127.5 + 100 * np.stack(channels, -1) + rng.randn(height, width, 3) * 10
  buffer = io.BytesIO()
  Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=quality)
  return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(payload)
  tar.addfile(info, io.BytesIO(payload))


def make_manual_dir(data_dir, *, num_classes=3, per_class=4, num_val=5, size=(48, 64),
                    corrupt_train=(), seed=0) -> str:
  """Writes the fake manual tars; returns the manual dir.

  Args:
    data_dir: TFDS data dir; the tars go to data_dir/downloads/manual.
    num_classes: classes in the train tar (the first synsets of ImageNet's label list).
    per_class: train images per class.
    num_val: validation images.
    size: (height, width) of the images; each image varies it by up to +-25%.
    corrupt_train: (class, k) pairs whose JPEG is cut in half (a corrupt image).
    seed: numpy seed for the pixel contents.
  """
  rng = np.random.RandomState(seed)
  manual = os.path.join(data_dir, "downloads", "manual")
  os.makedirs(manual, exist_ok=True)

  def random_size():
    return tuple(int(s * rng.uniform(0.75, 1.25)) for s in size)

  with tarfile.open(os.path.join(manual, "ILSVRC2012_img_train.tar"), "w") as train:
    for c in range(num_classes):
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode="w") as class_tar:
        for k in range(per_class):
          payload = jpeg_bytes(rng, *random_size())
          if (c, k) in corrupt_train:
            payload = payload[: len(payload) // 2]
          _add(class_tar, f"{SYNSETS[c]}_{1000 + k}.JPEG", payload)
      _add(train, f"{SYNSETS[c]}.tar", inner.getvalue())
  with tarfile.open(os.path.join(manual, "ILSVRC2012_img_val.tar"), "w") as val:
    for k in range(num_val):
      _add(val, f"ILSVRC2012_val_{k + 1:08d}.JPEG", jpeg_bytes(rng, *random_size()))
  return manual


def build_imagenet(data_dir, file_format="array_record", **kwargs):
  """Writes a fake manual dir into data_dir and prepares `imagenet2012` from it."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  manual = make_manual_dir(data_dir, **kwargs)
  builder = tfds.builder("imagenet2012", data_dir=os.fspath(data_dir))
  builder.download_and_prepare(
      file_format=file_format,
      download_config=tfds.download.DownloadConfig(
          manual_dir=manual, try_download_gcs=False,
          compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return builder


if __name__ == "__main__":
  target = sys.argv[1]
  num_train = int(sys.argv[2]) if len(sys.argv) > 2 else 400
  build_imagenet(target, num_classes=len(SYNSETS), per_class=num_train // len(SYNSETS),
                 num_val=50, size=(350, 400))
  print("fake imagenet2012 in", target)
