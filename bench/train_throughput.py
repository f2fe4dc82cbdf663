"""Training throughput against the machine's limit; prints one JSON line at the end.

    python bench/train_throughput.py                       # ResNet-18 CIFAR stem, 32 px, batch 128
    python bench/train_throughput.py --depth=50 --image_size=64 --batch=64 --replicas=2 --jit

Definitions (so figures compare across runs):
- matmul peak: best of 5 timed 2048x2048 `tf.matmul`s in the step's compute dtype (float32, or
  bfloat16 / float16 under `--precision`), in GFLOP/s; taken before the step loops and again
  before each round of timed loops, and the best counts (on a shared machine the same 5 matmuls
  measured 86-153 GFLOP/s from one process to the next). Under mixed precision the float32 peak
  is reported too (`float32_matmul_peak_gflops`), but the limit and the ratios are against the
  peak of the dtype the step computes in.
- FLOPs per example: 3 x the forward FLOPs of f for two views; forward FLOPs = 2 x the
  multiply-adds of every conv and dense layer.
- bare encoder step: forward + backward of f alone on random inputs (2 x batch views), loss
  mean(h^2), plain SGD update.
- full SimCLR step: the real input pipeline (Fashion-MNIST from the offline default, augmentation
  in the same process on the same cores), NT-Xent, LARS with weight decay, the linear probe and the
  metrics, through `pretrain.Pretrainer`'s compiled loop; with `--augment_on_device` the views
  are made inside that step instead of in the input pipeline.
- ratios: bare FLOP/s / peak, and full / bare examples/s (of the fastest loops and best peak);
  also the median over rounds of each ratio taken within a round (bare against the peak taken just
  before it, full against the bare loop just before it), which a slow spell of the machine hits on
  both sides (`*_rounds` list every round's figures).
- each step figure is the best of `--repeats` timed loops of `--steps` steps, after two warm-up loops;
  the bare and full loops take turns (bare, full, bare, full, ...) in one process, so a slow spell of
  the machine or of oneDNN's thread pool hits both (a pause before each loop lets the input
  pipeline's prefetching settle).
- `--onednn` (default, as `simclr_tf.run`) or `--noonednn` (TensorFlow's Eigen kernels, its default
  on AVX2-only CPUs): the peak, the bare step and the full step all run with the same kernels.
One example = one image = two views.
"""

import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags  # noqa: E402

import benchlib  # noqa: E402
from benchlib import forward_flops_per_view, matmul_gflops  # noqa: E402,F401

benchlib.define_step_flags(flags, "Steps per timed loop.")
flags.adopt_module_key_flags(benchlib)
flags.DEFINE_integer("width", 1, "Width multiplier.")
flags.DEFINE_bool("cifar_stem", None,
                  "The CIFAR stem (default: as the config derives it, CIFAR at 32 px and below); "
                  "--nocifar_stem times the embedded default's ImageNet stem at 32 px.")
flags.DEFINE_integer("replicas", 1, "Logical CPU replicas (MirroredStrategy when > 1).")
flags.DEFINE_boolean("jit", False, "XLA-compile the train step.")
flags.DEFINE_integer("repeats", 5, "Rounds of timed loops; the fastest loop of each kind counts.")
flags.DEFINE_boolean("onednn", True, "TF_ENABLE_ONEDNN_OPTS=1 (oneDNN CPU kernels), as the CLI.")
flags.DEFINE_boolean("full_step", True, "Also time the full SimCLR step.")
flags.DEFINE_boolean("augment_on_device", False,
                     "Full step: make the views inside the step (--augment_on_device).")
FLAGS = flags.FLAGS


def matmul_peak_gflops(tf, dtype="float32"):
    return matmul_gflops(tf, 2048, tf.as_dtype(dtype), 5)


def seconds_taking_turns(loops, on_round):
    """Seconds of each of FLAGS.repeats rounds in which every loop runs once, the loops taking
    turns, after two warm-up calls of each (trace, caches); `on_round()` runs before each round.
    Returns one list per round, one figure per loop."""
    for loop in loops:
        loop()
        loop()
    rounds = []
    for _ in range(FLAGS.repeats):
        on_round()
        rounds.append([])
        for loop in loops:
            time.sleep(1.0)
            t0 = time.perf_counter()
            loop()
            rounds[-1].append(time.perf_counter() - t0)
    return rounds


def main(_):
    os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1" if FLAGS.onednn else "0"  # before TF loads
    from simclr_tf import distribute
    if FLAGS.replicas > 1:
        distribute.split_cpu(FLAGS.replicas)
    import keras
    import tensorflow as tf
    from simclr_tf import config as cfg

    if FLAGS.precision != "float32":
        keras.mixed_precision.set_dtype_policy(f"mixed_{FLAGS.precision}")
    strategy = (distribute.build_strategy("mirrored", FLAGS.replicas) if FLAGS.replicas > 1
                else tf.distribute.get_strategy())
    # No blur at 32 px and below, and the CIFAR stem unless --cifar_stem says, as the config
    # derives them.
    config = cfg.RunConfig(
        data=cfg.DataConfig(dataset=FLAGS.dataset, data_dir=FLAGS.data_dir,
                            image_size=FLAGS.image_size),
        encoder=cfg.EncoderConfig(resnet_depth=FLAGS.depth, width_multiplier=FLAGS.width,
                                  cifar_stem=FLAGS.cifar_stem),
        augment=cfg.AugmentConfig(augment_on_device=FLAGS.augment_on_device),
        train=cfg.TrainConfig(train_batch_size=FLAGS.batch, train_steps=1000,
                              jit_compile=FLAGS.jit, precision=FLAGS.precision),
    )
    try:
        cfg.validate(config, strategy.num_replicas_in_sync,
                     "mirrored" if FLAGS.replicas > 1 else "default")
    except cfg.ConfigError as e:
        sys.exit(f"error: {e}")
    compute_dtype = FLAGS.precision  # what the convolutions and matmuls compute in
    float32_peaks = [matmul_peak_gflops(tf)] if compute_dtype != "float32" else []
    peaks = [matmul_peak_gflops(tf, compute_dtype)]
    bare_loop, encoder = benchlib.bare_encoder_loop(tf, strategy, config, FLAGS.batch, FLAGS.steps,
                                                    FLAGS.jit)
    loops = [bare_loop] + ([benchlib.full_step_loop(tf, strategy, config, FLAGS.steps)[0]]
                           if FLAGS.full_step else [])
    rounds = seconds_taking_turns(loops, lambda: peaks.append(matmul_peak_gflops(tf,
                                                                                   compute_dtype)))
    seconds = [min(times) for times in zip(*rounds)]
    peak = max(peaks)
    bare = FLAGS.batch * FLAGS.steps / seconds[0]
    flops_per_example = 3 * 2 * forward_flops_per_view(encoder, keras)
    result = {
        "benchmark": "train_throughput",
        "model": (f"resnet{FLAGS.depth}x{FLAGS.width}"
                  f"{'_cifar_stem' if config.encoder.cifar_stem else ''}"),
        "image_size": FLAGS.image_size, "global_batch": FLAGS.batch,
        "replicas": strategy.num_replicas_in_sync, "jit_compile": FLAGS.jit,
        "augment_on_device": FLAGS.augment_on_device,
        "precision": FLAGS.precision, "onednn": FLAGS.onednn,
        "matmul_dtype": compute_dtype,
        "matmul_peak_gflops": round(peak, 1),
        "matmul_peak_samples": [round(p, 1) for p in peaks],
        "gflop_per_example": round(flops_per_example / 1e9, 3),
        "limit_examples_per_sec": round(peak * 1e9 / flops_per_example, 2),
        "bare_encoder_examples_per_sec": round(bare, 2),
        "bare_over_peak": round(bare * flops_per_example / (peak * 1e9), 3),
        "bare_examples_per_sec_rounds": [round(FLAGS.batch * FLAGS.steps / r[0], 2)
                                         for r in rounds],
        # peaks[i + 1] was taken just before round i
        "bare_over_peak_median_of_rounds": round(statistics.median(
            FLAGS.batch * FLAGS.steps / r[0] * flops_per_example / (p * 1e9)
            for r, p in zip(rounds, peaks[1:])), 3),
    }
    if float32_peaks:
        result["float32_matmul_peak_gflops"] = round(max(float32_peaks), 1)
    if FLAGS.full_step:
        full = FLAGS.batch * FLAGS.steps / seconds[1]
        result.update(full_step_examples_per_sec=round(full, 2),
                      full_over_bare=round(full / bare, 3),
                      full_step_examples_per_sec_rounds=[
                          round(FLAGS.batch * FLAGS.steps / r[1], 2) for r in rounds],
                      full_over_bare_median_of_rounds=round(
                          statistics.median(r[0] / r[1] for r in rounds), 3))
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
