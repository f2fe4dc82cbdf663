"""Augmented views/s on ONE thread: the original SimCLR's recipe against ours, and what a training
step can consume.

    python bench/augment_throughput.py                       # best of 5, about a minute
    python bench/augment_throughput.py --quick --repeats=1   # smoke run: small batches

Times three pipelines on the same uint8 batches, in one process with TensorFlow limited to one
thread (intra_op = inter_op = 1), at 32 px (batch of 128 32x32 images, no blur) and at 224 px
(batch of 32 256x256 images, blur on), each best of `--repeats` calls after one warm-up call
(so XLA's compile is not timed); two views per image:

- `original`: the original code's recipe (google-research/simclr, tf2/data_util.py), REWRITTEN
  here from its description, not copied: per image in a `tf.map_fn` inside a `tf.function`,
  `sample_distorted_bounding_box` crop + bicubic resize, flip, colour jitter (p 0.8, its four ops
  in a random order under `tf.switch_case`), grayscale (p 0.2); then per batch of views its blur
  (one sigma per batch, two depthwise convolutions, kept by each image with p 0.5). Its figure is a
  stand-in for the original code's; the fetched original code itself measured 316 views/s at
  224 px and 9,215 at 32 px on one thread (recorded in the project; a different run, so compare
  it with this file's figures only roughly).
- `graph`: ours, `views.two_views` inside a `tf.function`, no XLA.
- `xla_stages`: ours as the training pipeline runs it on fixed-size images:
  `two_views(..., made_in="host")`, the crop, the flip and the colour distortion each compiled by
  XLA, the blur not, only the images drawn for it blurred, and the batch made a few images at a
  time (4 at 224 px; at 32 px the batch is one chunk).
- `device`: `two_views(..., made_in="device")`, as in a training step XLA does not compile
  (--augment_on_device on a GPU): the same XLA stages, the whole batch at once, every image
  blurred and the unselected ones kept as they were.
- `xla`: the whole of `two_views` compiled as one XLA program (`tf.function(jit_compile=True)`),
  as inside a --jit_compile step with --augment_on_device.

Then the same at 224 px from 32 images of varying sizes (sides 300-500 px, as ImageNet's), where
no batch can be formed before the crop: `original` per image, then its batch blur; `per_image`,
ours with the whole view made per image in plain ops (`made_in="graph"`, every image blurred and
the unselected kept); `pipeline`, ours as `data._views_of_varying_sizes` runs it (crops per
image, their boxes drawn by XLA, then the rest per batch with the XLA stages, in chunks).

What a training step consumes is bounded by the machine's limit: for ResNet-18 (CIFAR stem) at
32 px and ResNet-50 at 224 px, 2 views x (matmul peak on all cores / FLOPs per example), with
FLOPs as bench/train_throughput.py defines them. On an accelerator the step is far faster: one
current GPU's ResNet-50 step takes on the order of 2,000 views/s at 224 px, so the file also
reports how many cores like this one each pipeline needs to feed it. Prints one JSON line at the
end: views/s of each pipeline at each size (and from varying sizes), ours over the original, ours
over the step's consumption at each size, and the cores per GPU.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # simclr_tf's default; TF loads first here
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)

import keras  # noqa: E402

from simclr_tf import views  # noqa: E402
from simclr_tf.resnet import resnet  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_throughput import forward_flops_per_view, matmul_peak_gflops  # noqa: E402

PIPELINES = ("original", "graph", "xla_stages", "device", "xla")
OURS = PIPELINES[1:]

# (name, images per batch, input side, view side, blur); --quick keeps the sizes, shrinks batches.
SETTINGS = (("32px", 128, 32, 32, False), ("224px", 32, 256, 224, True))
QUICK_BATCHES = {"32px": 8, "224px": 2}


# --------------------------------------------------------------------------------------------
# The original's recipe, rewritten from its description: stateful random ops, per image.

_JITTER = 0.8  # brightness, contrast and saturation factors, times the strength s
_HUE = 0.2


def original_crop_and_resize(image, size):
    """Random resized crop: a box of 8-100% of the area, aspect 3/4-4/3, resized bicubically."""
    whole_image = tf.constant([[[0.0, 0.0, 1.0, 1.0]]])
    begin, crop_size, _ = tf.image.sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=whole_image, min_object_covered=0.1,
        aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0), max_attempts=100,
        use_image_if_no_bounding_boxes=True)
    crop = tf.slice(image, begin, crop_size)
    return tf.image.resize(crop[None], [size, size], method="bicubic")[0]


def original_random_apply(transform, p, image):
    return tf.cond(tf.random.uniform([]) < p, lambda: transform(image), lambda: image)


def original_color_jitter(image, strength):
    """Brightness, contrast, saturation and hue, in a random order, clipped after each."""
    jitter = _JITTER * strength

    def brightness(x):
        return x * tf.random.uniform([], max(0.0, 1.0 - jitter), 1.0 + jitter)

    ops = [
        brightness,
        lambda x: tf.image.random_contrast(x, 1.0 - jitter, 1.0 + jitter),
        lambda x: tf.image.random_saturation(x, 1.0 - jitter, 1.0 + jitter),
        lambda x: tf.image.random_hue(x, _HUE * strength),
    ]
    order = tf.random.shuffle(tf.range(len(ops)))
    for slot in range(len(ops)):
        branches = [lambda op=op, x=image: op(x) for op in ops]
        image = tf.clip_by_value(tf.switch_case(order[slot], branches), 0.0, 1.0)
    return image


def original_to_grayscale(image):
    return tf.tile(tf.image.rgb_to_grayscale(image), [1, 1, 3])


def original_color_distortion(image, strength=1.0):
    image = original_random_apply(lambda x: original_color_jitter(x, strength), 0.8, image)
    return original_random_apply(original_to_grayscale, 0.2, image)


def original_view(image, size):
    """One view of one image, before the blur: float32 [size, size, 3] in [0, 1]."""
    image = tf.image.convert_image_dtype(image, tf.float32)
    image = original_crop_and_resize(image, size)
    image = tf.image.random_flip_left_right(image)
    image = original_color_distortion(image)
    return tf.clip_by_value(image, 0.0, 1.0)


def original_gaussian_blur(images, sigma, kernel_size):
    """Separable Gaussian blur of [B, H, W, 3]: a vertical then a horizontal depthwise pass."""
    radius = kernel_size // 2
    taps = 2 * radius + 1
    x = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernel = tf.exp(-x ** 2 / (2.0 * sigma ** 2))
    kernel /= tf.reduce_sum(kernel)
    vertical = tf.tile(tf.reshape(kernel, [taps, 1, 1, 1]), [1, 1, 3, 1])
    horizontal = tf.tile(tf.reshape(kernel, [1, taps, 1, 1]), [1, 1, 3, 1])
    images = tf.nn.depthwise_conv2d(images, vertical, [1, 1, 1, 1], padding="SAME")
    return tf.nn.depthwise_conv2d(images, horizontal, [1, 1, 1, 1], padding="SAME")


def original_batch_blur(images, size, p=0.5):
    """One sigma for the whole batch; each image keeps its blurred version with probability p."""
    sigma = tf.random.uniform([], 0.1, 2.0)
    blurred = original_gaussian_blur(images, sigma, kernel_size=size // 10)
    keep_blurred = tf.random.uniform([tf.shape(images)[0], 1, 1, 1]) < p
    return tf.clip_by_value(tf.where(keep_blurred, blurred, images), 0.0, 1.0)


def original_two_views(images, size, use_blur):
    """Two views of each uint8 image as the original makes them, each [B, size, size, 3]."""
    view_spec = tf.TensorSpec([size, size, 3], tf.float32)
    view_a, view_b = tf.map_fn(
        lambda image: (original_view(image, size), original_view(image, size)), images,
        fn_output_signature=(view_spec, view_spec))
    if use_blur:  # the original blurs each batch of views separately
        view_a, view_b = original_batch_blur(view_a, size), original_batch_blur(view_b, size)
    return view_a, view_b


# --------------------------------------------------------------------------------------------
# Timing.

def uint8_images(batch, side):
    return tf.cast(tf.random.uniform([batch, side, side, 3], 0, 256, tf.int32), tf.uint8)


def best_seconds(call, repeats):
    """Fastest of `repeats` timed calls, after one untimed warm-up call (trace, XLA compile)."""
    call()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def two_views_call(pipeline, images, view_size, use_blur):
    """A no-argument call that makes both views of `images` with `pipeline` and waits for them."""
    if pipeline == "original":
        fn = tf.function(lambda x: original_two_views(x, view_size, use_blur))
        return lambda: fn(images)[0].numpy()
    seed = tf.constant([1, 2], tf.int64)
    made_in = {"xla_stages": "host", "device": "device"}.get(pipeline, "graph")
    fn = tf.function(
        lambda x, s: views.two_views(x, s, view_size, use_blur=use_blur, made_in=made_in),
        jit_compile=(pipeline == "xla"))
    return lambda: fn(images, seed)[0].numpy()


def views_per_sec(batch, input_side, view_size, use_blur, repeats):
    """Views/s of each pipeline, all on the same batch."""
    images = uint8_images(batch, input_side)
    return {pipeline: 2 * batch / best_seconds(two_views_call(pipeline, images, view_size,
                                                              use_blur), repeats)
            for pipeline in PIPELINES}


# Images of varying sizes (ImageNet's are mostly 300-500 px a side): sides drawn from this range.
VARYING_SIDES = (300, 500)
VARYING = ("original", "per_image", "pipeline")


def varying_size_images(batch):
    rng = np.random.default_rng(0)
    return [tf.constant(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
            for h, w in rng.integers(*VARYING_SIDES, size=(batch, 2))]


def varying_size_call(pipeline, images, view_size):
    """A no-argument call making both 224-px views of every image of `images` (a list of uint8
    images of different sizes), one image at a time up to its crops, as each pipeline must."""
    one_image = tf.TensorSpec([None, None, 3], tf.uint8)
    seed_spec = tf.TensorSpec([2], tf.int64)
    seed = tf.constant([1, 2], tf.int64)
    if pipeline == "original":
        per_image = tf.function(lambda x: (original_view(x, view_size),
                                           original_view(x, view_size)),
                                input_signature=[one_image])
        blur = tf.function(lambda a, b: (original_batch_blur(a, view_size),
                                         original_batch_blur(b, view_size)))
        return lambda: blur(*map(tf.stack, zip(*map(per_image, images))))[0].numpy()
    if pipeline == "per_image":  # the whole view per image, plain ops
        whole = tf.function(lambda x, s: views.two_views(x[None], s, view_size),
                            input_signature=[one_image, seed_spec])
        return lambda: [whole(image, seed)[0].numpy() for image in images]
    # The training pipeline's way (data._views_of_varying_sizes): crops per image, the rest per
    # batch with the XLA stages.
    crops = tf.function(lambda x, s: views.sized_pair(x[None], s, view_size, made_in="host"),
                        input_signature=[one_image, seed_spec])
    finish = tf.function(lambda a, b, s: views.finish_pair(a, b, s, view_size, made_in="host"))
    def call():
        sized_a, sized_b = zip(*(crops(image, seed) for image in images))
        return finish(tf.concat(sized_a, 0), tf.concat(sized_b, 0), seed)[0].numpy()
    return call


def varying_size_views_per_sec(batch, view_size, repeats):
    images = varying_size_images(batch)
    return {pipeline: 2 * batch / best_seconds(varying_size_call(pipeline, images, view_size),
                                               repeats)
            for pipeline in VARYING}


# Views/s one current GPU's ResNet-50 SimCLR step consumes at 224 px (issue 27's estimate): the
# CPU cores it takes to feed one such GPU are this over one core's views/s.
GPU_VIEWS_PER_SEC_224PX = 2000


def step_max_views_per_sec():
    """({"r18_32px": views/s, "r50_224px": views/s}: what a training step of each model can
    consume at the machine's matmul peak on all its cores, the peak in GFLOP/s)."""
    # Measured on the one thread this file allows; scaled by the cores for the machine.
    peak = matmul_peak_gflops(tf) * os.cpu_count()
    models = {"r18_32px": resnet(18, cifar_stem=True, image_size=32),
              "r50_224px": resnet(50, cifar_stem=False, image_size=224)}
    # 2 views per example, forward + backward = 3 x forward.
    return {name: 2 * peak * 1e9 / (3 * 2 * forward_flops_per_view(model, keras))
            for name, model in models.items()}, peak


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed calls of each pipeline; the fastest counts")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: batches of %s images (figures not comparable)"
                             % " / ".join(map(str, QUICK_BATCHES.values())))
    return parser.parse_args()


def main():
    args = parse_args()
    result = {"benchmark": "augment_throughput", "threads": 1, "repeats": args.repeats,
              "quick": args.quick}
    rates = {}
    for name, batch, input_side, view_size, use_blur in SETTINGS:
        batch = QUICK_BATCHES[name] if args.quick else batch
        rates[name] = views_per_sec(batch, input_side, view_size, use_blur, args.repeats)
        result[f"batch_{name}"] = batch
        for pipeline in PIPELINES:
            result[f"views_per_sec_{name}_{pipeline}"] = round(rates[name][pipeline], 1)
        for ours in OURS:
            result[f"ratio_{name}_{ours}_over_original"] = round(
                rates[name][ours] / rates[name]["original"], 2)
    batch = QUICK_BATCHES["224px"] if args.quick else 32
    varying = varying_size_views_per_sec(batch, 224, args.repeats)
    for pipeline in VARYING:
        result[f"views_per_sec_224px_varying_{pipeline}"] = round(varying[pipeline], 1)
    for ours in VARYING[1:]:
        result[f"ratio_224px_varying_{ours}_over_original"] = round(
            varying[ours] / varying["original"], 2)
    consumed, peak = step_max_views_per_sec()
    result.update({"machine_matmul_peak_gflops_estimate": round(peak, 1),
                   "cores": os.cpu_count()})
    for model, size in (("r18_32px", "32px"), ("r50_224px", "224px")):
        result[f"step_max_views_per_sec_{model}"] = round(consumed[model], 1)
        for ours in OURS:
            result[f"ratio_{size}_{ours}_over_step_max"] = round(
                rates[size][ours] / consumed[model], 2)
    for pipeline in PIPELINES:
        result[f"cores_to_feed_one_gpu_224px_{pipeline}"] = round(
            GPU_VIEWS_PER_SEC_224PX / rates["224px"][pipeline], 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
