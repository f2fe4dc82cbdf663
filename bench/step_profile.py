"""Where a training step's time goes, op type by op type; prints one JSON line at the end.

    python bench/step_profile.py --precision=bfloat16        # ResNet-18 CIFAR stem, 32 px, batch 128

The bare encoder step and the full SimCLR step of `bench/train_throughput.py` (same definitions,
same model and batch) each run `--steps` steps under TensorFlow's profiler after two warm-up
loops. The trace's TensorFlow op events are summed by op type (`Conv2DBackpropFilter`,
`_FusedBatchNormV3`, `Cast`, ...) and by kind (convolution forward, filter gradient, input
gradient, matmul, batch norm, casts, the rest). Op time is the sum of the ops' durations on the
executor's threads; with 2 inter-op threads it can exceed the wall time, so the shares are of the
op time, and `op_seconds_per_step / wall_seconds_per_step` says how much ran side by side.
The profiler adds a little to every op: compare shares, not speeds, with the throughput bench.
"""

import collections
import glob
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags  # noqa: E402

import benchlib  # noqa: E402

benchlib.define_step_flags(flags, "Profiled steps of each loop.")
flags.adopt_module_key_flags(benchlib)
flags.DEFINE_boolean("cifar_stem", True, "The CIFAR stem (else the ImageNet stem).")
flags.DEFINE_integer("top", 12, "Op types listed per loop.")
FLAGS = flags.FLAGS

# Op type -> kind; the oneDNN ("_Mkl...", "_MklNative...") and fused variants map by substring.
KINDS = (("BackpropFilter", "conv_filter_gradient"), ("BackpropInput", "conv_input_gradient"),
         ("Conv2D", "conv_forward"), ("MatMul", "matmul"), ("BatchNorm", "batch_norm"),
         ("Cast", "cast"))


def kind_of(op_type):
    return next((kind for key, kind in KINDS if key in op_type), "other")


def op_seconds_by_type(logdir):
    """{op type: seconds} of every TensorFlow op event in the trace under `logdir`."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2
    path = sorted(glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.xplane.pb")))[-1]
    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    totals = collections.Counter()
    for plane in space.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            for event in line.events:
                metadata = plane.event_metadata[event.metadata_id]
                # TensorFlow ops are named "<node name>:<op type>"; the executor's own events
                # are not, and the input pipeline's ("Iterator::...") run beside the step.
                if (":" in metadata.name and metadata.display_name
                        and not metadata.name.startswith("Iterator::")):
                    totals[metadata.display_name] += event.duration_ps / 1e12
    return totals


def profile(tf, loop, steps):
    loop()
    loop()
    logdir = tempfile.mkdtemp(prefix="step_profile_")
    tf.profiler.experimental.start(logdir)
    t0 = time.perf_counter()
    loop(steps)
    wall = time.perf_counter() - t0
    tf.profiler.experimental.stop()
    by_type = op_seconds_by_type(logdir)
    total = sum(by_type.values())
    by_kind = collections.Counter()
    for op_type, seconds in by_type.items():
        by_kind[kind_of(op_type)] += seconds
    return {
        "wall_seconds_per_step": round(wall / steps, 4),
        "op_seconds_per_step": round(total / steps, 4),
        "share_by_kind": {k: round(v / total, 4) for k, v in by_kind.most_common()},
        "top_op_types": [[t, round(v / steps * 1e3, 2), round(v / total, 4)]
                         for t, v in by_type.most_common(FLAGS.top)],
    }


def main(_):
    os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1"
    import keras
    import tensorflow as tf
    from simclr_tf import config as cfg

    if FLAGS.precision != "float32":
        keras.mixed_precision.set_dtype_policy(f"mixed_{FLAGS.precision}")
    strategy = tf.distribute.get_strategy()
    config = cfg.RunConfig(
        data=cfg.DataConfig(dataset=FLAGS.dataset, data_dir=FLAGS.data_dir,
                            image_size=FLAGS.image_size),
        encoder=cfg.EncoderConfig(resnet_depth=FLAGS.depth, cifar_stem=FLAGS.cifar_stem),
        train=cfg.TrainConfig(train_batch_size=FLAGS.batch, train_steps=1000,
                              precision=FLAGS.precision))
    cfg.validate(config, 1, "default")
    bare, _ = benchlib.bare_encoder_loop(tf, strategy, config, FLAGS.batch, FLAGS.steps, False)
    full, _ = benchlib.full_step_loop(tf, strategy, config, FLAGS.steps)
    result = {"benchmark": "step_profile", "model": f"resnet{FLAGS.depth}",
              "cifar_stem": FLAGS.cifar_stem, "image_size": FLAGS.image_size,
              "global_batch": FLAGS.batch, "precision": FLAGS.precision, "steps": FLAGS.steps,
              "bare": profile(tf, bare, FLAGS.steps), "full": profile(tf, full, FLAGS.steps)}
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
