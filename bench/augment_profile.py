"""Where the time of one augmented view goes, stage by stage, on ONE core.

    python bench/augment_profile.py

For the paper's recipe at 32 px (from 32 px images, no blur, batch 256) and at 224 px (from 256 px
images, blur, batch 32), on one thread (best of 5 after a warm-up), inside a `tf.function`:

- each transform of `views.view` on its own, without XLA: the crop-resize (from uint8), the
  flip, the colour jitter's hue pass (an RGB -> HSV -> RGB round trip) and one of its six linear
  passes (both on planar images, as the jitter runs them), the whole colour distortion (jitter
  with p 0.8, grayscale with p 0.2), the blur, and the whole view;
- the whole view as the training pipeline makes it (`views.view(..., made_in="host")`: the XLA
  stages, the blur of the drawn images only, 4 images at a time at 224 px), and compiled whole by XLA (`jit_compile=True`), with the largest
  absolute difference between its views and the graph's;
- the pipeline's stages one by one, on one chunk (`pipeline_stages`).

Prints a table of ms per view and one JSON line at the end.

    python bench/augment_profile.py --quick   # smoke run: batches of 16 / 8, one timed call each

`--quick` keeps the sizes and the stages but makes the batches 16 images at 32 px and 8 at 224 px
(two chunks of 4) and times one call of each figure after its warm-up: its figures are not
comparable with a full run's (the JSON says `"quick": true`).
"""

import argparse
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

from simclr_tf import augment, views  # noqa: E402

SEED = tf.constant([1, 2], tf.int64)
CASES = {"32px": dict(batch=256, in_size=32, out_size=32, use_blur=False),
         "224px": dict(batch=32, in_size=256, out_size=224, use_blur=True)}
QUICK_BATCHES = {"32px": 16, "224px": 8}
QUICK = False  # --quick: every figure is one timed call after the warm-up


def best_seconds(fn, *args, repeats=5, jit_compile=False):
    fn = tf.function(fn, jit_compile=jit_compile)
    tf.nest.map_structure(lambda t: t.numpy(), fn(*args))
    repeats = 1 if QUICK else repeats
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        tf.nest.map_structure(lambda t: t.numpy(), fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def stages(batch, in_size, out_size, use_blur):
    """{stage: ms per view}."""
    images = tf.cast(tf.random.uniform([batch, in_size, in_size, 3], 0, 256, tf.int32), tf.uint8)
    crops = augment.random_resized_crop(images, SEED, out_size)
    planes = augment._planar(crops)  # the jitter's passes work on [B, 3, H, W] planes
    ones = tf.ones([batch])
    hue = tf.fill([batch], 0.1)
    linear_op = tf.zeros([batch], tf.int32)  # brightness
    params = dict(brightness=ones * 1.2, contrast=ones, saturation=ones, hue=hue,
                  order=tf.zeros([batch, 4], tf.int32))
    timed = {
        "uint8 to float": (augment.to_float, images),
        "crop + resize": (lambda x: augment.random_resized_crop(x, SEED, out_size), images),
        "flip": (lambda x: augment.random_flip_left_right(x, SEED), crops),
        "jitter: hue pass (HSV round trip)": (lambda x: augment._adjust_hue(x, hue), planes),
        "jitter: one linear pass (of 6)": (
            lambda x: augment._apply_linear_slot(x, linear_op, ones > 0, params), planes),
        "colour distortion (jitter p 0.8, grayscale p 0.2)": (
            lambda x: augment.random_color_jitter(x, SEED, 1.0), crops),
    }
    if use_blur:
        timed["blur (p 0.5)"] = (lambda x: augment.random_gaussian_blur(x, SEED), crops)
    recipe = views.paper_recipe(use_blur)
    timed["whole view"] = (lambda x: views.view(x, SEED, out_size, recipe), images)
    figures = {name: round(1000 * best_seconds(fn, x) / batch, 3)
               for name, (fn, x) in timed.items()}
    whole = timed["whole view"][0]
    figures["whole view, the pipeline's way"] = round(1000 * best_seconds(
        lambda x: views.view(x, SEED, out_size, recipe, made_in="host"), images) / batch, 3)
    figures["whole view, XLA"] = round(
        1000 * best_seconds(whole, images, jit_compile=True) / batch, 3)
    difference = tf.reduce_max(tf.abs(tf.function(whole, jit_compile=True)(images)
                                      - tf.function(whole)(images)))
    figures["XLA's largest difference"] = float(difference)
    figures.update(pipeline_stages(images, out_size, use_blur))
    return figures


def pipeline_stages(images, out_size, use_blur):
    """{stage: ms per view} of the stages as the pipeline runs them: on one chunk (4 images at
    224 px, the whole batch at 32), the crop, flip and colour compiled by XLA, each from the
    chunk's draws; and the blur of the drawn images only, per blurred image."""
    rows = (views._chunk_sizes(images, out_size) or [images.shape[0]])[0]
    chunk = images[:rows]
    boxes = augment.draw_crop(SEED, rows, *chunk.shape[1:3])
    crops = augment.apply_crop(chunk, boxes, out_size)
    steps = {
        "crop + resize": (lambda x, d: augment.apply_crop(x, d, out_size), chunk, boxes, True),
        "flip": (augment.apply_flip, crops, augment.draw_flip(SEED, rows), True),
        "colour distortion": (augment.apply_color, crops, augment.draw_color(SEED, rows, 1.0),
                              True),
    }
    figures = {f"pipeline, chunk of {rows}: {name}": round(
                   1000 * best_seconds(fn, x, draws, repeats=25, jit_compile=xla) / rows, 3)
               for name, (fn, x, draws, xla) in steps.items()}
    if use_blur:  # per blurred image: half the views are, on average
        draws = augment.draw_blur(SEED, rows)
        drawn = int(tf.reduce_sum(tf.cast(draws["selected"], tf.int32)))
        blur = lambda x, d: augment.apply_blur(x, d, selected_only=True)  # noqa: E731
        figures[f"pipeline, chunk of {rows}: blur, per blurred image ({drawn} of {rows})"] = round(
            1000 * best_seconds(blur, crops, draws, repeats=25) / max(drawn, 1), 3)
    return figures


def main():
    global QUICK
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: batches of %s images, one timed call per figure "
                             "(figures not comparable)"
                             % " / ".join(map(str, QUICK_BATCHES.values())))
    QUICK = parser.parse_args().quick
    cases = {name: dict(case, batch=QUICK_BATCHES[name]) if QUICK else case
             for name, case in CASES.items()}
    results = {name: stages(**case) for name, case in cases.items()}
    for name, figures in results.items():
        print(f"{name} ({cases[name]}), ms per view on one thread:")
        for stage, ms in figures.items():
            print(f"  {stage:<52}{ms:>9.3g}")
    print(json.dumps({"ms_per_view": results, "threads": 1, "quick": QUICK}))


if __name__ == "__main__":
    main()
