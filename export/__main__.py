"""Exports the encoder f of a simclr_tf run as a versioned SavedModel.

    python -m export --model_dir=RUN [--export_dir=OUT] [--checkpoint=ckpt-N|N] \
        [--include_feature_maps] [--max_image_pixels=P] [--max_request_pixels=P]

The encoder is rebuilt from `RUN/config.json` and restored from the latest checkpoint (or the one
named); the SavedModel is written to `OUT/<global_step>/` (default OUT: `RUN/export`). Prints the
version directory. On failure prints `error: <message>` to stderr and exits with status 1.
"""

import dataclasses
import os

import simclr_tf  # noqa: F401  (TensorFlow with our oneDNN default, quietly: quiet_start)
import tensorflow as tf
from absl import flags

from simclr_tf import checkpoints, cli, export
from simclr_tf import config as config_lib
from simclr_tf.errors import first_line

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "The training run's directory (config.json, checkpoints).")
flags.DEFINE_string("export_dir", None, "Where version directories go; default <model_dir>/export.")
flags.DEFINE_string("checkpoint", None,
                    "Checkpoint to export: a prefix path, a name in model_dir (ckpt-500) or a "
                    "step (500); default the latest.")
flags.DEFINE_boolean("include_feature_maps", False,
                     "Also export the feature_maps signature (block_group1..4 for dense tasks).")
flags.DEFINE_integer("max_image_pixels", None,
                     "serving_bytes refuses an image file of more pixels (read from its header, "
                     "before decoding); default: the run's setting (16 M unless it set one).")
flags.DEFINE_integer("max_request_pixels", None,
                     "serving_bytes refuses a request whose images hold more pixels together; "
                     "default: the run's setting (64 M unless it set one).")


def _fail(message):
    cli.fail(message, status=1)


def main(argv):
    cli.only_flags(argv, status=1)
    if not FLAGS.model_dir:
        _fail("--model_dir is required: the directory of the training run to export")
    export_dir = FLAGS.export_dir or os.path.join(FLAGS.model_dir, "export")
    try:
        serving = None
        limits = {name: getattr(FLAGS, name) for name in ("max_image_pixels", "max_request_pixels")
                  if getattr(FLAGS, name) is not None}
        if limits:
            serving = dataclasses.replace(config_lib.load(FLAGS.model_dir).serving, **limits)
        path = export.export_checkpoint(FLAGS.model_dir, export_dir, FLAGS.checkpoint,
                                        include_feature_maps=FLAGS.include_feature_maps,
                                        serving=serving)
    except (export.ExportError, checkpoints.CheckpointError, config_lib.ConfigError) as e:
        _fail(str(e))
    except tf.errors.OpError as e:
        _fail(f"{type(e).__name__}: {first_line(e)}")
    print(path)


if __name__ == "__main__":
    cli.start(main, verbosity="warning")
