"""The few lines a command ends with: what was trained, what f is worth next to the baselines
measured in the same run, where the checkpoint and the export are, and what to run next."""

import dataclasses
import os
import shlex

from simclr_tf import checkpoints
from simclr_tf import config as config_lib
from simclr_tf import tasks

_ROWS = (("linear", "linear evaluation"), ("knn", "kNN"), ("probe", "probe of pretraining"))
_BASELINES = (("raw_pixels", "raw pixels"), ("random_encoder", "random f"))


def text(config, results=None, train_seconds=None, num_examples=None):
    """The summary of the run `config` describes (`results`: its evaluation, if any)."""
    train, enc = config.train, config.encoder
    model_dir = train.model_dir
    latest = checkpoints.latest(model_dir)
    step = checkpoints.step_of(latest) if latest else 0
    stem = "CIFAR" if enc.cifar_stem else "ImageNet"
    task = tasks.task_for(config)
    what = task.title
    line = (f"{what} of ResNet-{enc.resnet_depth} x{enc.width_multiplier} ({stem} stem) on "
            f"{config.data.dataset} ({config.data.train_split}): step {step}, batches of "
            f"{train.train_batch_size}")
    if num_examples:
        line += f", {step * train.train_batch_size / num_examples:.2f} epochs"
    if train_seconds is not None:
        line += f", trained for {train_seconds / 60:.1f} minutes here in {train.precision}"
    lines = [line + "."]
    if results:
        lines += _results(config, results)
        lines += _pictures(config, results)
    lines.append(f"Checkpoint: {latest or 'none yet'}")
    export = os.path.join(model_dir, "export", str(step))
    if task.exports_f and os.path.isdir(export):
        lines.append(f"Export of f: {export} (a SavedModel; images float32 in [0, 1])")
    lines += _next_steps(config, export)
    return "\n".join(lines)


def _percent(value):
    return f"{100 * value:.1f}%"


def _results(config, results):
    size = config.eval.eval_image_size or config.data.image_size
    ev = config.eval
    bank = (f"the first {ev.knn_bank_size}" if ev.knn_bank_size else "all the") + " training images"
    where = (f"Evaluated on {config.data.dataset} ({config.data.eval_split}): "
             f"{results.get('num_examples')} images at {size} px")
    if results.get("protocol") == "classifier":
        return [f"{where}: top-1 {_percent(results['top1'])}, top-5 "
                f"{_percent(results['top5'])}."]
    lines = [f"{where}; kNN (k={ev.knn_k}) and the linear evaluation (logistic regression on "
             f"frozen features) use {bank}."]
    baselines = [(key, name) for key, name in _BASELINES if f"{key}_linear_top1" in results]
    header = f"  {'':<20}{'f (this run)':>14}" + "".join(f"{name:>14}" for _, name in baselines)
    lines.append(header)
    for key, name in _ROWS:
        if f"{key}_top1" not in results:
            continue
        row = f"  {name:<20}{_percent(results[f'{key}_top1']):>14}"
        for baseline, _ in baselines:
            value = results.get(f"{baseline}_{key}_top1")
            row += f"{_percent(value) if value is not None else '':>14}"
        lines.append(row.rstrip())
    verdict = _verdict(results)
    return lines + [verdict] if verdict else lines


_PROTOCOLS = (("linear", "the linear evaluation"), ("knn", "kNN"))
_FROM = (("raw_pixels", "raw pixels"), ("random_encoder", "its random initialisation"))


def _verdict(results):
    """One sentence on f's margins over each baseline, by the linear evaluation and by kNN."""
    clauses = []
    for baseline, label in _FROM:
        gains = [(name, 100 * (results[f"{key}_top1"] - results[f"{baseline}_{key}_top1"]))
                 for key, name in _PROTOCOLS
                 if f"{key}_top1" in results and f"{baseline}_{key}_top1" in results]
        if not gains:
            continue
        if not clauses:  # the first says what the numbers are
            (name, gain), *rest = gains
            clauses.append(f"f is {gain:+.1f} points from {label} by {name}"
                           + "".join(f" and {g:+.1f} by {n}" for n, g in rest))
        else:
            clauses.append(f"{' and '.join(f'{gain:+.1f}' for _, gain in gains)} from {label}")
    if not clauses:
        return ""
    return ("  " + "; ".join(clauses) + ". SimCLR wants many epochs: see docs/quality.md for what "
            "longer runs reach.")


def _pictures(config, results):
    seen = []
    if "projector_config" in results:
        shown = min(config.eval.projector_examples, results.get("num_examples", 0))
        seen.append(f"the Projector tab shows h of {shown} of the "
                    "evaluation images")
    if "nearest_neighbours" in results:
        seen.append(f"Images shows their nearest training images ({results['nearest_neighbours']})")
    if not seen:
        return []
    return [f"See the embeddings: tensorboard --logdir={shlex.quote(config.train.model_dir)}; "
            + ", ".join(seen) + "."]


# Evaluation settings a repeated evaluation need not repeat: the bank it changes, and the ones
# that do not change what is measured.
_NOT_REPEATED = ("knn_bank_size", "eval_every", "eval_timeout")


def _measured_the_same_way(config):
    """The run's evaluation flags, those not at their defaults, that a `--mode=eval` command
    repeats to measure as the run did (it takes the command's evaluation settings)."""
    defaults = config_lib.RunConfig()
    settings = [(name, getattr(config.data, name), getattr(defaults.data, name))
                for name in ("eval_split", "eval_corrupt")]
    settings += [(field.name, getattr(config.eval, field.name), getattr(defaults.eval, field.name))
                 for field in dataclasses.fields(config.eval) if field.name not in _NOT_REPEATED]
    return [f"--{name}={shlex.quote(str(value))}" for name, value, default in settings
            if value != default]


def _next_steps(config, export):
    model_dir = config.train.model_dir
    data = [f"--dataset={config.data.dataset}", f"--image_size={config.data.image_size}"]
    if config.eval.eval_image_size:
        data.append(f"--eval_image_size={config.eval.eval_image_size}")
    if config.data.data_dir:
        data.append(f"--data_dir={config.data.data_dir}")
    command = "python -m simclr_tf.run"
    again = " ".join([f"{command} --mode=eval --model_dir={shlex.quote(model_dir)}",
                      *_measured_the_same_way(config)])
    if not tasks.task_for(config).evaluates_frozen_f:
        return ["Next:", f"  evaluate again: {again}"]
    lines = ["Next:",
             f"  evaluate again, with the whole train split as the bank: {again} "
             "--knn_bank_size=0"]
    tuned = shlex.quote(model_dir.rstrip("/") + "_finetune_1pct")
    lines.append(
        f"  fine-tune on 1% of the labels: {command} --train_mode=finetune "
        f"--mode=train_then_eval --checkpoint={shlex.quote(model_dir)} --model_dir={tuned} "
        f"{' '.join(data)} --train_label_fraction=0.01 --train_batch_size=64 "
        "--train_epochs=30 --optimizer=momentum --learning_rate=0.05 --warmup_epochs=0")
    lines.append(f"  use f: hub.KerasLayer({export!r}) in tf-keras, or "
                 f"keras.layers.TFSMLayer({export!r}, call_endpoint='serving_default') in "
                 "Keras 3 (export/README.md)")
    return lines
