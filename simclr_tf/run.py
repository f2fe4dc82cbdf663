"""The command line: the only module that defines and reads absl flags.

    python -m simclr_tf.run --flagfile=flags/fashion_mnist.flags [--flag=value ...]

flags -> `RunConfig` (validated, saved to model_dir/config.json) -> strategy -> the train mode's
run (`pretrain`, `finetune` or `distill`, all through `loop`) -> evaluation. Every setting of
`config` is a flag of the same name, with the default and help written there; the flags below
(mode, eval_checkpoint, strategy, num_cpu_replicas, tpu) say how this invocation runs. Flag names
follow the original SimCLR code where one exists. Every error ends the command with one line.
"""

import dataclasses
import os
import re
import shlex
import sys
import typing

from absl import app, flags, logging

from simclr_tf import config as cfg

FLAGS = flags.FLAGS
MODES = ("train", "eval", "train_then_eval")
_DEFINE = {bool: flags.DEFINE_boolean, int: flags.DEFINE_integer, float: flags.DEFINE_float,
           str: flags.DEFINE_string}


def _define_setting(field):
    """The flag of a config setting: its name, type, default and help."""
    choices = field.metadata.get("choices")
    if choices is not None:
        flags.DEFINE_enum(field.name, field.default, list(choices), field.metadata["help"])
        return
    kind = next((t for t in typing.get_args(field.type) if t is not type(None)), field.type)
    _DEFINE[kind](field.name, field.default, field.metadata["help"])


for _, _field in cfg.settings():
    _define_setting(_field)

flags.DEFINE_string("mode", "train",
                    "train, eval (every new checkpoint of model_dir until the last step, or "
                    "--eval_checkpoint) or train_then_eval.")
flags.DEFINE_string("eval_checkpoint", None,
                    "mode=eval: evaluate only this checkpoint (prefix, name or step).")
flags.DEFINE_string("strategy", "default", "default, mirrored, multi_worker or tpu.")
flags.DEFINE_integer("num_cpu_replicas", 0, "With --strategy=mirrored and no GPU: logical CPUs.")
flags.DEFINE_string("tpu", None, "TPU name or address for --strategy=tpu.")


def config_from_flags():
    """Maps the flags onto a `RunConfig` (the one place flags are read)."""
    sections = {}
    for section in dataclasses.fields(cfg.RunConfig):
        values = {f.name: FLAGS[f.name].value for f in dataclasses.fields(section.type)}
        sections[section.name] = section.type(**values)
    return cfg.RunConfig(**sections)


def _fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _expected_replicas():
    """Replica count known before TensorFlow starts (for early batch-size validation)."""
    if FLAGS.strategy == "mirrored" and FLAGS.num_cpu_replicas > 0:
        return FLAGS.num_cpu_replicas
    return 1


def _train(config, strategy, source, stop):
    """Runs the training `config.train.train_mode` names."""
    from simclr_tf import data, distill, distribute, evaluate, finetune, pretrain

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
    return pretrain.run_pretraining(config, strategy, stop_requested=stop, on_loop_end=monitor)


def _prepare_model_dir(config, strategy):
    """Before training: the model_dir's checkpoints must be of this model; the chief clears
    what a killed run left half-written and writes config.json."""
    from simclr_tf import checkpoints, distribute, export

    model_dir = config.train.model_dir
    if checkpoints.latest(model_dir):
        cfg.check_same_model(config, model_dir)  # before config.json is replaced
    if distribute.is_chief(strategy):
        checkpoints.remove_stale_temporaries(model_dir)
        export.remove_stale_exports(os.path.join(model_dir, "export"))
        cfg.save(config, model_dir)


def op_error_message(error, model_dir):
    """One line for a TensorFlow error that ended a run, naming the checkpoint to resume from."""
    from simclr_tf import checkpoints
    import tensorflow as tf

    text = (getattr(error, "message", None) or str(error)).strip()
    text = re.sub(r"\{\{[^}]*\}\}\s*", "", text.splitlines()[0] if text else "")
    message = f"{type(error).__name__}: {text}"
    try:
        latest = checkpoints.latest(model_dir)
    except (tf.errors.OpError, OSError):
        latest = None
    if latest:
        message += (f"; the last complete checkpoint is {latest}: run the same command again to "
                    "resume from it")
    return message


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}: flags are written --name=value")
    from simclr_tf import checkpoints, distribute, preemption
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
        checkpoints.check_writable(config.train.model_dir)
        if FLAGS.strategy == "multi_worker":
            distribute.check_tf_config(os.environ.get("TF_CONFIG", ""))
    except (ValueError, checkpoints.CheckpointError) as e:
        _fail(str(e))

    import keras
    import tensorflow as tf

    stop = preemption.StopSignal()
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
            _prepare_model_dir(config, strategy)
            with stop:
                _train(config, strategy, source, stop)
        if FLAGS.mode != "train" and distribute.is_chief(strategy):
            from simclr_tf import evaluate
            evaluate.run_evaluation(config, FLAGS.eval_checkpoint if FLAGS.mode == "eval" else
                                    checkpoints.latest(config.train.model_dir))
    except preemption.Preempted as e:
        cause = stop.received or "another worker was stopped"
        print(f"preempted ({cause}): {e}; to resume, run the same command again: "
              f"python -m simclr_tf.run {shlex.join(sys.argv[1:])}", file=sys.stderr)
    except (ValueError, DatasetError, checkpoints.CheckpointError, OSError,
            FloatingPointError) as e:
        _fail(str(e))
    except tf.errors.OpError as e:
        _fail(op_error_message(e, config.train.model_dir))


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)
    app.run(main)
