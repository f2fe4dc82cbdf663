"""Makes the training-step fixtures of tests/test_training_fidelity.py by running the original
SimCLR TF2 code's training step.

For each case of `tests/original_training.CASES`: builds the original code's `model.Model` with
the case's flags under a one-device MirroredStrategy (as its `main` on a CPU), gives every
variable its `original_layout.recipe_value`, and runs STEPS of its training step (the body of its
`single_step`: the model on the two views concatenated on channels, `add_contrastive_loss`,
`add_supervised_loss` with one-hot labels, `add_weight_decay`, the loss divided by the replica
count, the optimiser of `build_optimizer(WarmUpAndCosineDecay(...))` applying the gradients) on
`original_training.batches(case)`. It does this twice, in two processes: with oneDNN (the run
the fixture records) and with TF_ENABLE_ONEDNN_OPTS=0 (another float order: the noise floor).
It writes next to this file:

* `training_<case>.json`: the flags; every variable's path, shape, trainability, group and
  the exact L2 norm of its update (trained minus initial); each step's learning rate and losses
  (total, contrastive, supervised, weight decay); and the noise floor: per group, and per
  variable, the relative difference ||dA - dB|| / ||dB|| between the two runs' updates, on the
  sketches (what a test can compare) and on the whole updates (for reference), and the
  relative difference of the update norms;
* `training_<case>.npz`: each variable's update at `original_training.sketch_indices(path)`.

Run it with the original code fetched (google-research/simclr; its code is not part of this
project) and Keras 2:

  TF_USE_LEGACY_KERAS=1 python tests/data/original/make_training_reference.py \
      --original_dir=/path/to/simclr/tf2 [--cases=r18_lars,...]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import tensorflow as tf

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # tests/

import original_training as ot  # noqa: E402
from original_layout import recipe_value  # noqa: E402

FLOAT_ORDERS = {"onednn": "1", "no_onednn": "0"}  # the recorded run, the noise run


def _original_model(original_dir, flags_values):
    """(model, strategy) of the original code for the given flags, built and called once."""
    sys.path.insert(0, original_dir)
    from absl import flags
    import run  # noqa: F401  (defines the original's flags)
    import model as model_lib

    flags.FLAGS.unparse_flags()
    flags.FLAGS(["run.py", "--use_tpu=False"] + [f"--{k}={v}" for k, v in flags_values.items()])
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        model = model_lib.Model(num_classes=ot.NUM_CLASSES)
        model(tf.zeros((1, ot.IMAGE_SIZE, ot.IMAGE_SIZE, 3)), training=False)
    return model, strategy


class _FloatStep(tf.keras.optimizers.schedules.LearningRateSchedule):
    """The original's schedule called with a float32 step: today's tf-keras SGD passes its int64
    `iterations`, which the original's WarmUpAndCosineDecay divides by a float and fails on.
    The values are the schedule's own."""

    def __init__(self, schedule):
        super().__init__()
        self.schedule = schedule

    def __call__(self, step):
        return self.schedule(tf.cast(step, tf.float32))

    def get_config(self):
        return self.schedule.get_config()


def train_original(original_dir, name, out_path):
    """Runs case `name` in this process; writes {path: trained value} and the per-step record."""
    from absl import flags

    flags_values = ot.case_flags(name)
    model, strategy = _original_model(original_dir, flags_values)
    import make_reference  # its recipe writer (the original's own object graph, read back)
    import model as model_lib
    import objective as obj_lib

    variables = make_reference.set_recipe_values(model)
    trainable = {id(v) for v in model.trainable_variables}
    FLAGS = flags.FLAGS
    pretrain = FLAGS.train_mode == "pretrain"
    with strategy.scope():
        schedule = model_lib.WarmUpAndCosineDecay(FLAGS.learning_rate, ot.NUM_EXAMPLES)
        if FLAGS.optimizer != "lars":  # LARS (the original's own class) casts it itself
            schedule = _FloatStep(schedule)
        optimizer = model_lib.build_optimizer(schedule)

    def replica_step(features, onehot):
        with tf.GradientTape() as tape:
            z, logits = model(features, training=True)
            loss = tf.constant(0.0)
            contrast = supervised = tf.constant(0.0)
            if z is not None:
                contrast, _, _ = obj_lib.add_contrastive_loss(
                    z, hidden_norm=FLAGS.hidden_norm, temperature=FLAGS.temperature,
                    strategy=strategy)
                loss += contrast
            if logits is not None:
                labels = tf.concat([onehot, onehot], 0) if pretrain else onehot
                supervised = obj_lib.add_supervised_loss(labels=labels, logits=logits)
                loss += supervised
            decay = model_lib.add_weight_decay(model, adjust_per_optimizer=True)
            loss += decay
            scaled = loss / strategy.num_replicas_in_sync
        grads = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss, contrast, supervised, tf.convert_to_tensor(decay, tf.float32)

    @tf.function
    def step(features, onehot):
        out = strategy.run(replica_step, (features, onehot))
        return [strategy.experimental_local_results(x)[0] for x in out]

    record = {"learning_rate": [], "loss": [], "contrast_loss": [], "supervised_loss": [],
              "weight_decay": []}
    snapshots = {}
    for count, batch in enumerate(ot.batches(name), 1):
        features = (np.concatenate([batch["view_a"], batch["view_b"]], axis=-1) if pretrain
                    else batch["view_a"])
        onehot = tf.one_hot(batch["label"], ot.NUM_CLASSES)
        record["learning_rate"].append(float(schedule(tf.cast(optimizer.iterations,
                                                              tf.float32))))
        values = step(tf.constant(features), onehot)
        for key, value in zip(("loss", "contrast_loss", "supervised_loss", "weight_decay"),
                              values):
            record[key].append(float(value))
        for snapshot, steps in ot.SNAPSHOTS.items():
            if steps == count:
                snapshots.update({f"{snapshot}/{p}": v.numpy() for p, v in variables})
    assert int(optimizer.iterations.numpy()) == ot.STEPS
    record["variables"] = [{"path": p, "shape": list(v.shape), "trainable": id(v) in trainable}
                           for p, v in variables]
    np.savez(out_path, **snapshots)
    with open(out_path + ".json", "w") as f:
        json.dump(record, f)
    print(name, os.environ.get("TF_ENABLE_ONEDNN_OPTS"), "losses",
          " ".join(f"{x:.6f}" for x in record["loss"]))


def _updates(out_path, variables, snapshot):
    with np.load(out_path) as trained:
        return {v["path"]: trained[f"{snapshot}/{v['path']}"].astype(np.float64)
                - recipe_value(v["path"], v["shape"]) for v in variables}


def _compare(a, b, variables):
    """Per variable and per group: update norms of run a, and how far run b's updates are from
    a's (relative differences on the sketches and on the whole updates)."""
    per_variable, groups = {}, {}
    for v in variables:
        path = v["path"]
        norm = float(np.linalg.norm(a[path]))
        per_variable[path] = {
            "update_norm": norm,
            "floor_sketch": ot.relative_difference([ot.sketch(path, b[path])],
                                                   [ot.sketch(path, a[path])]),
            "floor_full": ot.relative_difference([b[path]], [a[path]]),
            "floor_norm": abs(float(np.linalg.norm(b[path])) - norm) / (norm or 1.0)}
        groups.setdefault(ot.group_of(path), []).append(path)
    floors = {}
    for group, paths in sorted(groups.items()):
        floors[group] = {
            "sketch": ot.relative_difference([ot.sketch(p, b[p]) for p in paths],
                                             [ot.sketch(p, a[p]) for p in paths]),
            "full": ot.relative_difference([b[p] for p in paths], [a[p] for p in paths]),
            "update_norm": float(np.sqrt(sum(np.sum(a[p] ** 2) for p in paths))),
            "variables": len(paths)}
    return per_variable, floors


def make_fixture(original_dir, name, scratch):
    """Runs the two processes of case `name` and writes its two fixture files."""
    outs = {}
    for order, onednn in FLOAT_ORDERS.items():
        outs[order] = os.path.join(scratch, f"{name}_{order}.npz")
        env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=onednn, TF_USE_LEGACY_KERAS="1",
                   TF_CPP_MIN_LOG_LEVEL="2")
        subprocess.run([sys.executable, __file__, f"--original_dir={original_dir}",
                        f"--cases={name}", f"--worker_out={outs[order]}"], env=env, check=True)
    records = {}
    for order, path in outs.items():
        with open(path + ".json") as f:
            records[order] = json.load(f)
    variables = records["onednn"]["variables"]
    assert variables == records["no_onednn"]["variables"]
    floors, sketches = {}, {}
    for v in variables:
        v["group"] = ot.group_of(v["path"])
        v["snapshots"] = {}
    for snapshot in ot.SNAPSHOTS:
        a = _updates(outs["onednn"], variables, snapshot)
        b = _updates(outs["no_onednn"], variables, snapshot)
        per_variable, floors[snapshot] = _compare(a, b, variables)
        for v in variables:
            v["snapshots"][snapshot] = per_variable[v["path"]]
        sketches.update({f"{snapshot}/{p}": ot.sketch(p, a[p]) for p in a})
    record = records["onednn"]
    steps = {k: record[k] for k in ("learning_rate", "loss", "contrast_loss",
                                    "supervised_loss", "weight_decay")}
    noise_steps = {k: records["no_onednn"][k] for k in ("loss", "contrast_loss",
                                                         "supervised_loss", "weight_decay")}
    description = {
        "made_by": "tests/data/original/make_training_reference.py from google-research/simclr "
                   "tf2/ (its training step, under a one-device MirroredStrategy)",
        "flags": ot.case_flags(name), "num_classes": ot.NUM_CLASSES,
        "num_examples": ot.NUM_EXAMPLES, "steps": ot.STEPS, "snapshots": ot.SNAPSHOTS,
        "sketch_size": ot.SKETCH_SIZE, "per_step": steps,
        "per_step_without_onednn": noise_steps, "floors": floors, "variables": variables}
    with open(os.path.join(HERE, f"training_{name}.json"), "w") as f:
        json.dump(description, f, indent=0)
    np.savez_compressed(os.path.join(HERE, f"training_{name}.npz"), **sketches)
    for snapshot, by_group in floors.items():
        print(name, snapshot, "floors (sketch, full):",
              {g: (f"{x['sketch']:.2e}", f"{x['full']:.2e}") for g, x in by_group.items()})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--original_dir", required=True,
                        help="the original code's tf2/ directory")
    parser.add_argument("--cases", default=",".join(ot.CASES))
    parser.add_argument("--worker_out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if os.environ.get("TF_USE_LEGACY_KERAS") != "1":
        sys.exit("error: run with TF_USE_LEGACY_KERAS=1 (the original code needs Keras 2)")
    original_dir = os.path.abspath(args.original_dir)
    if args.worker_out:
        train_original(original_dir, args.cases, args.worker_out)
        return
    scratch = tempfile.mkdtemp(prefix="make_training_reference_")
    for name in args.cases.split(","):
        make_fixture(original_dir, name, scratch)


if __name__ == "__main__":
    main()
