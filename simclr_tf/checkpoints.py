"""Checkpoints: finding, reading, restoring and saving them, and the checks around each.

Everything a train mode, the evaluation or the export does with a checkpoint goes through here:

* finding one: `latest(model_dir)`, `resolve(model_dir, name)` (a prefix, a name such as
  `ckpt-500`, or a step), and `resolve_source(--checkpoint)`, which also accepts a run directory or
  an exported encoder version to start fine-tuning from;
* restoring: a whole run (`restore`) or parts of one (`read_parts`, `restore_encoder`), each
  part checked complete (a value for every variable) and of the right shapes, each failure a
  one-line `CheckpointError`;
* saving: `save` refuses non-finite weights and turns a failed write (a full disk) into a one-line
  error naming the last complete checkpoint, with the partial files removed;
* before the first save: `check_disk_space` (the run directory's own housekeeping, writability
  and temporaries, is `rundir`'s).

Why a kill -9 never leaves a half-written checkpoint: `tf.train.CheckpointManager.save` writes the
shards to `ckpt-N_temp/`, merges them into `ckpt-N.index` / `ckpt-N.data-*`, and only then rewrites
the `checkpoint` state file with `file_io.atomic_write_string_to_file` (a temporary file renamed
over it; tensorflow/python/checkpoint/checkpoint_management.py, update_checkpoint_state_internal),
before deleting old checkpoints. `latest` reads that state file, so it names either the previous
checkpoint or the complete new one.
"""

import collections
import dataclasses
import json
import os
import re
import shutil

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

from simclr_tf import config as config_lib
from simclr_tf import rundir
from simclr_tf.errors import first_line

ENCODER = "encoder"
PROJECTION_HEAD = "projection_head"
LINEAR_PROBE = "linear_probe"
CLASSIFIER = "classifier"
OPTIMIZER = "optimizer"
# Where an exported encoder version describes itself (written by `simclr_tf.export`).
EXPORT_METADATA = os.path.join("assets", "simclr_export.json")
_OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be found, read, restored or written; the message is one line saying
    why and what to do."""


# --------------------------------------------------------------------------------------------
# Finding checkpoints.

def latest(model_dir):
    """The newest complete checkpoint of `model_dir`, or None."""
    return tf.train.latest_checkpoint(model_dir)


def resolve(model_dir, checkpoint=None):
    """The checkpoint prefix that `checkpoint` names in `model_dir` (None: the latest).

    `checkpoint` is a prefix (a path, or a name inside model_dir such as "ckpt-500") or a step.
    """
    if not tf.io.gfile.exists(model_dir):
        raise CheckpointError(f"model_dir {model_dir} does not exist")
    if not tf.io.gfile.isdir(model_dir):
        raise CheckpointError(f"model_dir {model_dir} is not a directory")
    if checkpoint is None:
        path = latest(model_dir)
        if path is None:
            raise CheckpointError(f"no checkpoint in {model_dir}: train first, or pass "
                                  "--checkpoint")
        return path
    checkpoint = str(checkpoint)
    candidates = [checkpoint, os.path.join(model_dir, checkpoint)]
    if checkpoint.isdigit():
        candidates.append(os.path.join(model_dir, f"ckpt-{checkpoint}"))
    for path in candidates:
        if tf.io.gfile.exists(f"{path}.index"):
            return path
    state = tf.train.get_checkpoint_state(model_dir)
    available = ", ".join(os.path.basename(p) for p in state.all_model_checkpoint_paths) if state \
        else ""
    raise CheckpointError(f"checkpoint {checkpoint!r} not found in {model_dir}; available: "
                          f"{available or 'none'}")


def step_of(path):
    """The global step of a checkpoint: the optimiser's iteration count, else its number."""
    reader = tf.train.load_checkpoint(path)
    for key in reader.get_variable_to_shape_map():
        if re.fullmatch(rf"{OPTIMIZER}/(_iterations|iter|iterations)/\.ATTRIBUTES/VARIABLE_VALUE",
                        key):
            return int(reader.get_tensor(key))
    match = re.search(r"-(\d+)$", path)
    if match:
        return int(match.group(1))
    raise CheckpointError(f"cannot tell the global step of checkpoint {path}")


def holds(path, part):
    """Whether the checkpoint at `path` has an entry `part` (e.g. LINEAR_PROBE)."""
    return _value_keys(path, part)[0] is not None


def shapes_of(path, part):
    """The shapes of the values entry `part` holds in the checkpoint at `path`, sorted."""
    keys, _ = _value_keys(path, part)
    shapes = dict(tf.train.list_variables(path))
    return sorted(tuple(shapes[key]) for key in keys or [])


def classes_of(path, part):
    """Classes the Dense entry `part` (e.g. LINEAR_PROBE) of the checkpoint at `path` predicts
    (the length of its bias); 0 when the checkpoint has no such entry."""
    if not holds(path, part):
        return 0
    return next(shape[0] for shape in shapes_of(path, part) if len(shape) == 1)


@dataclasses.dataclass(frozen=True)
class Source:
    """Initial weights of a fine-tuning run or distillation student: a pretraining checkpoint
    (with its run's config) or an exported encoder version."""
    kind: str  # "checkpoint" or "export"
    path: str
    encoder: config_lib.EncoderConfig
    head: config_lib.HeadConfig | None  # None for an export (it has no projection head)


def read_export_metadata(version_dir):
    """The metadata dict an exported encoder version carries (`assets/simclr_export.json`)."""
    path = os.path.join(version_dir, EXPORT_METADATA)
    if not tf.io.gfile.exists(path):
        raise CheckpointError(f"{path} not found: is {version_dir} a simclr_tf export version?")
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def resolve_source(checkpoint):
    """What `--checkpoint` names: a run directory (its latest checkpoint), a checkpoint prefix
    inside a run directory, or an exported encoder version directory."""
    path = str(checkpoint)
    convert_first = (f"; if it is the original SimCLR code's (a released model), convert it "
                     f"first: python -m simclr_tf.convert --source={path} --model_dir=NEW_RUN")
    if tf.io.gfile.exists(os.path.join(path, "saved_model.pb")):
        if not tf.io.gfile.exists(os.path.join(path, EXPORT_METADATA)):
            raise CheckpointError(f"{path} is a SavedModel but not a simclr_tf export (no "
                                  f"{EXPORT_METADATA}){convert_first}")
        meta = read_export_metadata(path)
        return Source("export", path, config_lib.EncoderConfig(**meta["encoder"]), None)
    is_dir = tf.io.gfile.isdir(path)
    model_dir = path if is_dir else os.path.dirname(path)
    if not tf.io.gfile.exists(config_lib.path_in(model_dir)):
        raise CheckpointError(
            f"checkpoint {path} is neither a simclr_tf run directory, a checkpoint in one, nor an "
            f"exported encoder (no config.json or saved_model.pb){convert_first}")
    prefix = resolve(model_dir, None if is_dir else path)
    run = config_lib.load(model_dir)
    return Source("checkpoint", prefix, run.encoder, run.head)


# --------------------------------------------------------------------------------------------
# Restoring.

def restore(path, items):
    """Restores a whole run: every part of `items` ({name: trackable}, as a trainer checkpoints
    them) must find all its values in the checkpoint at `path`."""
    for name, part in items.items():
        if name != OPTIMIZER:  # its object graph reaches the model's variables too
            _check_complete(path, name, part)
    try:
        tf.train.Checkpoint(**items).restore(path).assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as e:
        raise CheckpointError(f"checkpoint {path} does not fit the model these flags build "
                              f"({first_line(e)}): use a new --model_dir, or the model flags "
                              "of the run that wrote it") from None


def restore_encoder(encoder, path):
    """Restores only the checkpoint's `encoder` entry into `encoder` (see `read_parts`)."""
    read_parts(path, **{ENCODER: encoder})


def read_parts(path, **parts):
    """Reads the entries named by `parts` (e.g. encoder=f, projection_head=g) from the checkpoint
    at `path`, leaving its other entries (optimiser slots, other heads) behind. Every variable of
    each given part must have its value there.

    `assert_existing_objects_matched` alone is not enough: a variable whose checkpoint node has
    no saved value counts as matched and silently keeps its initial value. So the checkpoint's
    object graph is checked first: as many values under each part as it has variables, each
    present among the checkpoint's tensors.

    Raises:
      CheckpointError: a part is missing, incomplete, or of another shape.
    """
    for name, part in parts.items():
        _check_complete(path, name, part)
    problem = None
    logger = tf.get_logger()
    level = logger.level
    # A failed restore warns about every unrestored value when it is released; the error below
    # says all there is to say.
    logger.setLevel("ERROR")
    try:
        try:
            status = tf.train.Checkpoint(**parts).read(path)
            status.expect_partial()
            status.assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.OpError) as e:
            problem = first_line(e)
    finally:
        logger.setLevel(level)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} does not hold this {', '.join(parts)}: "
                              f"{problem}")


def _check_complete(path, name, part):
    """CheckpointError unless the checkpoint holds a value for every variable of `part`."""
    keys, missing = _value_keys(path, name)
    if keys is None:
        raise CheckpointError(f"checkpoint {path} has no '{name}' entry: is it a simclr_tf "
                              "checkpoint of this kind of run?")
    if not keys and not missing:
        if name == PROJECTION_HEAD:
            raise CheckpointError(
                f"checkpoint {path} holds no values of its {name}: it was written before "
                "simclr_tf saved the head's layers (2026-11-30), so it cannot be resumed or "
                "fine-tuned from the head; its encoder still exports, evaluates and fine-tunes "
                "(--ft_proj_selector=0)")
        raise CheckpointError(f"checkpoint {path} holds no values of its '{name}'")
    if missing:
        raise CheckpointError(f"checkpoint {path} misses the values of {len(missing)} {name} "
                              f"variable(s), e.g. {missing[0]}: it is incomplete")
    if len(keys) != len(part.variables):
        raise CheckpointError(f"checkpoint {path} holds {len(keys)} {name} variables but the "
                              f"run's config.json builds {len(part.variables)}: config and "
                              "checkpoint disagree")


def _value_keys(path, name):
    """(keys of the values of entry `name`'s variables, those missing from the checkpoint);
    (None, None) when the checkpoint has no entry `name`.

    Read from the checkpoint's object graph, not from key prefixes: a variable is saved once,
    under whichever path reaches it first (the encoder's trainable variables are keyed under
    `optimizer/`). A variable node with no value at all is not listed: the count check catches it.
    """
    try:
        reader = tf.train.load_checkpoint(path)
        graph = object_graph(reader)
    except (tf.errors.OpError, ValueError, IndexError) as e:  # truncated data reads short
        raise CheckpointError(f"cannot read checkpoint {path}: {first_line(e)}") from None
    if graph is None or name not in top_level_names(graph):
        return None, None
    keys, missing = [], []
    for _, key in variables_below(graph, name).values():
        (keys if reader.has_tensor(key) else missing).append(key)
    return keys, missing


def object_graph(reader):
    """The object graph of a TF2 checkpoint's `reader`; None for a TF1 (name-based) one."""
    if not reader.has_tensor(_OBJECT_GRAPH_KEY):
        return None
    return trackable_object_graph_pb2.TrackableObjectGraph.FromString(
        reader.get_tensor(_OBJECT_GRAPH_KEY))


def top_level_names(graph):
    """The names of the objects a checkpoint's root holds (encoder, optimizer, model, ...)."""
    return [c.local_name for c in graph.nodes[0].children]


def variables_below(graph, name, follow=None):
    """{path: (node id, checkpoint key)} of the variables below the root's object `name`,
    reached breadth-first through the attributes `follow(attribute, parts of the path so far)`
    accepts (default: every one); each object is visited once, by its shortest such path (a
    SavedModel's bookkeeping reaches objects several ways)."""
    paths = {}
    start = [(c.node_id, [name]) for c in graph.nodes[0].children if c.local_name == name]
    seen = {node_id for node_id, _ in start}
    todo = collections.deque(start)
    while todo:
        node_id, parts = todo.popleft()
        node = graph.nodes[node_id]
        values = [a.checkpoint_key for a in node.attributes if a.name == "VARIABLE_VALUE"]
        if values:
            paths["/".join(parts)] = (node_id, values[0])
            continue
        for child in node.children:
            if child.node_id not in seen and (follow is None or follow(child.local_name, parts)):
                seen.add(child.node_id)
                todo.append((child.node_id, parts + [child.local_name]))
    return paths


# --------------------------------------------------------------------------------------------
# Saving.

def manager(checkpoint, directory, keep_checkpoint_max, step_counter):
    return tf.train.CheckpointManager(checkpoint, directory, max_to_keep=keep_checkpoint_max,
                                      step_counter=step_counter)


def save(checkpoint_manager, variables, step):
    """Saves through `checkpoint_manager` after checking every weight is finite; returns the path.

    Args:
      checkpoint_manager: the run's `tf.train.CheckpointManager`.
      variables: every variable the checkpoint holds (checked for NaN / inf first).
      step: the checkpoint's number.

    Raises:
      FloatingPointError: a weight or optimiser slot is NaN or infinite (nothing is written).
      CheckpointError: the write failed (disk full, ...); the partial files are removed and the
        state file still names the previous checkpoint.
    """
    bad = first_non_finite(variables)
    if bad is not None:
        raise FloatingPointError(
            f"{bad} is not finite after step {step}: stopping without saving; the last good "
            f"checkpoint is {latest(checkpoint_manager.directory)}")
    try:
        return checkpoint_manager.save(checkpoint_number=step)
    except (tf.errors.OpError, OSError) as e:
        prefix = os.path.join(checkpoint_manager.directory, f"ckpt-{step}")
        _remove_partial_checkpoint(prefix, checkpoint_manager)
        raise CheckpointError(
            f"writing checkpoint {prefix} failed ({first_line(e)}): the last complete "
            f"checkpoint is {latest(checkpoint_manager.directory)}; free space and run the same "
            "command again to resume from it") from None


def first_non_finite(variables):
    """The path of the first floating-point variable holding a NaN or inf, else None."""
    for v in variables:
        if tf.as_dtype(v.dtype).is_floating and not bool(tf.reduce_all(tf.math.is_finite(v))):
            return getattr(v, "path", None) or v.name
    return None


def _remove_partial_checkpoint(prefix, checkpoint_manager):
    if not rundir.is_local(prefix) or prefix in checkpoint_manager.checkpoints:
        return
    shutil.rmtree(f"{prefix}_temp", ignore_errors=True)
    for name in (f"{prefix}.index",) + tuple(tf.io.gfile.glob(f"{prefix}.data-*")):
        if os.path.exists(name):
            os.remove(name)


# --------------------------------------------------------------------------------------------
# Before the first save.

def size_in_bytes(variables):
    """Bytes the values of `variables` take in a checkpoint."""
    return sum(int(np.prod(v.shape)) * tf.as_dtype(v.dtype).size for v in variables)


def check_disk_space(directory, variables, keep_checkpoint_max, export_bytes=0):
    """CheckpointError if `directory` lacks room for the checkpoints this run keeps (+ an export).

    CheckpointManager writes a new checkpoint before deleting the oldest, so a run needs
    keep_checkpoint_max + 1 checkpoints of room (less the ones already there), and
    `export_bytes` for an export when the run writes one. Only local directories are checked.
    """
    if not rundir.is_local(directory) or not os.path.isdir(directory):
        return
    one = size_in_bytes(variables)
    state = tf.train.get_checkpoint_state(directory)
    existing = len(state.all_model_checkpoint_paths) if state else 0
    count = max(keep_checkpoint_max + 1 - existing, 1)
    needed = count * one + export_bytes
    free = shutil.disk_usage(directory).free
    if free < needed:
        export = f", and an export of {_mb(export_bytes)}" if export_bytes else ""
        raise CheckpointError(
            f"--model_dir={directory} has {_mb(free)} free but this run needs about {_mb(needed)} "
            f"({count} more checkpoint(s) of {_mb(one)} with keep_checkpoint_max="
            f"{keep_checkpoint_max}{export}): free space, lower --keep_checkpoint_max or use "
            "another --model_dir")


def _mb(n):
    return f"{n / 2**20:.0f} MB" if n < 2**30 else f"{n / 2**30:.1f} GB"
