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
  RGBA too) -> the evaluation preprocessing -> `embedding`. Before anything is decoded, the
  files' headers must show a known format and at most `max_image_pixels` an image and
  `max_request_pixels` a request (`config.ServingConfig`, recorded in the metadata);
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
import shutil
import socket
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from simclr_tf import augment
from simclr_tf import checkpoints
from simclr_tf import config as config_lib
from simclr_tf import image_headers
from simclr_tf import models
from simclr_tf import rundir
from simclr_tf.checkpoints import read_export_metadata as load_metadata
from simclr_tf.errors import first_line
from simclr_tf.resnet import BLOCK_GROUP_ENDPOINTS, OUTPUT_ENDPOINT, feature_extractor

SERVING_DEFAULT = "serving_default"
SERVING_BYTES = "serving_bytes"
FEATURE_MAPS = "feature_maps"
IMAGES = "images"
IMAGE_BYTES = "image_bytes"
EMBEDDING = "embedding"
METADATA_FILENAME = os.path.basename(checkpoints.EXPORT_METADATA)
METADATA_FORMAT_VERSION = 1
# Serving inputs may miss [0, 1] by float rounding; anything further is a caller bug (0-255 pixels,
# mean/std normalisation) that would silently give meaningless embeddings.
VALUE_TOLERANCE = 1e-3
_EXPECTED_IMAGES = "images must be float32 [batch, height, width, 3] with values in [0, 1]"
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
      encoder: the Keras encoder f, as `models.build_encoder(run_config.encoder, ...)` made it.
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


def export_checkpoint(model_dir, export_base, checkpoint=None, include_feature_maps=False,
                      serving=None):
    """Exports f from a training checkpoint of the run in `model_dir`.

    The encoder is rebuilt from `<model_dir>/config.json`; only the checkpoint's `encoder` entry
    is read, and every variable of f must be in it.

    Args:
      model_dir: the run's directory (config.json and checkpoints).
      export_base: directory holding the integer version directories.
      checkpoint: None for the latest checkpoint; a checkpoint prefix (path, or name inside
        model_dir such as "ckpt-500"), or a step number ("500").
      include_feature_maps: also export the `feature_maps` signature.
      serving: a `config.ServingConfig` with the limits of `serving_bytes`; None: the run's.

    Returns:
      The path of the version directory.

    Raises:
      checkpoints.CheckpointError: no such run or checkpoint, or one that does not hold this
        encoder.
      ExportError: no config.json, or a different model already under this version.
    """
    path = checkpoints.resolve(model_dir, checkpoint)
    try:
        run_config = config_lib.load(model_dir)
        if serving is not None:
            config_lib.validate_serving(serving)
            run_config = dataclasses.replace(run_config, serving=serving)
    except config_lib.ConfigError as e:
        raise ExportError(str(e)) from None
    plain = _plain_encoder(run_config)
    checkpoints.restore_encoder(plain, path)
    step = checkpoints.step_of(path)
    return _write_version(plain, export_base, step, run_config, include_feature_maps, source=path)


def prune_exports(export_base, keep_max):
    """Deletes all but the newest `keep_max` integer version directories (0: keeps all);
    returns the deleted."""
    if keep_max < 0:
        raise ExportError(f"keep_export_max must be >= 0 (0: all), got {keep_max}")
    if keep_max == 0:
        return []
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


def metadata_path(version_dir):
    return os.path.join(version_dir, checkpoints.EXPORT_METADATA)


def load_encoder(version_dir):
    """The exported f as a native Keras 3 model (trainable with `fit`), rebuilt with simclr_tf.

    `keras.layers.TFSMLayer` only runs the saved functions, so Keras 3 users fine-tune this model
    instead: same architecture (from the metadata) and the SavedModel's weights.
    """
    meta = load_metadata(version_dir)
    model = models.build_float32_encoder(config_lib.EncoderConfig(**meta["encoder"]))
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
# The SavedModel.

def _plain_encoder(run_config):
    if tf.distribute.has_strategy():
        raise ExportError("export was called inside strategy.scope(): call it outside, so the "
                          "SavedModel holds no distributed variables")
    return models.build_float32_encoder(run_config.encoder)


class _ReusableEncoder(tf.Module):
    """Root of the SavedModel.

    `tf.Module` makes `variables` and `trainable_variables` read-only properties; the reusable
    SavedModel API needs them as saved attributes, so plain class attributes shadow them.
    (`tf.train.Checkpoint` as root would also save its `save_counter` variable.)
    """
    variables = None
    trainable_variables = None


def _build_module(encoder, image_size, include_feature_maps, metadata_file, serving,
                  resize_method="bilinear"):
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

    crop = augment.eval_crop(image_size)

    # Unknown rank, as for images: with [None] declared, Grappler folds a rank check away.
    @tf.function(input_signature=[tf.TensorSpec(None, tf.string, name=IMAGE_BYTES)])
    def serving_bytes(image_bytes):
        def decode(data):
            image = tf.io.decode_image(data, channels=3, expand_animations=False)
            return augment.preprocess_for_eval(image[None], image_size, crop=crop,
                                               resize_method=resize_method)[0]

        rank_assert = tf.debugging.Assert(
            tf.equal(tf.size(tf.shape(image_bytes)), 1),
            ["image_bytes must be a [batch] string tensor of image files (a list, even of one); "
             "got shape", tf.shape(image_bytes)], summarize=8)
        with tf.control_dependencies([rank_assert]):
            image_bytes = tf.ensure_shape(image_bytes, [None])
        image_bytes = _within_pixel_budget(image_bytes, serving)
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
            return {EMBEDDING: outputs[OUTPUT_ENDPOINT], **maps}

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


def _within_pixel_budget(image_bytes, serving):
    """`image_bytes` [batch], once their headers show a JPEG/PNG/GIF/BMP each, of at most
    `max_image_pixels` each and `max_request_pixels` together; else an InvalidArgument error
    whose one line names the file, its size and the limit. Nothing is decoded for this."""
    sizes = tf.map_fn(image_headers.dimensions, image_bytes,
                      fn_output_signature=tf.TensorSpec([2], tf.int64))
    pixels = sizes[:, 0] * sizes[:, 1]
    count = tf.shape(image_bytes, out_type=tf.int64)[0]

    def first(bad):
        """Index of the first True of `bad`, or `count` (a padding row below) if none."""
        return tf.concat([tf.where(bad)[:, 0], [count]], axis=0)[0]

    padded_sizes = tf.concat([sizes, tf.zeros([1, 2], tf.int64)], axis=0)
    # (An empty batch used to fail inside batch norm: "Incompatible shapes: [64] vs. [0,...]".)
    empty_assert = tf.debugging.Assert(count > 0, [
        "image_bytes is an empty batch: send at least one image file"])
    with tf.control_dependencies([empty_assert]):
        unknown = first(sizes[:, 0] < 0)
        format_assert = tf.debugging.Assert(tf.equal(unknown, count), [tf.strings.format(
            "image_bytes[{}] is not a " + image_headers.FORMATS + " file (or its header is cut "
            "short)", unknown)])
    with tf.control_dependencies([format_assert]):
        large = first(pixels > serving.max_image_pixels)
        height, width = tf.unstack(tf.gather(padded_sizes, large))
        image_assert = tf.debugging.Assert(tf.equal(large, count), [tf.strings.format(
            "image_bytes[{}] is {}x{} = {} pixels, over the limit of "
            f"{serving.max_image_pixels} pixels an image set at export (max_image_pixels)",
            (large, width, height, width * height))])
    with tf.control_dependencies([image_assert]):
        total = tf.reduce_sum(pixels)
        request_assert = tf.debugging.Assert(
            total <= serving.max_request_pixels, [tf.strings.format(
                "the {} images of the request hold {} pixels, over the limit of "
                f"{serving.max_request_pixels} pixels a request set at export "
                "(max_request_pixels)", (count, total))])
    with tf.control_dependencies([request_assert]):
        return tf.identity(image_bytes)


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
                          "center_crop": augment.eval_crop(image_size),
                          "crop_proportion": augment.EVAL_CROP_PROPORTION,
                          "resize": run_config.data.eval_resize, "output_size": image_size},
        "signatures": signatures,
        "include_feature_maps": include_feature_maps,
        "serving_limits": dataclasses.asdict(run_config.serving),
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
        return _same_export(version_dir, digest, include_feature_maps, run_config.serving)
    meta = _metadata(run_config, step, encoder, digest, include_feature_maps, source)
    remove_stale_exports(export_base)
    tf.io.gfile.makedirs(export_base)
    tmp_dir = os.path.join(export_base, _temporary_name(step))
    if tf.io.gfile.exists(tmp_dir):
        tf.io.gfile.rmtree(tmp_dir)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            # The asset is copied into assets/ by the save; its source must be outside tmp_dir.
            meta_file = os.path.join(scratch, METADATA_FILENAME)
            with open(meta_file, "w") as f:
                json.dump(meta, f, indent=2, sort_keys=True)
            root, signatures = _build_module(
                encoder, run_config.data.image_size, include_feature_maps, meta_file,
                run_config.serving, run_config.data.eval_resize)
            tf.saved_model.save(root, tmp_dir, signatures=signatures)
        try:
            tf.io.gfile.rename(tmp_dir, version_dir)
        except (tf.errors.OpError, OSError):
            if not tf.io.gfile.exists(version_dir):
                raise
            # Another writer finished this version first.
            return _same_export(version_dir, digest, include_feature_maps, run_config.serving)
    finally:
        if tf.io.gfile.exists(tmp_dir):
            tf.io.gfile.rmtree(tmp_dir)
    return version_dir


def _same_export(version_dir, digest, include_feature_maps, serving):
    """Returns version_dir when it already holds this very export, else raises."""
    try:
        existing = load_metadata(version_dir)
    except (checkpoints.CheckpointError, ValueError) as e:
        raise ExportError(f"{version_dir} exists and is not a readable simclr_tf export "
                          f"({first_line(e)}): move it away or export elsewhere") from None
    if existing.get("fingerprint") != digest:
        raise ExportError(f"{version_dir} already holds a different model (fingerprint "
                          f"{existing.get('fingerprint')}, this one {digest}): refusing to "
                          "overwrite; move it away, or write elsewhere (--export_dir of "
                          "python -m export, a new --model_dir for training)")
    if bool(existing.get("include_feature_maps")) != bool(include_feature_maps):
        raise ExportError(f"{version_dir} holds this model with include_feature_maps="
                          f"{existing.get('include_feature_maps')}: delete it to re-export with "
                          f"include_feature_maps={include_feature_maps}")
    limits = dataclasses.asdict(serving)
    if existing.get("serving_limits", limits) != limits:
        raise ExportError(f"{version_dir} holds this model with the serving limits "
                          f"{existing.get('serving_limits')}: delete it to re-export with "
                          f"{limits}")
    return version_dir


def _temporary_name(step):
    """`.tmp-<step>-<host>-<pid>`: TF Serving skips dot names; host and pid tell who wrote it."""
    return f".tmp-{step}-{socket.gethostname()}-{os.getpid()}"


def remove_stale_exports(export_base):
    """Deletes the temporary directories of exports to `export_base` (local) that were killed.

    Only this host's, whose writing process is gone: a writer on another host sharing the
    directory may still be at work.
    """
    if not rundir.is_local(export_base) or not os.path.isdir(export_base):
        return
    removed = []
    for name in os.listdir(export_base):
        match = re.fullmatch(r"\.tmp-\d+-(.+)-(\d+)", name)
        if (match and match.group(1) == socket.gethostname()
                and not rundir.process_alive(int(match.group(2)))):
            shutil.rmtree(os.path.join(export_base, name), ignore_errors=True)
            removed.append(os.path.join(export_base, name))
    if removed:
        logging.info("Removed what an interrupted export left half-written: %s",
                     ", ".join(removed))


def _check_step(step):
    if hasattr(step, "numpy"):  # a tf / Keras variable such as optimizer.iterations
        step = step.numpy()
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ExportError(f"step must be a non-negative integer, got {step!r}")
    return int(step)
