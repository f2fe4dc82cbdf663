"""What keeps a days-long run safe: checks before training, and faults handled while it runs.

Before training (each failure is a one-line `RunError`, so no traceback reaches the user):
  * `check_writable`: --model_dir can be created and a file written in it;
  * `check_tf_config`: TF_CONFIG describes a cluster this task belongs to;
  * `check_same_model`: a model_dir holding checkpoints holds them for the model these flags build
    (its config.json is compared before anything is built or overwritten);
  * `check_disk_space`: room for the checkpoints the run keeps and an export.

While training:
  * `restore_checkpoint`: a checkpoint that does not fit the model is a one-line error, never a
    silent partial restore;
  * `save_checkpoint`: refuses to save non-finite weights, and turns a failed write (disk full)
    into a one-line error naming the last complete checkpoint;
  * `StopSignal` + `agreed`: SIGTERM (a preemption notice) sets a flag that the outer loop polls
    between compiled loop calls (so within `steps_per_loop` steps); the loop saves a checkpoint and
    raises `Preempted`, and the command exits 0;
  * `remove_stale_temporaries`: what a killed run left under temporary names is deleted at start.

Why a kill -9 never leaves a half-written checkpoint: `tf.train.CheckpointManager.save` writes the
shards to `ckpt-N_temp/`, merges them into `ckpt-N.index` / `ckpt-N.data-*`, and only then rewrites
the `checkpoint` state file with `file_io.atomic_write_string_to_file` (a temporary file renamed
over it; tensorflow/python/checkpoint/checkpoint_management.py, update_checkpoint_state_internal),
before deleting old checkpoints. `tf.train.latest_checkpoint` reads that state file, so it names
either the previous checkpoint or the complete new one. config.json and exports are likewise
written under temporary names and renamed.
"""

import json
import os
import re
import shutil
import signal
import socket
import uuid

import numpy as np
import tensorflow as tf
from absl import logging

from simclr_tf import config as config_lib


class RunError(Exception):
    """A run cannot start or go on; the message is one line saying why and what to do."""


class Preempted(Exception):
    """Training stopped on request (SIGTERM) after saving; running the same command resumes."""

    def __init__(self, step, total, checkpoint):
        self.step, self.total, self.checkpoint = step, total, checkpoint
        saved = f"saved {checkpoint}" if checkpoint else "nothing trained yet, nothing saved"
        super().__init__(f"stopped at step {step} of {total}; {saved}")


# --------------------------------------------------------------------------------------------
# Before training.

def check_writable(model_dir):
    """RunError unless model_dir can be created and written (a probe file, then removed)."""
    probe = os.path.join(model_dir, f".write-test-{uuid.uuid4().hex}")
    try:
        if _is_local(model_dir):
            os.makedirs(model_dir, exist_ok=True)
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        else:
            tf.io.gfile.makedirs(model_dir)
            with tf.io.gfile.GFile(probe, "w") as f:
                f.write("ok")
            tf.io.gfile.remove(probe)
    except (OSError, tf.errors.OpError) as e:
        raise RunError(f"--model_dir={model_dir} is not writable ({_describe(e)}): choose a "
                       "directory this user can write to") from None


def check_tf_config(text):
    """RunError unless TF_CONFIG (`text`; empty = a one-worker run) is a usable cluster spec."""
    if not text or not text.strip():
        return
    example = ('e.g. {"cluster": {"worker": ["host1:2222", "host2:2222"]}, '
               '"task": {"type": "worker", "index": 0}}')
    try:
        spec = json.loads(text)
    except ValueError as e:
        raise RunError(f"TF_CONFIG is not valid JSON ({e}): expected {example}") from None
    if not isinstance(spec, dict):
        raise RunError(f"TF_CONFIG must be a JSON object, got {type(spec).__name__}: "
                       f"expected {example}")
    cluster, task = spec.get("cluster"), spec.get("task")
    if not isinstance(cluster, dict) or not cluster:
        raise RunError(f"TF_CONFIG has no \"cluster\" of jobs: expected {example}")
    for job, addresses in cluster.items():
        if isinstance(addresses, dict):
            addresses = list(addresses.values())
        if (not isinstance(addresses, list) or not addresses
                or not all(isinstance(a, str) and _HOST_PORT.fullmatch(a) for a in addresses)):
            raise RunError(f"TF_CONFIG cluster job {job!r} must be a list of \"host:port\" "
                           f"strings, got {addresses!r}")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise RunError(f"TF_CONFIG has no \"task\" with \"type\" and \"index\" (which of the "
                       f"cluster's tasks this process is): expected {example}")
    job, index = task["type"], task["index"]
    if job not in cluster:
        raise RunError(f"TF_CONFIG task type {job!r} is not a job of its cluster "
                       f"({', '.join(sorted(cluster))})")
    count = len(cluster[job])
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
        raise RunError(f"TF_CONFIG task index {index!r} is out of range: job {job!r} has {count} "
                       f"task(s), indices 0 to {count - 1}")


def model_differences(saved, config):
    """["name=saved there, new in these flags", ...] for settings that change the checkpoint."""
    there, here = saved.train.train_mode, config.train.train_mode
    if there != here:  # pretraining, fine-tuning and distillation checkpoint different objects
        return [f"train_mode={there} there, {here} in these flags"]
    differences = []
    for name, get in _MODEL_SETTINGS:
        there, here = get(saved), get(config)
        if there != here:
            differences.append(f"{name}={there} there, {here} in these flags")
    return differences


def check_same_model(config, model_dir):
    """RunError if model_dir holds checkpoints of a model other than the one `config` builds.

    Compares the run's saved config.json (call this before it is overwritten). A model_dir
    without config.json is left to `restore_checkpoint`, which checks the variables themselves.
    """
    if tf.train.latest_checkpoint(model_dir) is None:
        return
    if not os.path.exists(os.path.join(model_dir, config_lib.CONFIG_FILENAME)):
        return
    try:
        saved = config_lib.load(model_dir)
    except (ValueError, TypeError, OSError) as e:
        raise RunError(f"{model_dir}/{config_lib.CONFIG_FILENAME} is unreadable "
                       f"({_describe(e)}): use a new --model_dir") from None
    differences = model_differences(saved, config)
    if differences:
        raise RunError(f"--model_dir={model_dir} holds checkpoints of another model "
                       f"({'; '.join(differences)}): use a new --model_dir, or the model flags "
                       "of the run that wrote it")


def checkpoint_bytes(variables):
    """Bytes the values of `variables` take in a checkpoint."""
    return sum(int(np.prod(v.shape)) * tf.as_dtype(v.dtype).size for v in variables)


def check_disk_space(directory, trainer, keep_checkpoint_max):
    """RunError if `directory` lacks room for the checkpoints this run keeps, plus an export.

    CheckpointManager writes a new checkpoint before deleting the oldest, so a run needs
    keep_checkpoint_max + 1 checkpoints of room (less the ones already there) and one export of
    f. Only local directories are checked.
    """
    if not _is_local(directory) or not os.path.isdir(directory):
        return
    one = checkpoint_bytes(_checkpointed_variables(trainer))
    export = checkpoint_bytes(trainer.encoder.variables)
    state = tf.train.get_checkpoint_state(directory)
    existing = len(state.all_model_checkpoint_paths) if state else 0
    count = max(keep_checkpoint_max + 1 - existing, 1)
    needed = count * one + export
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise RunError(
            f"--model_dir={directory} has {_mb(free)} free but this run needs about {_mb(needed)} "
            f"({count} more checkpoint(s) of {_mb(one)} with keep_checkpoint_max="
            f"{keep_checkpoint_max}, and an export of {_mb(export)}): free space, lower "
            "--keep_checkpoint_max or use another --model_dir")


def remove_stale_temporaries(model_dir):
    """Deletes what a killed run left half-written under temporary names (local dirs only).

    `ckpt-N_temp/` (a checkpoint being written; TF documents it as safe to remove), temporary
    config/state files, and half-written exports (`remove_stale_exports`).
    """
    if not _is_local(model_dir) or not os.path.isdir(model_dir):
        return
    removed = []
    for name in os.listdir(model_dir):
        path = os.path.join(model_dir, name)
        if re.fullmatch(r"ckpt-\d+_temp", name) and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        elif re.fullmatch(r"(config\.json\.tmp-\d+|checkpoint\.tmp[0-9a-f]+)", name):
            os.remove(path)
            removed.append(path)
    if removed:
        logging.info("Removed what an interrupted run left half-written: %s", ", ".join(removed))
    remove_stale_exports(os.path.join(model_dir, "export"))


def export_temporary_name(step):
    """`.tmp-<step>-<host>-<pid>`: TF Serving skips dot names; host and pid tell who wrote it."""
    return f".tmp-{step}-{socket.gethostname()}-{os.getpid()}"


def remove_stale_exports(export_base):
    """Deletes `export_temporary_name` directories in `export_base` (local) whose writer is gone.

    Only this host's: a writer on another host sharing the directory may still be at work.
    """
    if not _is_local(export_base) or not os.path.isdir(export_base):
        return
    removed = []
    for name in os.listdir(export_base):
        match = re.fullmatch(r"\.tmp-\d+-(.+)-(\d+)", name)
        if (match and match.group(1) == socket.gethostname()
                and not _process_alive(int(match.group(2)))):
            shutil.rmtree(os.path.join(export_base, name), ignore_errors=True)
            removed.append(os.path.join(export_base, name))
    if removed:
        logging.info("Removed what an interrupted export left half-written: %s",
                     ", ".join(removed))


# --------------------------------------------------------------------------------------------
# While training.

def restore_checkpoint(checkpoint, path):
    """Restores `path` into `checkpoint`; RunError (one line) if they do not match."""
    try:
        checkpoint.restore(path).assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as e:
        raise RunError(f"checkpoint {path} does not fit the model these flags build "
                       f"({_describe(e)[:300]}): use a new --model_dir, or the model flags of "
                       "the run that wrote it") from None


def save_checkpoint(manager, trainer, step):
    """Saves through `manager` after checking every weight is finite; returns the path.

    Raises:
      FloatingPointError: a weight or optimiser slot is NaN or infinite (nothing is written).
      RunError: the write failed (disk full, ...); the partial files are removed and the state
        file still names the previous checkpoint.
    """
    bad = first_non_finite(_checkpointed_variables(trainer))
    if bad is not None:
        raise FloatingPointError(
            f"{bad} is not finite after step {step}: stopping without saving; the last good "
            f"checkpoint is {tf.train.latest_checkpoint(manager.directory)}")
    try:
        return manager.save(checkpoint_number=step)
    except (tf.errors.OpError, OSError) as e:
        prefix = os.path.join(manager.directory, f"ckpt-{step}")
        _remove_partial_checkpoint(prefix, manager)
        raise RunError(
            f"writing checkpoint {prefix} failed ({_describe(e)}): the last complete checkpoint "
            f"is {tf.train.latest_checkpoint(manager.directory)}; free space and run the same "
            "command again to resume from it") from None


def op_error_message(error, model_dir):
    """One line for a TensorFlow error that ended a run, naming the checkpoint to resume from."""
    text = re.sub(r"\{\{[^}]*\}\}\s*", "", _describe(error))
    message = f"{type(error).__name__}: {text}"
    try:
        latest = tf.train.latest_checkpoint(model_dir)
    except (tf.errors.OpError, OSError):
        latest = None
    if latest:
        message += (f"; the last complete checkpoint is {latest}: run the same command again to "
                    "resume from it")
    return message


def first_non_finite(variables):
    """The path of the first floating-point variable holding a NaN or inf, else None."""
    for v in variables:
        if tf.as_dtype(v.dtype).is_floating and not bool(tf.reduce_all(tf.math.is_finite(v))):
            return getattr(v, "path", None) or v.name
    return None


class StopSignal:
    """While entered, SIGTERM sets a flag instead of killing the process; call it to read it.

    The handler only records the signal: the outer training loop checks between compiled loop
    calls (Python runs signal handlers between bytecodes, not inside a TensorFlow call).
    """

    def __init__(self, signals=(signal.SIGTERM,)):
        self._signals = tuple(signals)
        self._previous = {}
        self.received = None

    def __enter__(self):
        for sig in self._signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        del frame
        self.received = signal.Signals(signum).name
        logging.warning("Received %s: saving a checkpoint after the current loop, then stopping",
                        self.received)

    def __call__(self):
        return self.received is not None


def agreed(strategy, requested):
    """A callable telling whether any worker was asked to stop (False if `requested` is None).

    Every worker of a MultiWorkerMirroredStrategy must stop at the same step (the next step's
    collectives would wait for the one that left), so their flags are all-reduced: one tiny
    collective per loop call. Other strategies run one Python process: no collective.
    """
    if requested is None:
        return lambda: False
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return requested

    @tf.function
    def any_worker(flag):
        per_replica = strategy.run(tf.identity, args=(flag,))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None) > 0

    return lambda: bool(any_worker(tf.constant(1.0 if requested() else 0.0)))


# --------------------------------------------------------------------------------------------
# Helpers.

def _unless_pretraining(config, value):
    """A fine-tuning setting, or None in a pretraining run (where the flag is not used)."""
    return None if config.train.train_mode == "pretrain" else value


# Settings that change which variables a checkpoint holds or what its optimiser slots mean; a run
# resuming from a checkpoint must match them (learning rate, steps, data, ... may change).
_MODEL_SETTINGS = (
    ("resnet_depth", lambda c: c.encoder.resnet_depth),
    ("width_multiplier", lambda c: c.encoder.width_multiplier),
    ("sk_ratio", lambda c: c.encoder.sk_ratio),
    ("se_ratio", lambda c: c.encoder.se_ratio),
    ("cifar_stem", lambda c: c.encoder.cifar_stem),
    ("proj_head_mode", lambda c: c.head.proj_head_mode),
    ("num_proj_layers", lambda c: c.head.num_proj_layers),
    ("proj_out_dim", lambda c: c.head.proj_out_dim),
    ("proj_head_hidden_dim", lambda c: c.head.proj_head_hidden_dim),
    ("optimizer", lambda c: c.optimizer.optimizer),
    ("lineareval_while_pretraining", lambda c: c.train.lineareval_while_pretraining),
    # Which layers of f train, and which head layer feeds the classifier, change the checkpoint.
    ("fine_tune_after_block", lambda c: _unless_pretraining(c, c.finetune.fine_tune_after_block)),
    ("ft_proj_selector", lambda c: _unless_pretraining(c, c.finetune.ft_proj_selector)),
    # float16 wraps the optimiser in a LossScaleOptimizer (other variables in the checkpoint).
    ("precision", lambda c: "float16" if c.train.precision == "float16" else "float32/bfloat16"),
)

_HOST_PORT = re.compile(r"(\[[0-9a-fA-F:.]+\]|[^\s:\[\]/]+):\d{1,5}")


def _checkpointed_variables(trainer):
    parts = [trainer.encoder, trainer.head] + ([trainer.probe] if trainer.probe else [])
    return [v for part in parts for v in part.variables] + list(trainer.optimizer.variables)


def _remove_partial_checkpoint(prefix, manager):
    if not _is_local(prefix) or prefix in manager.checkpoints:
        return
    shutil.rmtree(f"{prefix}_temp", ignore_errors=True)
    for name in (f"{prefix}.index",) + tuple(tf.io.gfile.glob(f"{prefix}.data-*")):
        if os.path.exists(name):
            os.remove(name)


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_local(path):
    return "://" not in str(path)


def _mb(n):
    return f"{n / 2**20:.0f} MB" if n < 2**30 else f"{n / 2**30:.1f} GB"


def _describe(error):
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = (getattr(error, "message", None) or str(error)).strip()
    return text.splitlines()[0] if text else type(error).__name__
