"""Augmented views/s of the paper's pipeline on ONE core, against what a training step can consume.

    python bench/augment_throughput.py

Times `views.two_views` (crop + flip, colour jitter, grayscale, blur as the paper sets them:
no blur at 32 px, blur at 224 px) inside a `tf.function` on uint8 batches, with TensorFlow limited
to one thread, best of 5. The step's consumption is bounded by the machine's limit for ResNet-18
(CIFAR stem) at 32 px: 2 views x (matmul peak on all cores / FLOPs per example), measured in the same
run as bench/train_throughput.py defines them. Prints one JSON line at the end.
"""

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # simclr_tf's default; TF loads first here
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import tensorflow as tf  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)

import keras  # noqa: E402

from simclr_tf import views  # noqa: E402
from simclr_tf.resnet import resnet  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_throughput import forward_flops_per_view  # noqa: E402


def views_per_sec(batch, in_size, out_size, use_blur, repeats=5):
    images = tf.cast(tf.random.uniform([batch, in_size, in_size, 3], 0, 256, tf.int32), tf.uint8)
    fn = tf.function(lambda x, s: views.two_views(x, s, out_size, use_blur=use_blur))
    seed = tf.constant([1, 2], tf.int64)
    fn(images, seed)[0].numpy()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(images, seed)[0].numpy()
        best = min(best, time.perf_counter() - t0)
    return 2 * batch / best


def matmul_peak_gflops_single_thread_free():
    # The peak is measured on one thread here; scale by the core count for the whole machine.
    a = tf.random.uniform([2048, 2048])
    mm = tf.function(lambda x: tf.reduce_sum(tf.matmul(x, x)))
    mm(a).numpy()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        mm(a).numpy()
        best = min(best, time.perf_counter() - t0)
    return 2 * 2048 ** 3 / best / 1e9


def main():
    v32 = views_per_sec(128, 32, 32, use_blur=False)
    v224 = views_per_sec(32, 256, 224, use_blur=True)
    cores = os.cpu_count()
    peak = matmul_peak_gflops_single_thread_free() * cores
    flops = 3 * 2 * forward_flops_per_view(resnet(18, cifar_stem=True, image_size=32), keras)
    consumed_views = 2 * peak * 1e9 / flops
    print(json.dumps({
        "benchmark": "augment_throughput", "threads": 1,
        "views_per_sec_32px": round(v32, 1), "views_per_sec_224px": round(v224, 1),
        "machine_matmul_peak_gflops_estimate": round(peak, 1), "cores": cores,
        "step_max_views_per_sec_r18_32px": round(consumed_views, 1),
        "ratio_32px": round(v32 / consumed_views, 2),
    }))


if __name__ == "__main__":
    main()
