"""Makes the reference fixtures of the converter's tests by running the original SimCLR TF2 code.

For each model in MODELS: builds the original code's `model.Model` with that model's flags, gives
its variables the values of `tests/original_layout.recipe_value`, runs it in inference mode on
`reference_images()` and writes, next to this file:

* `<name>.json`: the flags, and every variable's checkpoint path (as the original's
  `tf.train.Checkpoint(model=model)` keys it), shape and trainability;
* `<name>_outputs.npz`: the original model's outputs: its SavedModel's salient tensors
  (`initial_max_pool`, `block_group1..4`, `final_avg_pool`, `logits_sup`, `proj_head_output`) and
  each layer of its projection head (`proj_head_layer0..N`, layer 0 being h).

For `r18_1x_se_cifar` it also records the layout of the original's own SavedModel (its
`run.build_saved_model` module saved by `tf.saved_model.save`, with the Keras bookkeeping that
reaches every variable several ways): `<name>_saved_model_layout.npz` holds the SavedModel's
object graph (the serialized proto its variables checkpoint carries) and, for each checkpoint
key, the variable's path under `model/`, so a test can write that exact checkpoint with the
recipe values without storing the weights.

With `--write_originals=DIR` it also saves the original's own checkpoint and SavedModel of each
model under DIR/<name>/ (for converting them directly; not committed, they are large).

Run it with the original code fetched (google-research/simclr; its code is not part of this
project) and Keras 2:

  TF_USE_LEGACY_KERAS=1 python tests/data/original/make_reference.py \
      --original_dir=/path/to/simclr/tf2 [--write_originals=/tmp/originals]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # tests/, for original_layout

from original_layout import VALUE_SUFFIX, recipe_value, reference_images  # noqa: E402

NUM_CLASSES = 1000
SCRATCH = tempfile.mkdtemp(prefix="make_reference_")
# image_size 40 is above 32, so the original builds its ImageNet stem; at 32 its CIFAR stem.
MODELS = {
    # SimCLRv1's layout: ResNet-50 1x, 7x7 stem, 2-layer head.
    "r50_1x_sk0": dict(resnet_depth=50, width_multiplier=1, sk_ratio=0.0, num_proj_layers=2,
                       image_size=40),
    # SimCLRv2's: selective kernels, ResNet-D stem and shortcuts, 3-layer head.
    "r50_1x_sk1": dict(resnet_depth=50, width_multiplier=1, sk_ratio=0.0625, num_proj_layers=3,
                       image_size=40),
    # A width-2 SimCLRv2 model.
    "r50_2x_sk1": dict(resnet_depth=50, width_multiplier=2, sk_ratio=0.0625, num_proj_layers=3,
                       image_size=40),
    # Basic blocks, squeeze-excitation and the CIFAR stem (the original README's CIFAR-10 runs).
    "r18_1x_se_cifar": dict(resnet_depth=18, width_multiplier=1, se_ratio=0.25,
                            num_proj_layers=2, image_size=32),
    # Squeeze-excitation on bottleneck blocks, at width 2.
    "r50_2x_se": dict(resnet_depth=50, width_multiplier=2, se_ratio=0.25, num_proj_layers=2,
                      image_size=40),
    # A fine-tuned model as SimCLRv2 released them: its classifier reads head layer 1.
    "r18_1x_se_cifar_ft1": dict(resnet_depth=18, width_multiplier=1, se_ratio=0.25,
                                num_proj_layers=3, image_size=32, train_mode="finetune",
                                ft_proj_selector=1),
}


def build_original(original_dir, settings):
    """The original code's model for `settings`, built and called once."""
    sys.path.insert(0, original_dir)
    import tensorflow as tf
    from absl import flags
    import run  # noqa: F401  (defines the original's flags)
    import model as model_lib

    flags.FLAGS.unparse_flags()
    flags.FLAGS(["run.py", "--use_tpu=False", "--global_bn=False", "--train_mode=pretrain",
                 "--lineareval_while_pretraining=True", "--proj_head_mode=nonlinear", "--proj_out_dim=128", "--ft_proj_selector=0"]
                + [f"--{k}={v}" for k, v in settings.items()])
    model = model_lib.Model(num_classes=NUM_CLASSES)
    size = settings["image_size"]
    model(tf.zeros((1, size, size, 3)), training=False)
    return model


def set_recipe_values(model):
    """Gives every variable of the original's `model` its recipe value; returns
    [(checkpoint path, variable)] with paths as `tf.train.Checkpoint(model=model)` keys them.

    The recipe is written under the original's own keys (with its own object graph) and read
    back into the model, so each variable gets the value of its own path."""
    import tensorflow as tf

    probe = tf.train.Checkpoint(model=model).write(os.path.join(SCRATCH, "layout"))
    reader = tf.train.load_checkpoint(probe)
    shapes = reader.get_variable_to_shape_map()
    paths = sorted(k[: -len(VALUE_SUFFIX)] for k in shapes if k.startswith("model/"))
    values = {p: recipe_value(p, shapes[p + VALUE_SUFFIX]) for p in paths}
    names = ["_CHECKPOINTABLE_OBJECT_GRAPH"] + [p + VALUE_SUFFIX for p in paths]
    tensors = [tf.constant(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))] + [
        tf.constant(values[p]) for p in paths]
    recipe = os.path.join(SCRATCH, "recipe")
    tf.raw_ops.SaveV2(prefix=recipe, tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=tensors)
    tf.train.Checkpoint(model=model).read(recipe).assert_existing_objects_matched()
    # Every recipe value is distinct, so each variable is found by its value.
    by_value = {v.numpy().tobytes(): v for v in model.variables}
    assert len(by_value) == len(model.variables) == len(paths)
    return [(p, by_value[values[p].tobytes()]) for p in paths]


def reference_outputs(model, original_dir):
    """The original's outputs for reference_images(), in inference mode."""
    import tensorflow as tf
    from absl import flags
    import run

    images = tf.constant(reference_images(flags.FLAGS.image_size))
    saved = run.build_saved_model(model)
    outputs = {k: v.numpy() for k, v in saved(images, trainable=False).items()
               if k not in ("initial_conv", "proj_head_input")}
    hiddens = outputs["final_avg_pool"]
    selector = flags.FLAGS.ft_proj_selector  # where a fine-tuned model's classifier reads
    for j in range(flags.FLAGS.num_proj_layers + 1):
        flags.FLAGS.ft_proj_selector = j  # the head returns hiddens_list[ft_proj_selector]
        _, layer = model._projection_head(tf.constant(hiddens), False)
        outputs[f"proj_head_layer{j}"] = layer.numpy()
    flags.FLAGS.ft_proj_selector = selector
    return outputs, saved


LAYOUT_MODEL = "r18_1x_se_cifar"


def write_saved_model_layout(name, saved, variables):
    """Saves `saved` (the original's build_saved_model module) and records its checkpoint's
    object graph and which model variable each of its keys holds (found by value: every recipe
    value is distinct)."""
    import tensorflow as tf

    directory = os.path.join(SCRATCH, "saved_model")
    tf.saved_model.save(saved, directory)
    reader = tf.train.load_checkpoint(os.path.join(directory, "variables", "variables"))
    path_of = {v.numpy().tobytes(): p for p, v in variables}
    keys, paths = [], []
    for key in sorted(reader.get_variable_to_shape_map()):
        if not key.endswith(VALUE_SUFFIX):
            continue
        value = reader.get_tensor(key)
        if value.tobytes() in path_of:
            keys.append(key)
            paths.append(path_of[value.tobytes()])
    assert sorted(paths) == sorted(p for p, _ in variables), "a variable has no key"
    graph = reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH")
    np.savez_compressed(os.path.join(HERE, f"{name}_saved_model_layout.npz"),
                        object_graph=np.frombuffer(graph, np.uint8), keys=np.array(keys),
                        paths=np.array(paths))
    print(f"{name}: SavedModel layout of {len(keys)} keys, object graph {len(graph)} bytes")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--original_dir", required=True,
                        help="the original code's tf2/ directory")
    parser.add_argument("--write_originals", default=None,
                        help="also save the original's checkpoint and SavedModel here")
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    if os.environ.get("TF_USE_LEGACY_KERAS") != "1":
        sys.exit("error: run with TF_USE_LEGACY_KERAS=1 (the original code needs Keras 2)")
    import tensorflow as tf

    names = args.models.split(",")
    if len(names) > 1:  # one process each: Keras names the layers (and tensors) per process
        for name in names:
            subprocess.run([sys.executable, __file__, f"--original_dir={args.original_dir}",
                            f"--models={name}"] + (
                [f"--write_originals={args.write_originals}"] if args.write_originals else []),
                check=True)
        return
    name = names[0]
    settings = MODELS[name]
    model = build_original(os.path.abspath(args.original_dir), settings)
    variables = set_recipe_values(model)
    trainable = {id(v) for v in model.trainable_variables}
    description = {
        "flags": dict({"train_mode": "pretrain"}, **settings, num_classes=NUM_CLASSES,
                      proj_out_dim=128, proj_head_mode="nonlinear"),
        "made_by": "tests/data/original/make_reference.py from google-research/simclr tf2/",
        "variables": [{"path": p, "shape": list(v.shape), "trainable": id(v) in trainable}
                      for p, v in variables],
    }
    outputs, saved = reference_outputs(model, args.original_dir)
    with open(os.path.join(HERE, f"{name}.json"), "w") as f:
        json.dump(description, f, indent=0)
    np.savez_compressed(os.path.join(HERE, f"{name}_outputs.npz"), **outputs)
    print(name, len(variables), "variables;",
          ", ".join(f"{k} {tuple(v.shape)} max {np.abs(v).max():.3g}"
                    for k, v in sorted(outputs.items())))
    if name == LAYOUT_MODEL:
        write_saved_model_layout(name, saved, variables)
    if args.write_originals:
        out = os.path.join(args.write_originals, name)
        step = tf.Variable(1000, dtype=tf.int64)
        tf.train.Checkpoint(model=model, global_step=step).save(os.path.join(out, "ckpt"))
        tf.saved_model.save(saved, os.path.join(out, "saved_model", "1000"))

if __name__ == "__main__":
    main()
