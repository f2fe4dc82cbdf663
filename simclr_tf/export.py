"""Encoder-only export: f as one versioned SavedModel for TF Serving, TF Hub and Keras.

This module owns turning the encoder f — in memory at the end of training, or restored from a
run's checkpoint — into `<export_base>/<global_step>/`, a SavedModel that

* TF Serving serves (integer version directories; written to `.tmp-<step>-<host>-<pid>` and
  renamed into place, so a server watching `export_base` never sees half a version);
* `hub.KerasLayer` (tf-keras) loads and fine-tunes: the TF Hub "reusable SavedModel" API,
  `__call__(images, training=False)` -> h plus `variables`, `trainable_variables` and
  `regularization_losses`;
* `keras.layers.TFSMLayer(path, call_endpoint="serving_default")` (Keras 3) loads for inference.

It holds f's variables only (no projection head, linear probe or optimiser slots) and plain
differentiable ops: the encoder is rebuilt outside any strategy with per-replica batch norm, so an
encoder pretrained with global BN fine-tunes anywhere. Signatures:

* `serving_default`: `images` float32 [batch, height, width, 3] in [0, 1] -> `embedding` [batch, D];
* `serving_bytes`: `image_bytes` string [batch] (JPEG/PNG/GIF/BMP files, any size, grayscale or
  RGBA too) -> the evaluation preprocessing -> `embedding`;
* `feature_maps` (with `include_feature_maps`): like `serving_default`, plus `block_group1..4`.

`assets/simclr_export.json` beside it says what a consumer needs (image size, value range,
embedding size, encoder configuration, step, fingerprint). This module never imports the trainer or
the losses.
"""

import dataclasses
import hashlib
import json
import os
import re
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

from simclr_tf import config as config_lib
from simclr_tf import guards
from simclr_tf.augment import preprocess_for_eval
from simclr_tf.resnet import BLOCK_GROUP_ENDPOINTS, feature_extractor

SERVING_DEFAULT = "serving_default"
SERVING_BYTES = "serving_bytes"
FEATURE_MAPS = "feature_maps"
IMAGES = "images"
IMAGE_BYTES = "image_bytes"
EMBEDDING = "embedding"
METADATA_FILENAME = "simclr_export.json"
METADATA_FORMAT_VERSION = 1
ENCODER_CHECKPOINT_KEY = "encoder"
CROP_PROPORTION = 0.875
# Serving inputs may miss [0, 1] by float rounding; anything further is a caller bug (0-255 pixels,
# mean/std normalisation) that would silently give meaningless embeddings.
VALUE_TOLERANCE = 1e-3
_EXPECTED_IMAGES = "images must be float32 [batch, height, width, 3] with values in [0, 1]"
_OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
# Dtypes `__call__` names in a clear refusal (rather than the SavedModel's "Could not find matching
# concrete function"): decoded images (uint8), numpy's default integers and floats, half floats.
REFUSED_CALL_DTYPES = (tf.uint8, tf.int32, tf.int64, tf.float16, tf.float64)


class ExportError(ValueError):
    """Export cannot go ahead; the message is one line saying why and what to do."""


# --------------------------------------------------------------------------------------------
# Public API.

def export_encoder(encoder, export_base, step, run_config, include_feature_maps=False):
    """Exports an in-memory encoder f as `<export_base>/<step>/`.

    Call it outside `strategy.scope()`. The encoder may have been built with global BN under a
    strategy: a plain copy (per-replica BN, no cross-replica ops) gets its weights.

    Args:
      encoder: the Keras encoder f, as `run_config.encoder.build(...)` made it.
      export_base: directory holding the integer version directories.
      step: global step; the version directory's name.
      run_config: the run's `RunConfig` (encoder settings, image size).
      include_feature_maps: also export the `feature_maps` signature.

    Returns:
      The path of the version directory.

    Raises:
      ExportError: a different model already holds this version, or the arguments are unusable.
    """
    step = _check_step(step)
    plain = _plain_encoder(run_config)
    shapes = [tuple(v.shape) for v in encoder.weights]
    if shapes != [tuple(v.shape) for v in plain.weights]:
        raise ExportError("the encoder does not match run_config.encoder: its weights have "
                          "other shapes than the configuration builds")
    # One variable at a time: a large encoder is never held twice in host memory.
    for target, source in zip(plain.weights, encoder.weights):
        target.assign(source.numpy())
    return _write_version(plain, export_base, step, run_config, include_feature_maps, source=None)


def export_checkpoint(model_dir, export_base, checkpoint=None, include_feature_maps=False):
    """Exports f from a training checkpoint of the run in `model_dir`.

    The encoder is rebuilt from `<model_dir>/config.json`; only the checkpoint's `encoder` entry
    is read, and every variable of f must be in it.

    Args:
      model_dir: the run's directory (config.json and checkpoints).
      export_base: directory holding the integer version directories.
      checkpoint: None for the latest checkpoint; a checkpoint prefix (path, or name inside
        model_dir such as "ckpt-500"), or a step number ("500").
      include_feature_maps: also export the `feature_maps` signature.

    Returns:
      The path of the version directory.

    Raises:
      ExportError: no such run or checkpoint, a checkpoint that does not hold this encoder, or a
        different model already under this version.
    """
    path = resolve_checkpoint(model_dir, checkpoint)
    try:
        run_config = config_lib.load(model_dir)
    except config_lib.ConfigError as e:
        raise ExportError(str(e)) from None
    plain = _plain_encoder(run_config)
    restore_encoder(plain, path)
    step = checkpoint_step(path)
    return _write_version(plain, export_base, step, run_config, include_feature_maps, source=path)


def prune_exports(export_base, keep_max):
    """Deletes all but the newest `keep_max` integer version directories; returns the deleted."""
    if keep_max < 1:
        raise ExportError(f"keep_export_max must be at least 1, got {keep_max}")
    removed = []
    for _, path in list_versions(export_base)[:-keep_max]:
        tf.io.gfile.rmtree(path)
        removed.append(path)
    return removed


def list_versions(export_base):
    """[(step, path)] of the integer version directories in `export_base`, oldest first."""
    if not tf.io.gfile.isdir(export_base):
        return []
    versions = []
    for name in tf.io.gfile.listdir(export_base):
        name = name.rstrip("/")
        path = os.path.join(export_base, name)
        if name.isdigit() and tf.io.gfile.isdir(path):
            versions.append((int(name), path))
    return sorted(versions)


def load_metadata(version_dir):
    """The export's metadata dict (`<version_dir>/assets/simclr_export.json`)."""
    path = metadata_path(version_dir)
    if not tf.io.gfile.exists(path):
        raise ExportError(f"{path} not found: is {version_dir} a simclr_tf export version?")
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def metadata_path(version_dir):
    return os.path.join(version_dir, "assets", METADATA_FILENAME)


def load_encoder(version_dir):
    """The exported f as a native Keras 3 model (trainable with `fit`), rebuilt with simclr_tf.

    `keras.layers.TFSMLayer` only runs the saved functions, so Keras 3 users fine-tune this model
    instead: same architecture (from the metadata) and the SavedModel's weights.
    """
    meta = load_metadata(version_dir)
    encoder_config = config_lib.EncoderConfig(**meta["encoder"])
    model = _build_plain(encoder_config)
    saved = tf.saved_model.load(version_dir)
    shapes = [tuple(v.shape) for v in saved.variables]
    if shapes != [tuple(v.shape) for v in model.variables]:
        raise ExportError(f"{version_dir} does not hold the variables of the encoder its "
                          "metadata describes")
    model.set_weights([v.numpy() for v in saved.variables])
    return model


def fingerprint(encoder_config, image_size, weights):
    """sha256 of the encoder settings, image size and weights: the identity of an export.

    `weights` is an iterable of arrays in the model's weight order.
    """
    digest = hashlib.sha256()
    settings = {"encoder": dataclasses.asdict(encoder_config), "image_size": image_size}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for w in weights:
        w = np.ascontiguousarray(w)
        digest.update(f"{w.dtype.str}{w.shape}".encode())
        digest.update(w.tobytes())
    return f"sha256:{digest.hexdigest()}"


# --------------------------------------------------------------------------------------------
# Checkpoints.

def resolve_checkpoint(model_dir, checkpoint=None):
    """The checkpoint prefix that `checkpoint` names in `model_dir` (None: the latest)."""
    if not tf.io.gfile.exists(model_dir):
        raise ExportError(f"model_dir {model_dir} does not exist")
    if not tf.io.gfile.isdir(model_dir):
        raise ExportError(f"model_dir {model_dir} is not a directory")
    if checkpoint is None:
        path = tf.train.latest_checkpoint(model_dir)
        if path is None:
            raise ExportError(f"no checkpoint in {model_dir}: train first, or pass --checkpoint")
        return path
    checkpoint = str(checkpoint)
    candidates = [checkpoint, os.path.join(model_dir, checkpoint)]
    if checkpoint.isdigit():
        candidates.append(os.path.join(model_dir, f"ckpt-{checkpoint}"))
    for path in candidates:
        if tf.io.gfile.exists(f"{path}.index"):
            return path
    raise ExportError(f"checkpoint {checkpoint!r} not found in {model_dir}; available: "
                      f"{_available_checkpoints(model_dir) or 'none'}")


def restore_encoder(encoder, path):
    """Restores only the checkpoint's `encoder` entry into `encoder`; every variable must be there.

    `assert_existing_objects_matched` alone is not enough: a variable whose checkpoint node has
    no saved value counts as matched and silently keeps its initial value. So the checkpoint's
    object graph is checked first: as many encoder values as the model has variables, each
    present among the checkpoint's tensors.

    Raises:
      ExportError: the checkpoint has no encoder, or one that does not match `encoder`.
    """
    keys, missing = _encoder_value_keys(path)
    if not keys and not missing:
        raise ExportError(f"checkpoint {path} has no '{ENCODER_CHECKPOINT_KEY}' entry: is it a "
                          "simclr_tf pretraining checkpoint?")
    if missing:
        raise ExportError(f"checkpoint {path} misses the values of {len(missing)} encoder "
                          f"variable(s), e.g. {missing[0]}: it is incomplete")
    if len(keys) != len(encoder.variables):
        raise ExportError(f"checkpoint {path} holds {len(keys)} encoder variables but the run's "
                          f"config.json builds {len(encoder.variables)}: config and checkpoint "
                          "disagree")
    problem = None
    logger = tf.get_logger()
    level = logger.level
    # A failed restore warns about every unrestored value when it is released; the ExportError
    # below says all there is to say.
    logger.setLevel("ERROR")
    try:
        try:
            status = tf.train.Checkpoint(**{ENCODER_CHECKPOINT_KEY: encoder}).read(path)
            # The projection head, probe and optimiser slots stay behind on purpose.
            status.expect_partial()
            status.assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.OpError) as e:
            problem = _first_line(e)
    finally:
        logger.setLevel(level)
    if problem is not None:
        raise ExportError(f"checkpoint {path} does not hold this encoder: {problem}")


def checkpoint_step(path):
    """The global step of a checkpoint: the optimiser's iteration count, else its number."""
    reader = tf.train.load_checkpoint(path)
    for key in reader.get_variable_to_shape_map():
        if re.fullmatch(r"optimizer/(_iterations|iter|iterations)/\.ATTRIBUTES/VARIABLE_VALUE",
                        key):
            return int(reader.get_tensor(key))
    match = re.search(r"-(\d+)$", path)
    if match:
        return int(match.group(1))
    raise ExportError(f"cannot tell the global step of checkpoint {path}")


def _encoder_value_keys(path):
    """(keys of the encoder's variable values, those missing from the checkpoint's tensors).

    Read from the checkpoint's object graph, not from key prefixes: a variable is saved once,
    under whichever path reaches it first (the encoder's trainable variables are keyed under
    `optimizer/`). A variable node with no value at all is not listed: the count check catches it.
    """
    try:
        reader = tf.train.load_checkpoint(path)
        graph = trackable_object_graph_pb2.TrackableObjectGraph.FromString(
            reader.get_tensor(_OBJECT_GRAPH_KEY))
    except (tf.errors.OpError, ValueError) as e:
        raise ExportError(f"cannot read checkpoint {path}: {_first_line(e)}") from None
    todo = [c.node_id for c in graph.nodes[0].children if c.local_name == ENCODER_CHECKPOINT_KEY]
    seen = set(todo)
    keys, missing = [], []
    while todo:
        node = graph.nodes[todo.pop()]
        values = [a.checkpoint_key for a in node.attributes if a.name == "VARIABLE_VALUE"]
        if values:
            (keys if reader.has_tensor(values[0]) else missing).append(values[0])
        for c in node.children:
            if c.node_id not in seen:
                seen.add(c.node_id)
                todo.append(c.node_id)
    return keys, missing


def _available_checkpoints(model_dir):
    state = tf.train.get_checkpoint_state(model_dir)
    if state is None:
        return ""
    return ", ".join(os.path.basename(p) for p in state.all_model_checkpoint_paths)


# --------------------------------------------------------------------------------------------
# The SavedModel.

def _plain_encoder(run_config):
    if tf.distribute.has_strategy():
        raise ExportError("export was called inside strategy.scope(): call it outside, so the "
                          "SavedModel holds no distributed variables")
    return _build_plain(run_config.encoder)


def _build_plain(encoder_config):
    """f with per-replica BN, float32 and any input size, whatever the global Keras policy."""
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        return encoder_config.build(image_size=None, global_bn=False)
    finally:
        keras.config.set_dtype_policy(policy)


class _ReusableEncoder(tf.Module):
    """Root of the SavedModel.

    `tf.Module` makes `variables` and `trainable_variables` read-only properties; the reusable
    SavedModel API needs them as saved attributes, so plain class attributes shadow them.
    (`tf.train.Checkpoint` as root would also save its `save_counter` variable.)
    """
    variables = None
    trainable_variables = None


def _build_module(encoder, image_size, include_feature_maps, metadata_file):
    """The root object and signatures of the SavedModel for `encoder`."""
    root = _ReusableEncoder()
    root.variables = [v.value for v in encoder.variables]
    root.trainable_variables = [v.value for v in encoder.trainable_variables]
    root.regularization_losses = []
    root.metadata = tf.saved_model.Asset(metadata_file)

    @tf.function
    def call(images, training=False):
        if images.dtype != tf.float32:
            return _refused_dtype(images, encoder.output.shape[-1])
        return encoder(_checked_images(images), training=training)

    # Unknown rank, so a wrong shape meets the checks rather than the function matching; the
    # other dtypes a caller is likely to pass get functions that only refuse them.
    for dtype in (tf.float32,) + REFUSED_CALL_DTYPES:
        for training in (False, True):
            call.get_concrete_function(tf.TensorSpec(None, dtype), training)
    root.__call__ = call

    @tf.function(input_signature=[tf.TensorSpec(None, tf.float32, name=IMAGES)])
    def serving_default(images):
        return {EMBEDDING: encoder(_checked_images(images), training=False)}

    crop = image_size > 32

    # Unknown rank, as for images: with [None] declared, Grappler folds a rank check away.
    @tf.function(input_signature=[tf.TensorSpec(None, tf.string, name=IMAGE_BYTES)])
    def serving_bytes(image_bytes):
        def decode(data):
            image = tf.io.decode_image(data, channels=3, expand_animations=False)
            return preprocess_for_eval(image[None], image_size, crop=crop,
                                       crop_proportion=CROP_PROPORTION)[0]

        rank_assert = tf.debugging.Assert(
            tf.equal(tf.size(tf.shape(image_bytes)), 1),
            ["image_bytes must be a [batch] string tensor of image files (a list, even of one); "
             "got shape", tf.shape(image_bytes)], summarize=8)
        with tf.control_dependencies([rank_assert]):
            image_bytes = tf.ensure_shape(image_bytes, [None])
        images = tf.map_fn(decode, image_bytes, fn_output_signature=tf.TensorSpec(
            [image_size, image_size, 3], tf.float32))
        return {EMBEDDING: encoder(images, training=False)}

    signatures = {SERVING_DEFAULT: serving_default, SERVING_BYTES: serving_bytes}
    if include_feature_maps:
        features = feature_extractor(encoder)

        @tf.function(input_signature=[tf.TensorSpec(None, tf.float32, name=IMAGES)])
        def feature_maps(images):
            outputs = features(_checked_images(images), training=False)
            maps = {name: outputs[name] for name in BLOCK_GROUP_ENDPOINTS}
            return {EMBEDDING: outputs["final_avg_pool"], **maps}

        signatures[FEATURE_MAPS] = feature_maps
    return root, signatures


def _checked_images(images):
    """`images` as [B, H, W, 3] in [0, 1], or an InvalidArgument error saying what is expected.

    Every value checked here is computable for an input of any rank and size, because in the
    saved graph the optimiser (Grappler) ran ops ordered after a check before it: a rank check
    followed by reduce_max let a rank-3 input fail inside reduce_max with an unrelated message.
    """
    shape = tf.shape(images)
    padded = tf.concat([tf.ones([4], tf.int32), shape], axis=0)  # [-4:] exists for any rank
    shape_ok = (tf.equal(tf.size(shape), 4) & tf.equal(padded[-1], 3)
                & tf.reduce_all(padded[-4:-1] > 0))
    shape_assert = tf.debugging.Assert(shape_ok, [_EXPECTED_IMAGES, "; got shape", shape],
                                        summarize=8)
    flat = tf.reshape(images, [-1])
    low, high = tf.reduce_min(flat), tf.reduce_max(flat)  # +inf, -inf if empty (in range)
    with tf.control_dependencies([shape_assert]):
        range_assert = tf.debugging.Assert(
            tf.logical_and(low >= -VALUE_TOLERANCE, high <= 1.0 + VALUE_TOLERANCE),
            [_EXPECTED_IMAGES, "(divide uint8 pixels by 255); got values from", low, "to", high])
    with tf.control_dependencies([shape_assert, range_assert]):
        # Through a cond, whose output has no static shape: a caller's tensor of a bad static
        # shape (`__call__` is traced with it) then reaches the asserts instead of failing shape
        # inference in the encoder's first op (or in ensure_shape) with an unrelated message.
        images = tf.cond(shape_ok, lambda: tf.identity(images), lambda: tf.zeros([1, 1, 1, 3]))
        return tf.ensure_shape(images, [None, None, None, 3])


def _refused_dtype(images, embedding_size):
    """For `__call__` with non-float32 images: an InvalidArgument error saying what to do."""
    hint = "tf.cast(images, tf.float32) / 255" if images.dtype.is_integer else "cast to float32"
    refusal = tf.debugging.Assert(
        tf.constant(False),
        [f"{_EXPECTED_IMAGES} ({hint}); got {images.dtype.name}"])
    with tf.control_dependencies([refusal]):
        return tf.zeros([0, embedding_size], tf.float32)


def _metadata(run_config, step, encoder, digest, include_feature_maps, source):
    image_size = run_config.data.image_size
    signatures = {
        SERVING_DEFAULT: {"inputs": {IMAGES: "float32 [batch, height, width, 3] in [0, 1]"},
                          "outputs": {EMBEDDING: "float32 [batch, embedding_size]"}},
        SERVING_BYTES: {"inputs": {IMAGE_BYTES: "string [batch]: JPEG/PNG/GIF/BMP file bytes"},
                        "outputs": {EMBEDDING: "float32 [batch, embedding_size]"}},
    }
    if include_feature_maps:
        signatures[FEATURE_MAPS] = {
            "inputs": {IMAGES: "float32 [batch, height, width, 3] in [0, 1]"},
            "outputs": {EMBEDDING: "float32 [batch, embedding_size]",
                        **{name: "float32 [batch, h, w, c]"
                           for name in BLOCK_GROUP_ENDPOINTS}}}
    return {
        "format_version": METADATA_FORMAT_VERSION,
        "model": "simclr_tf encoder f (ResNet); the projection head is not exported",
        "global_step": step,
        "fingerprint": digest,
        "image_size": image_size,
        "input": {"dtype": "float32", "shape": [None, image_size, image_size, 3],
                  "layout": "NHWC, RGB", "value_range": [0.0, 1.0],
                  "note": "trained at image_size; other sizes run but shift the features"},
        "embedding_size": int(encoder.output.shape[-1]),
        "embedding_key": EMBEDDING,
        "preprocessing": {"bytes_signature": "simclr_tf.augment.preprocess_for_eval",
                          "center_crop": image_size > 32, "crop_proportion": CROP_PROPORTION,
                          "resize": "bilinear", "output_size": image_size},
        "signatures": signatures,
        "include_feature_maps": include_feature_maps,
        "encoder": dataclasses.asdict(run_config.encoder),
        "num_variables": len(encoder.variables),
        "num_trainable_variables": len(encoder.trainable_variables),
        "source_checkpoint": source,
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# --------------------------------------------------------------------------------------------
# Writing a version.

def _write_version(encoder, export_base, step, run_config, include_feature_maps, source):
    """Saves to a temporary directory TF Serving ignores, then renames it to `<step>`."""
    digest = fingerprint(run_config.encoder, run_config.data.image_size,
                         (v.numpy() for v in encoder.weights))
    version_dir = os.path.join(export_base, str(step))
    if tf.io.gfile.exists(version_dir):
        return _same_export(version_dir, digest, include_feature_maps)
    meta = _metadata(run_config, step, encoder, digest, include_feature_maps, source)
    guards.remove_stale_exports(export_base)
    tf.io.gfile.makedirs(export_base)
    tmp_dir = os.path.join(export_base, guards.export_temporary_name(step))
    if tf.io.gfile.exists(tmp_dir):
        tf.io.gfile.rmtree(tmp_dir)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            # The asset is copied into assets/ by the save; its source must be outside tmp_dir.
            meta_file = os.path.join(scratch, METADATA_FILENAME)
            with open(meta_file, "w") as f:
                json.dump(meta, f, indent=2, sort_keys=True)
            root, signatures = _build_module(
                encoder, run_config.data.image_size, include_feature_maps, meta_file)
            tf.saved_model.save(root, tmp_dir, signatures=signatures)
        try:
            tf.io.gfile.rename(tmp_dir, version_dir)
        except (tf.errors.OpError, OSError):
            if not tf.io.gfile.exists(version_dir):
                raise
            # Another writer finished this version first.
            return _same_export(version_dir, digest, include_feature_maps)
    finally:
        if tf.io.gfile.exists(tmp_dir):
            tf.io.gfile.rmtree(tmp_dir)
    return version_dir


def _same_export(version_dir, digest, include_feature_maps):
    """Returns version_dir when it already holds this very export, else raises."""
    try:
        existing = load_metadata(version_dir)
    except (ExportError, ValueError) as e:
        raise ExportError(f"{version_dir} exists and is not a readable simclr_tf export "
                          f"({_first_line(e)}): move it away or export elsewhere") from None
    if existing.get("fingerprint") != digest:
        raise ExportError(f"{version_dir} already holds a different model (fingerprint "
                          f"{existing.get('fingerprint')}, this one {digest}): refusing to "
                          "overwrite; move it away, or write elsewhere (--export_dir of "
                          "python -m export, a new --model_dir for training)")
    if bool(existing.get("include_feature_maps")) != bool(include_feature_maps):
        raise ExportError(f"{version_dir} holds this model with include_feature_maps="
                          f"{existing.get('include_feature_maps')}: delete it to re-export with "
                          f"include_feature_maps={include_feature_maps}")
    return version_dir


def _check_step(step):
    if hasattr(step, "numpy"):  # a tf / Keras variable such as optimizer.iterations
        step = step.numpy()
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ExportError(f"step must be a non-negative integer, got {step!r}")
    return int(step)


def _first_line(error, limit=300):
    text = (getattr(error, "message", None) or str(error)).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line if len(line) <= limit else line[:limit] + "..."
