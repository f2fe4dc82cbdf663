"""Checkpoints and SavedModels in the layout of the original SimCLR TF2 code, written without it.

`tests/data/original/*.json` hold, for a few models, the names, shapes and trainability of the
variables the original code (google-research/simclr, `tf2/`) creates, as its own checkpoints key
them (`model/resnet_model/...`). The values come from `recipe_value`, a deterministic function of
a variable's path and shape, so a test can rebuild the whole model from a few kB of JSON:

* kernels (conv and dense): N(0, 1 / fan_in), fan_in = product of all but the last dimension;
* BN gamma and moving_variance: U(0.5, 1.5); BN beta, moving_mean and dense biases: N(0, 0.1^2);
* drawn with `numpy.random.RandomState(crc32(path))` (the legacy generator, stable across numpy
  versions), in float32.

`tests/data/original/make_reference.py` puts the same values into the original code's model and
stores its outputs for `reference_images()`; the tests write the same weights here, convert them
and compare. Nothing in this file comes from the original code: only its variable names do.
"""

import json
import os
import zlib

import numpy as np
import tensorflow as tf

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "original")
VALUE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"


def recipe_value(path, shape):
    """The value of the variable at checkpoint path `path` (without the VALUE_SUFFIX)."""
    rng = np.random.RandomState(zlib.crc32(path.encode()))
    leaf = path.rsplit("/", 1)[-1]
    shape = tuple(int(d) for d in shape)
    if leaf == "kernel":
        fan_in = int(np.prod(shape[:-1]))
        value = rng.standard_normal(shape) / np.sqrt(fan_in)
    elif leaf in ("gamma", "moving_variance"):
        value = rng.uniform(0.5, 1.5, shape)
    elif leaf in ("beta", "moving_mean", "bias"):
        value = 0.1 * rng.standard_normal(shape)
    else:
        raise ValueError(f"no recipe for variable {path}")
    return value.astype(np.float32)


def reference_images(image_size=40, count=2):
    """The images the reference outputs are computed for: uniform in [0, 1), float32 NHWC."""
    return np.random.RandomState(2020).uniform(
        0, 1, (count, image_size, image_size, 3)).astype(np.float32)


def load_fixture(name):
    """(description dict, {output name: array}) of fixture `name` (e.g. "r50_1x_sk0")."""
    with open(os.path.join(FIXTURES, f"{name}.json")) as f:
        description = json.load(f)
    with np.load(os.path.join(FIXTURES, f"{name}_outputs.npz")) as outputs:
        return description, dict(outputs)


def write_real_saved_model(name, description, directory):
    """The original's own SavedModel layout (`run.build_saved_model` saved by
    `tf.saved_model.save`, recorded by make_reference.py as `<name>_saved_model_layout.npz`)
    with the recipe values: its variables checkpoint under the original's object graph and keys,
    every node of its Keras bookkeeping included. saved_model.pb is an empty SavedModel proto:
    the converter reads only the variables (and checks that the file is there)."""
    from tensorflow.core.protobuf import saved_model_pb2

    with np.load(os.path.join(FIXTURES, f"{name}_saved_model_layout.npz")) as layout:
        graph, keys, paths = layout["object_graph"].tobytes(), layout["keys"], layout["paths"]
    shapes = {v["path"]: v["shape"] for v in description["variables"]}
    os.makedirs(os.path.join(directory, "variables"))
    names = ["_CHECKPOINTABLE_OBJECT_GRAPH"] + [str(k) for k in keys]
    tensors = [tf.constant(graph)] + [tf.constant(recipe_value(str(p), shapes[str(p)]))
                                      for p in paths]
    tf.raw_ops.SaveV2(prefix=os.path.join(directory, "variables", "variables"),
                      tensor_names=names, shape_and_slices=[""] * len(names), tensors=tensors)
    with open(os.path.join(directory, "saved_model.pb"), "wb") as f:
        f.write(saved_model_pb2.SavedModel().SerializeToString())
    return directory


class _Node(tf.Module):
    """One object of the original layout's object graph; children are set as attributes."""


def _tree(variables):
    """A tf.Module tree whose checkpoint keys are the given paths: {path: tf.Variable}."""
    root, made = _Node(), {}
    for path, (value, trainable) in variables.items():
        node = root
        *parents, leaf = path.split("/")
        for part in parents:
            child = getattr(node, part, None) if hasattr(node, part) else None
            if child is None:
                child = _Node()
                setattr(node, part, child)
            node = child
        made[path] = tf.Variable(value, trainable=trainable, name=leaf)
        setattr(node, leaf, made[path])
    return root, made


def original_variables(description, drop=(), reshape=None):
    """{path under the checkpoint root: (recipe value, trainable)} of a fixture description;
    `drop`: paths left out; `reshape`: {path: another shape} (for other heads and for tests of
    bad checkpoints)."""
    variables = {v["path"]: (recipe_value(v["path"], v["shape"]), v["trainable"])
                 for v in description["variables"]}
    for path in drop:
        del variables[path]
    for path, shape in (reshape or {}).items():
        variables[path] = (recipe_value(path, shape), variables[path][1])
    return variables


def write_checkpoint(description, prefix, global_step=1000, **changes):
    """Writes a TF2 checkpoint as the original's `tf.train.Checkpoint(model=..., global_step=...)`
    keys it (global_step None: without one); returns its path. `changes`: `drop` / `reshape` of
    `original_variables`."""
    root, _ = _tree(original_variables(description, **changes))
    parts = {"model": root.model}
    if global_step is not None:
        parts["global_step"] = tf.Variable(global_step, dtype=tf.int64)
    checkpoint = tf.train.Checkpoint(**parts)
    return checkpoint.write(prefix)


def write_saved_model(description, directory, **changes):
    """Writes a SavedModel as the original's `run.build_saved_model` + `tf.saved_model.save` lays
    out its variables: the model under `model/`, and its trainable variables also in the list
    `trainable_variables_list` (so the SavedModel's checkpoint keys those by list index)."""
    variables = original_variables(description, **changes)
    root, made = _tree(variables)
    module = tf.Module()
    module.model = root.model
    module.trainable_variables_list = [made[p] for p, (_, t) in variables.items() if t]
    tf.saved_model.save(module, directory)
    return directory
