"""Entry point: `python -m alphanet_jax.main --config configs/X.py [--workdir DIR]`.

Config fields can be overridden on the command line (`--config.batch_size=64`). The workdir
defaults to `runs/<config file name>`. On a multi-host TPU slice every worker runs the same
command; `jax.distributed.initialize()` finds the others (other clusters: pass
--coordinator_address, --num_processes and --process_id).
"""

import os
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Work directory (default: runs/<config name>).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host, non-TPU).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host, non-TPU).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host, non-TPU).")
flags.DEFINE_string("jax_cache_dir", None,
                    "Persistent compilation cache (default: $ALPHANET_JAX_CACHE or "
                    "~/.cache/alphanet_jax/jax_cache; '' turns it off).")


def _default_workdir(config_path: str) -> str:
  name = pathlib.Path(config_path.split(":")[0]).stem
  return str(pathlib.Path("runs") / name)


def _initialise_distributed():
  import jax
  if FLAGS.coordinator_address:
    # CPU processes (and the multi-process tests) need a collectives backend; it does not
    # affect TPU/GPU collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id)
  elif "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
    jax.distributed.initialize()   # Cloud TPU pod slice: discovered from the TPU metadata


def _quiet_library_logs():
  """Keeps the console to our progress lines: orbax logs every save step at INFO."""
  import logging as py_logging
  handler = logging.get_absl_handler()
  handler.addFilter(lambda r: r.levelno >= py_logging.WARNING or not any(
      part in r.pathname for part in ("/orbax/", "/tensorstore/", "/etils/")))


def main(argv):
  _quiet_library_logs()
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.config is None:
    raise app.UsageError("--config is required, e.g. --config configs/tiny.py")
  # Hide accelerators from TensorFlow: it only feeds data and must not grab TPU/GPU memory.
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")
  import jax
  from alphanet_jax import runtime
  runtime.enable_compilation_cache(FLAGS.jax_cache_dir)
  _initialise_distributed()
  logging.info("JAX process %d/%d, local devices %s, backend %s", jax.process_index(),
               jax.process_count(), jax.local_devices(), jax.default_backend())
  workdir = FLAGS.workdir or _default_workdir(flags.FLAGS["config"].config_filename)
  from alphanet_jax import train
  try:
    summary = train.run(FLAGS.config, workdir)
  except (ValueError, FileNotFoundError, NotImplementedError, train.NonFiniteLossError) as e:
    logging.error("%s", e)
    print(f"alphanet_jax.main: error: {e}", file=sys.stderr)
    sys.exit(1)
  logging.info("Finished; summary in %s/summary.json: %s", workdir, summary)


if __name__ == "__main__":
  app.run(main)
