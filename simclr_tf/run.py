"""The command line: the only module that defines and reads absl flags.

    python -m simclr_tf.run --flagfile=flags/fashion_mnist.flags [--flag=value ...]

flags -> `RunConfig` (validated, saved to model_dir/config.json) -> strategy -> `train.run_pretraining`.
Flag names follow the original SimCLR code where one exists.
"""

import os
import shlex
import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS

# Data
flags.DEFINE_string("dataset", "fashion_mnist",
                    "tensorflow-datasets name, or folder:/path/to/images (sub-folders = classes).")
flags.DEFINE_string("data_dir", None, "tensorflow-datasets data directory.")
flags.DEFINE_string("train_split", "train", "Split to pretrain on.")
flags.DEFINE_string("eval_split", "test", "Split to evaluate on.")
flags.DEFINE_integer("image_size", 32, "Side of the square views fed to the encoder.")
flags.DEFINE_boolean("cache_dataset", False, "Cache the decoded dataset in memory.")
flags.DEFINE_string("tf_data_service", None,
                    "grpc://host:port of a tf.data service dispatcher: decode and augment on its "
                    "workers instead of this host.")
# Augmentation
flags.DEFINE_float("color_jitter_strength", 1.0, "Colour jitter strength s.")
flags.DEFINE_boolean("use_blur", None,
                     "Gaussian blur in the views; default: on when image_size > 32 (as the paper).")
flags.DEFINE_string("augmentations", None,
                    "Ordered comma-separated transforms of the paper's Figure 4, e.g. crop,color, "
                    "from crop (+ resize, flip), cutout, color (jitter + grayscale), sobel, noise, "
                    "blur, rotate; default: the paper's recipe (then use_blur applies).")
flags.DEFINE_boolean("asymmetric_augment", False,
                     "Augment one view only; the other is the resized image (paper's Figure 5).")
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
flags.DEFINE_integer("proj_head_hidden_dim", 0, "Width of the head's hidden layers; 0: width of h.")
flags.DEFINE_string("loss", "nt_xent",
                    "nt_xent, nt_logistic, margin_triplet (paper's Table 4) or supcon (supervised "
                    "contrastive: same-class views are positives; needs labels).")
flags.DEFINE_boolean("semi_hard_negatives", False,
                     "Semi-hard negative mining for nt_logistic and margin_triplet.")
flags.DEFINE_float("margin", 1.0, "Margin m of --loss=margin_triplet.")
flags.DEFINE_float("temperature", 0.1, "Temperature of nt_xent, nt_logistic and supcon.")
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
                     "Also export f at every this many checkpoints, i.e. at the multiples of "
                     "checkpoint_steps x export_every (0: only at the end).")
flags.DEFINE_integer("keep_export_max", 5, "Exports kept in <model_dir>/export.")
flags.DEFINE_boolean("lineareval_while_pretraining", True,
                     "Train a linear probe on stop_gradient(h) when the dataset has labels.")
flags.DEFINE_integer("seed", 0, "Seed of the weights and augmentations.")
flags.DEFINE_boolean("jit_compile", False,
                     "XLA-compile the train step (pretraining, fine-tuning and distillation).")
flags.DEFINE_string("precision", "float32", "float32, bfloat16 or float16 (Keras mixed precision).")
# Modes, fine-tuning, distillation and evaluation
flags.DEFINE_string("train_mode", "pretrain",
                    "pretrain (SimCLR), finetune (incl. linear eval: --fine_tune_after_block=4) or "
                    "distill (SimCLRv2: a fine-tuned --teacher labels the train split).")
flags.DEFINE_string("mode", "train",
                    "train, eval (every new checkpoint of model_dir until the last step, or "
                    "--eval_checkpoint) or train_then_eval.")
flags.DEFINE_string("checkpoint", None,
                    "finetune/distill: start from this pretraining run directory, checkpoint or "
                    "exported encoder version (its architecture replaces the model flags); "
                    "ignored when model_dir already has a checkpoint (resume).")
flags.DEFINE_integer("fine_tune_after_block", -1,
                     "Freeze f up to: -1 nothing, 0 the stem, 1..3 block group k, 4 all of f "
                     "(linear evaluation).")
flags.DEFINE_integer("ft_proj_selector", 0,
                     "Classify the output of projection-head layer j (SimCLRv2); 0: h; "
                     "negative counts from the end as the original (-1: the last layer).")
flags.DEFINE_boolean("zero_init_logits_layer", False, "Start the classifier at zero.")
flags.DEFINE_float("train_label_fraction", 1.0,
                   "Class-balanced fraction of the train split that keeps its labels (0.01, 0.1).")
flags.DEFINE_string("train_label_ids", None,
                    "File of example ids (split indices, tfds file names, or paths below a "
                    "folder: dataset's split folder; one a line) to "
                    "fine-tune on, like the ImageNet 1%/10% lists; overrides the fraction.")
flags.DEFINE_integer("train_label_seed", 0, "Seed of the label-fraction subset.")
flags.DEFINE_string("teacher", None, "distill: the fine-tuned teacher's model_dir or checkpoint.")
flags.DEFINE_float("distill_temperature", 1.0, "Temperature of teacher and student softmaxes.")
flags.DEFINE_float("distill_label_weight", 0.0,
                   "Weight of the labelled loss (on the label subset) in distillation; 0: none.")
flags.DEFINE_integer("eval_batch_size", 256, "Batch size of evaluation.")
flags.DEFINE_string("eval_protocols", "probe,knn,linear",
                    "What evaluating a pretraining checkpoint reports: probe (the linear probe of "
                    "pretraining), knn, linear (logistic regression on extracted h).")
flags.DEFINE_string("eval_checkpoint", None,
                    "mode=eval: evaluate only this checkpoint (prefix, name or step).")
flags.DEFINE_integer("eval_every", 0, "kNN monitor every this many pretraining steps; 0: off.")
flags.DEFINE_integer("knn_k", 200, "Neighbours of the kNN classifier.")
flags.DEFINE_float("knn_temperature", 0.1, "Temperature of the kNN vote weights exp(cos / t).")
flags.DEFINE_integer("knn_bank_size", 0,
                     "Training examples in the kNN (and fast linear eval) bank; 0: all.")
flags.DEFINE_integer("eval_timeout", 0,
                     "mode=eval: stop after this many seconds without a new checkpoint; 0: never.")
flags.DEFINE_integer("eval_image_size", 0,
                     "Side of the images kNN, linear eval and classifier accuracy see (the "
                     "pretraining probe stays at image_size); 0: image_size. Larger can pay: "
                     "random resized crops enlarge objects in training (Touvron et al. 2019).")
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
                            image_size, FLAGS.cache_dataset, FLAGS.tf_data_service),
        augment=cfg.AugmentConfig(
            FLAGS.color_jitter_strength, (not small) if FLAGS.use_blur is None else FLAGS.use_blur,
            augmentations=FLAGS.augmentations, asymmetric_augment=FLAGS.asymmetric_augment),
        encoder=cfg.EncoderConfig(
            FLAGS.resnet_depth, FLAGS.width_multiplier, FLAGS.sk_ratio, FLAGS.se_ratio,
            small if FLAGS.cifar_stem is None else FLAGS.cifar_stem, FLAGS.global_bn,
            FLAGS.batch_norm_decay),
        head=cfg.HeadConfig(FLAGS.proj_head_mode, FLAGS.num_proj_layers, FLAGS.proj_out_dim,
                            proj_head_hidden_dim=FLAGS.proj_head_hidden_dim),
        loss=cfg.LossConfig(FLAGS.temperature, FLAGS.hidden_norm, loss=FLAGS.loss,
                            semi_hard_negatives=FLAGS.semi_hard_negatives, margin=FLAGS.margin),
        optimizer=cfg.OptimizerConfig(
            FLAGS.optimizer, FLAGS.learning_rate, FLAGS.learning_rate_scaling, FLAGS.momentum,
            FLAGS.weight_decay, FLAGS.warmup_epochs),
        train=cfg.TrainConfig(
            FLAGS.model_dir, FLAGS.train_batch_size, FLAGS.train_epochs, FLAGS.train_steps,
            FLAGS.steps_per_loop, FLAGS.checkpoint_steps, FLAGS.keep_checkpoint_max,
            FLAGS.lineareval_while_pretraining, FLAGS.seed, FLAGS.jit_compile, FLAGS.precision,
            export_every=FLAGS.export_every, keep_export_max=FLAGS.keep_export_max,
            train_mode=FLAGS.train_mode),
        finetune=cfg.FinetuneConfig(
            FLAGS.checkpoint, FLAGS.fine_tune_after_block, FLAGS.ft_proj_selector,
            FLAGS.zero_init_logits_layer, FLAGS.train_label_fraction, FLAGS.train_label_ids,
            FLAGS.train_label_seed),
        distill=cfg.DistillConfig(FLAGS.teacher, FLAGS.distill_temperature,
                                  FLAGS.distill_label_weight),
        eval=cfg.EvalConfig(FLAGS.eval_batch_size, FLAGS.eval_protocols, FLAGS.eval_every,
                            FLAGS.knn_k, FLAGS.knn_temperature, FLAGS.knn_bank_size,
                            FLAGS.eval_timeout, FLAGS.eval_image_size),
    )


def _fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _expected_replicas():
    """Replica count known before TensorFlow starts (for early batch-size validation)."""
    if FLAGS.strategy == "mirrored" and FLAGS.num_cpu_replicas > 0:
        return FLAGS.num_cpu_replicas
    return 1


MODES = ("train", "eval", "train_then_eval")


def _train(config, strategy, source, stop):
    """Runs the training `config.train.train_mode` names."""
    from simclr_tf import data, distill, distribute, evaluate, finetune, train

    mode = config.train.train_mode
    if mode == "finetune":
        return finetune.run_finetuning(config, strategy, source, stop_requested=stop)
    if mode == "distill":
        return distill.run_distillation(config, strategy, source, stop_requested=stop)
    monitor = None
    if config.eval.eval_every and distribute.is_chief(strategy):
        info = data.dataset_info(config.data.dataset, config.data.eval_split, config.data.data_dir)
        if info.num_classes:
            monitor = evaluate.KnnMonitor(config, info.num_classes)
        else:
            logging.warning("eval_every: %s has no labels: no kNN monitor", config.data.eval_split)
    return train.run_pretraining(config, strategy, stop_requested=stop, on_loop_end=monitor)


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}: flags are written --name=value")
    from simclr_tf import config as cfg
    from simclr_tf import distribute
    from simclr_tf import guards
    from simclr_tf.data import DatasetError

    if FLAGS.strategy not in distribute.STRATEGIES:
        _fail(f"strategy must be one of {distribute.STRATEGIES}, got {FLAGS.strategy!r}")
    if FLAGS.mode not in MODES:
        _fail(f"mode must be one of {MODES}, got {FLAGS.mode!r}")
    try:
        config = config_from_flags()
        cfg.validate(config, _expected_replicas(), FLAGS.strategy)
        if FLAGS.mode == "eval":  # the model as it was trained, with these eval settings
            from simclr_tf.evaluate import config_for_evaluation
            config = config_for_evaluation(config)
            cfg.validate(config)
        guards.check_writable(config.train.model_dir)
        if FLAGS.strategy == "multi_worker":
            guards.check_tf_config(os.environ.get("TF_CONFIG", ""))
    except (cfg.ConfigError, guards.RunError, ValueError) as e:
        _fail(str(e))

    import keras
    import tensorflow as tf

    try:
        # Before any other TF op: MultiWorkerMirroredStrategy must be created at start-up.
        strategy = distribute.build_strategy(FLAGS.strategy, FLAGS.num_cpu_replicas, FLAGS.tpu)
        keras.utils.set_random_seed(config.train.seed)
        if config.train.precision != "float32":
            keras.mixed_precision.set_dtype_policy(f"mixed_{config.train.precision}")
        cfg.validate(config, strategy.num_replicas_in_sync, FLAGS.strategy)
        if FLAGS.mode != "eval":
            from simclr_tf import finetune
            source = None
            if config.train.train_mode != "pretrain":  # the architecture of --checkpoint's run
                config, source = finetune.prepare(config)
            guards.check_same_model(config, config.train.model_dir)  # before it is replaced
            if distribute.is_chief(strategy):
                guards.remove_stale_temporaries(config.train.model_dir)
                cfg.save(config, config.train.model_dir)
            with guards.StopSignal() as stop:
                _train(config, strategy, source, stop)
        if FLAGS.mode != "train" and distribute.is_chief(strategy):
            from simclr_tf import evaluate
            evaluate.run_evaluation(config, FLAGS.eval_checkpoint if FLAGS.mode == "eval" else
                                    tf.train.latest_checkpoint(config.train.model_dir))
    except guards.Preempted as e:
        cause = stop.received or "another worker was stopped"
        print(f"preempted ({cause}): {e}; to resume, run the same command again: "
              f"python -m simclr_tf.run {shlex.join(sys.argv[1:])}", file=sys.stderr)
    except (cfg.ConfigError, DatasetError, guards.RunError, ValueError) as e:
        _fail(str(e))
    except OSError as e:
        _fail(str(e))
    except FloatingPointError as e:
        _fail(str(e))
    except tf.errors.OpError as e:
        _fail(guards.op_error_message(e, config.train.model_dir))


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)
    app.run(main)
