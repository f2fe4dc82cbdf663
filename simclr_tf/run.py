"""The command line: the only module that defines and reads absl flags.

    python -m simclr_tf.run --flagfile=flags/fashion_mnist.flags [--flag=value ...]

flags -> `RunConfig` (validated, saved to model_dir/config.json) -> strategy -> `train.run_pretraining`.
Flag names follow the original SimCLR code where one exists.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

FLAGS = flags.FLAGS

# Data
flags.DEFINE_string("dataset", "fashion_mnist",
                    "tensorflow-datasets name, or folder:/path/to/images (sub-folders = classes).")
flags.DEFINE_string("data_dir", None, "tensorflow-datasets data directory.")
flags.DEFINE_string("train_split", "train", "Split to pretrain on.")
flags.DEFINE_string("eval_split", "test", "Split to evaluate on.")
flags.DEFINE_integer("image_size", 32, "Side of the square views fed to the encoder.")
flags.DEFINE_boolean("cache_dataset", False, "Cache the decoded dataset in memory.")
# Augmentation
flags.DEFINE_float("color_jitter_strength", 1.0, "Colour jitter strength s.")
flags.DEFINE_boolean("use_blur", None,
                     "Gaussian blur in the views; default: on when image_size > 32 (as the paper).")
# Encoder
flags.DEFINE_integer("resnet_depth", 50, "ResNet depth: 18, 34, 50, 101, 152 or 200.")
flags.DEFINE_integer("width_multiplier", 1, "ResNet width multiplier.")
flags.DEFINE_float("sk_ratio", 0.0, "Selective-kernel ratio (SimCLRv2: 0.0625); 0 disables SK.")
flags.DEFINE_float("se_ratio", 0.0, "Squeeze-and-excitation ratio; 0 disables SE.")
flags.DEFINE_boolean("cifar_stem", None,
                     "3x3 stride-1 stem without max-pool; default: on when image_size <= 32.")
flags.DEFINE_boolean("global_bn", True, "Synchronise batch-norm statistics across replicas.")
flags.DEFINE_float("batch_norm_decay", 0.9, "Batch-norm moving-average decay.")
# Head and loss
flags.DEFINE_enum("proj_head_mode", "nonlinear", ["none", "linear", "nonlinear"],
                  "Projection head g.")
flags.DEFINE_integer("num_proj_layers", 2, "Layers of the non-linear head (SimCLRv2: 3).")
flags.DEFINE_integer("proj_out_dim", 128, "Width of z.")
flags.DEFINE_float("temperature", 0.1, "NT-Xent temperature.")
flags.DEFINE_boolean("hidden_norm", True, "l2-normalise z before the similarities.")
# Optimiser
flags.DEFINE_string("optimizer", "lars", "lars, momentum or adam.")
flags.DEFINE_float("learning_rate", 0.3, "Base learning rate (scaled by the batch size).")
flags.DEFINE_string("learning_rate_scaling", "linear", "linear (x batch/256) or sqrt (x sqrt(batch)).")
flags.DEFINE_float("momentum", 0.9, "Momentum.")
flags.DEFINE_float("weight_decay", 1e-6, "Weight decay.")
flags.DEFINE_float("warmup_epochs", 10, "Linear warm-up epochs.")
# Training
flags.DEFINE_string("model_dir", "/tmp/simclr_tf", "Checkpoints, summaries, config and exports.")
flags.DEFINE_integer("train_batch_size", 512, "Global batch size (images; two views each).")
flags.DEFINE_integer("train_epochs", 100, "Epochs, unless train_steps is set.")
flags.DEFINE_integer("train_steps", 0, "Total steps; overrides train_epochs when > 0.")
flags.DEFINE_integer("steps_per_loop", 10, "Steps per compiled loop call (and per log line).")
flags.DEFINE_integer("checkpoint_steps", 500, "Checkpoint every this many steps.")
flags.DEFINE_integer("keep_checkpoint_max", 5, "Checkpoints kept.")
flags.DEFINE_integer("export_every", 0,
                     "Also export f every this many checkpoints (0: only at the end).")
flags.DEFINE_integer("keep_export_max", 5, "Exports kept in <model_dir>/export.")
flags.DEFINE_boolean("lineareval_while_pretraining", True,
                     "Train a linear probe on stop_gradient(h) when the dataset has labels.")
flags.DEFINE_integer("seed", 0, "Seed of the weights and augmentations.")
flags.DEFINE_boolean("jit_compile", False, "XLA-compile the train step.")
flags.DEFINE_string("precision", "float32", "float32, bfloat16 or float16 (Keras mixed precision).")
# Distribution
flags.DEFINE_string("strategy", "default", "default, mirrored, multi_worker or tpu.")
flags.DEFINE_integer("num_cpu_replicas", 0, "With --strategy=mirrored and no GPU: logical CPUs.")
flags.DEFINE_string("tpu", None, "TPU name or address for --strategy=tpu.")


def config_from_flags():
    """Maps the flags onto a `RunConfig` (the one place flags are read)."""
    from simclr_tf import config as cfg

    image_size = FLAGS.image_size
    small = image_size <= 32
    return cfg.RunConfig(
        data=cfg.DataConfig(FLAGS.dataset, FLAGS.data_dir, FLAGS.train_split, FLAGS.eval_split,
                            image_size, FLAGS.cache_dataset),
        augment=cfg.AugmentConfig(
            FLAGS.color_jitter_strength, (not small) if FLAGS.use_blur is None else FLAGS.use_blur),
        encoder=cfg.EncoderConfig(
            FLAGS.resnet_depth, FLAGS.width_multiplier, FLAGS.sk_ratio, FLAGS.se_ratio,
            small if FLAGS.cifar_stem is None else FLAGS.cifar_stem, FLAGS.global_bn,
            FLAGS.batch_norm_decay),
        head=cfg.HeadConfig(FLAGS.proj_head_mode, FLAGS.num_proj_layers, FLAGS.proj_out_dim),
        loss=cfg.LossConfig(FLAGS.temperature, FLAGS.hidden_norm),
        optimizer=cfg.OptimizerConfig(
            FLAGS.optimizer, FLAGS.learning_rate, FLAGS.learning_rate_scaling, FLAGS.momentum,
            FLAGS.weight_decay, FLAGS.warmup_epochs),
        train=cfg.TrainConfig(
            FLAGS.model_dir, FLAGS.train_batch_size, FLAGS.train_epochs, FLAGS.train_steps,
            FLAGS.steps_per_loop, FLAGS.checkpoint_steps, FLAGS.keep_checkpoint_max,
            FLAGS.lineareval_while_pretraining, FLAGS.seed, FLAGS.jit_compile, FLAGS.precision,
            export_every=FLAGS.export_every, keep_export_max=FLAGS.keep_export_max),
    )


def _fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _expected_replicas():
    """Replica count known before TensorFlow starts (for early batch-size validation)."""
    if FLAGS.strategy == "mirrored" and FLAGS.num_cpu_replicas > 0:
        return FLAGS.num_cpu_replicas
    return 1


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}: flags are written --name=value")
    from simclr_tf import config as cfg
    from simclr_tf import distribute
    from simclr_tf.data import DatasetError

    if FLAGS.strategy not in distribute.STRATEGIES:
        _fail(f"strategy must be one of {distribute.STRATEGIES}, got {FLAGS.strategy!r}")
    try:
        config = config_from_flags()
        cfg.validate(config, _expected_replicas())
    except (cfg.ConfigError, ValueError) as e:
        _fail(str(e))

    import keras
    import tensorflow as tf
    from simclr_tf import train

    try:
        # Before any other TF op: MultiWorkerMirroredStrategy must be created at start-up.
        strategy = distribute.build_strategy(FLAGS.strategy, FLAGS.num_cpu_replicas, FLAGS.tpu)
        keras.utils.set_random_seed(config.train.seed)
        if config.train.precision != "float32":
            keras.mixed_precision.set_dtype_policy(f"mixed_{config.train.precision}")
        cfg.validate(config, strategy.num_replicas_in_sync)
        if distribute.is_chief(strategy):
            cfg.save(config, config.train.model_dir)
        train.run_pretraining(config, strategy)
    except (cfg.ConfigError, DatasetError, ValueError) as e:
        _fail(str(e))
    except FloatingPointError as e:
        _fail(str(e))
    except tf.errors.OpError as e:
        _fail(f"{type(e).__name__}: {e.message.splitlines()[0]}")


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)
    app.run(main)
