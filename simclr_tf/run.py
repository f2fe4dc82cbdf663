"""The command line: the only module that defines and reads absl flags.

    python -m simclr_tf.run --flagfile=flags/fashion_mnist.flags [--flag=value ...]

flags -> `RunConfig` (validated, saved to model_dir/config.json) -> strategy -> the train mode's
run (`pretrain`, `finetune` or `distill`, all through `loop`) -> evaluation. Every setting of
`config` is a flag of the same name, with the default and help written there; the flags below
(mode, eval_checkpoint, strategy, num_cpu_replicas, tpu, ...) say how this invocation runs. Flag
names follow the original SimCLR code, and every flag of its tf2/run.py (and the two TF1 flags its
README's commands use) is accepted with its meaning, so its commands run unchanged; one that means
nothing here says so in one line. Every error ends the command with one line.
"""

import dataclasses
import os
import re
import shlex
import sys
import time
import typing

import tensorflow as tf
from absl import flags, logging

import simclr_tf
from simclr_tf import cli
from simclr_tf import config as cfg
from simclr_tf import quiet_start
from simclr_tf import summary
from simclr_tf import tasks

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
flags.DEFINE_string("tpu_zone", None, "GCE zone of the Cloud TPU --tpu names.")
flags.DEFINE_string("gcp_project", None, "GCP project of the Cloud TPU --tpu names.")
# The original code's flags with no setting of their own here (google-research/simclr tf2/run.py,
# and --variable_schema and --train_summary_steps of its README's TF1 commands).
flags.DEFINE_boolean("use_tpu", None,
                     "The original code's: true is --strategy=tpu (the TPU --tpu_name or --master "
                     "names), false is --strategy=mirrored (every GPU, else the CPU).")
flags.DEFINE_string("tpu_name", None, "The original code's name of --tpu.")
flags.DEFINE_string("master", None, "The original code's TPU address when --tpu_name is not set.")
flags.DEFINE_integer("keep_hub_module_max", None,
                     "The original code's name of --keep_export_max (exports kept; 0: all).")
flags.DEFINE_string("eval_name", None,
                    "Defined but unused by the original TF2 code; accepted, and ignored here too.")
flags.DEFINE_string("variable_schema", None,
                    "The original TF1 code's regex of the variables fine-tuning restores. Here f "
                    "and the head layers --ft_proj_selector uses are always restored; a schema "
                    "that leaves out head_supervised turns --logits_from_probe off.")
flags.DEFINE_integer("train_summary_steps", None,
                     "The original TF1 code's summary interval; summaries are written every "
                     "--steps_per_loop steps here, so it is accepted and ignored.")


def config_from_flags():
    """Maps the flags onto a `RunConfig` (the one place flags are read)."""
    sections = {}
    for section in dataclasses.fields(cfg.RunConfig):
        values = {f.name: FLAGS[f.name].value for f in dataclasses.fields(section.type)}
        sections[section.name] = section.type(**values)
    config = cfg.RunConfig(**sections)
    if FLAGS.keep_hub_module_max is not None:
        if FLAGS["keep_export_max"].present and FLAGS.keep_export_max != FLAGS.keep_hub_module_max:
            raise cfg.ConfigError(f"--keep_hub_module_max={FLAGS.keep_hub_module_max} (the "
                                  f"original code's name of --keep_export_max) contradicts "
                                  f"--keep_export_max={FLAGS.keep_export_max}: give one")
        config = dataclasses.replace(config, train=dataclasses.replace(
            config.train, keep_export_max=FLAGS.keep_hub_module_max))
    if FLAGS.variable_schema is not None and not _restores_supervised_head(FLAGS.variable_schema):
        config = dataclasses.replace(config, finetune=dataclasses.replace(
            config.finetune, logits_from_probe=False))
    return config


def _restores_supervised_head(schema):
    """Whether the original's --variable_schema keeps its supervised head (the linear probe)."""
    try:
        return re.match(schema, "head_supervised/linear_layer/dense/kernel") is not None
    except re.error as e:
        raise cfg.ConfigError(f"variable_schema={schema!r} is not a regular expression ({e})"
                              ) from None


def strategy_from_flags():
    """(strategy name, TPU) from --strategy and --tpu, or the original code's --use_tpu,
    --tpu_name and --master; ConfigError when they contradict each other."""
    strategy, tpu = FLAGS.strategy, FLAGS.tpu or FLAGS.tpu_name
    if FLAGS.use_tpu is not None:
        wanted = "tpu" if FLAGS.use_tpu else "mirrored"
        if FLAGS["strategy"].present and FLAGS.strategy != wanted:
            raise cfg.ConfigError(f"--use_tpu={FLAGS.use_tpu} means --strategy={wanted}, but "
                                  f"--strategy={FLAGS.strategy} was given: drop one of them")
        strategy = wanted
    if strategy == "tpu" and not tpu:
        tpu = FLAGS.master
    return strategy, tpu


def _warn_about_ignored_flags(strategy):
    """One line for each of the original code's flags that means nothing here."""
    ignored = {
        "eval_name": "it is defined but unused in the original TF2 code",
        "train_summary_steps": "summaries are written every --steps_per_loop steps",
    }
    if strategy != "tpu" or FLAGS.tpu or FLAGS.tpu_name:
        ignored["master"] = "it names a TPU only with --use_tpu and no --tpu_name"
    if strategy != "tpu":
        ignored["tpu_zone"] = ignored["gcp_project"] = "they locate a TPU, and this run uses none"
    for name, why in ignored.items():
        if FLAGS[name].present:
            logging.warning("--%s is ignored: %s", name, why)
    if FLAGS.variable_schema is not None:
        logging.warning(
            "--variable_schema: fine-tuning restores f and the head layers --ft_proj_selector "
            "uses from --checkpoint; the classifier %s", "may start from the linear probe"
            if _restores_supervised_head(FLAGS.variable_schema) else
            "does not start from the linear probe (the schema leaves out head_supervised)")


def _expected_replicas(strategy):
    """Replica count known before TensorFlow starts (for early batch-size validation)."""
    if strategy == "mirrored" and FLAGS.num_cpu_replicas > 0:
        return FLAGS.num_cpu_replicas
    return 1


def _with_precision(config, strategy_name):
    """`config` with --precision=auto resolved for this hardware, its dtype policy set, and the
    choice logged (training only: evaluation is float32)."""
    import keras

    from simclr_tf import precision
    chosen, why = precision.resolve(config.train.precision, strategy_name)
    if FLAGS.mode != "eval":
        logging.info("Training in %s (%s)", chosen, why)
    keras.mixed_precision.set_dtype_policy("float32" if chosen == "float32" else f"mixed_{chosen}")
    return dataclasses.replace(config, train=dataclasses.replace(config.train, precision=chosen))


def _prepare_model_dir(config, strategy):
    """Before training: the model_dir's checkpoints must be of this model; the chief clears
    what a killed run left half-written and writes config.json."""
    from simclr_tf import checkpoints, distribute, export, rundir

    model_dir = config.train.model_dir
    if checkpoints.latest(model_dir):
        cfg.check_same_model(config, model_dir)  # before config.json is replaced
    if distribute.is_chief(strategy):
        rundir.remove_stale_temporaries(model_dir)
        export.remove_stale_exports(os.path.join(model_dir, "export"))
        cfg.save(config, model_dir)


def op_error_message(error, model_dir):
    """One line for a TensorFlow error that ended a run, naming the checkpoint to resume from."""
    from simclr_tf import checkpoints

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
    cli.only_flags(argv)
    from simclr_tf import checkpoints, distribute, preemption, rundir
    from simclr_tf.data import DatasetError

    if FLAGS.strategy not in distribute.STRATEGIES:
        cli.fail(f"strategy must be one of {distribute.STRATEGIES}, got {FLAGS.strategy!r}")
    if FLAGS.mode not in MODES:
        cli.fail(f"mode must be one of {MODES}, got {FLAGS.mode!r}")
    try:
        strategy_name, tpu = strategy_from_flags()
        _warn_about_ignored_flags(strategy_name)
        config = config_from_flags()
        cfg.validate(config, _expected_replicas(strategy_name), strategy_name)
        if FLAGS.mode == "eval":  # the model as it was trained, with these eval settings
            given = frozenset(name for name in FLAGS if FLAGS[name].present)
            config = cfg.config_for_evaluation(config, given)
            cfg.validate(config)
        rundir.check_writable(config.train.model_dir)
        if strategy_name == "multi_worker":
            distribute.check_tf_config(os.environ.get("TF_CONFIG", ""))
    except (ValueError, checkpoints.CheckpointError, rundir.NotWritableError) as e:
        cli.fail(str(e))

    import keras

    if simclr_tf.QUIET_START:
        quiet_start.hide_library_info()
    stop = preemption.StopSignal()
    train_seconds = None
    try:
        # Before any other TF op: MultiWorkerMirroredStrategy must be created at start-up. The
        # devices initialise here too (CUDA probing and all): quietly, see quiet_start.
        with quiet_start.silenced(simclr_tf.QUIET_START):
            strategy = distribute.build_strategy(strategy_name, FLAGS.num_cpu_replicas, tpu,
                                                 FLAGS.tpu_zone, FLAGS.gcp_project)
            tf.config.list_logical_devices()
        keras.utils.set_random_seed(config.train.seed)
        config = _with_precision(config, strategy_name)
        cfg.validate(config, strategy.num_replicas_in_sync, strategy_name)
        task = tasks.task_for(config)
        if FLAGS.mode != "eval":
            # Fine-tuning and distillation take the architecture of --checkpoint's run.
            config, source = task.prepare(config)
            _prepare_model_dir(config, strategy)
            t0 = time.time()
            with stop:
                task.train(config, strategy, source, stop)
            train_seconds = time.time() - t0
        results = None
        if FLAGS.mode != "train" and distribute.is_chief(strategy):
            from simclr_tf import watch
            # Evaluation computes in float32 on every machine: one checkpoint, the same figures.
            keras.mixed_precision.set_dtype_policy("float32")
            results = watch.run_evaluation(
                config, FLAGS.eval_checkpoint if FLAGS.mode == "eval" else
                checkpoints.latest(config.train.model_dir))
        if distribute.is_chief(strategy):
            print(summary.text(config, results, train_seconds, task.epoch_examples(config)))
    except preemption.Preempted as e:
        cause = stop.received or "another worker was stopped"
        print(f"preempted ({cause}): {e}; to resume, run the same command again: "
              f"python -m simclr_tf.run {shlex.join(sys.argv[1:])}", file=sys.stderr)
    except (ValueError, DatasetError, checkpoints.CheckpointError, OSError,
            FloatingPointError) as e:
        cli.fail(str(e))
    except tf.errors.OpError as e:
        cli.fail(op_error_message(e, config.train.model_dir))


if __name__ == "__main__":
    cli.start(main)
