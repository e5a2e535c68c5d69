"""Input pipelines (TFDS + tf.data): ImageNet and the offline digits dataset.

The trainer and evaluator call `train_iterator`, `eval_iterator`, `calib_iterator`,
`dataset_info`, `num_examples` and `steps_per_epoch`; see `pipeline` for the determinism and
resume design, `transforms` and `autoaugment` for the preprocessing, `sources` for dataset
discovery and `digits_builder` for the bundled dataset.

The names below are imported on first use, so `alphanet_jax.data.synthetic` and other
TensorFlow-free modules of this package do not pay for importing TensorFlow.
"""

import importlib

_EXPORTS = {
    "BatchIterator": "pipeline",
    "calib_iterator": "pipeline",
    "dataset_info": "pipeline",
    "eval_iterator": "pipeline",
    "eval_num_batches": "pipeline",
    "num_examples": "pipeline",
    "options_from_config": "pipeline",
    "steps_per_epoch": "pipeline",
    "train_iterator": "pipeline",
    "DatasetNotFoundError": "sources",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
    return getattr(module, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + __all__)
