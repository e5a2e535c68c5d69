"""Builds the offline `alphanet_digits` TFDS dataset (see `digits_builder` for what it holds).

  python -m alphanet_jax.data.digits --data_dir DIR [--file_format array_record|tfrecord]

Prints where the dataset is. Building takes a few seconds and needs no network; running it again
finds the built copy and only prints. The training pipeline does the same automatically the
first time a config names `alphanet_digits`.
"""

from __future__ import annotations

import argparse
import os

from alphanet_jax.data.digits_builder import AlphanetDigits, build  # noqa: F401  (re-exported)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description="Build the alphanet_digits TFDS dataset.")
  parser.add_argument("--data_dir", default=None,
                      help="TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
  parser.add_argument("--file_format", default=None, choices=["array_record", "tfrecord"],
                      help="default: array_record if the package is installed, else tfrecord")
  args = parser.parse_args(argv)
  builder = build(args.data_dir, args.file_format)
  splits = {name: split.num_examples for name, split in builder.info.splits.items()}
  print(f"alphanet_digits is ready at {os.fspath(builder.data_path)} "
        f"(format {builder.info.file_format.value}, splits {splits})")


if __name__ == "__main__":
  main()
