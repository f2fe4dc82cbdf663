"""Requests/s and peak memory of an export's signatures under load, in-process.

    python bench/serving.py [--depth=50] [--image_size=224] [--requests=12] [--threads=2]

Exports a ResNet with random weights (speed and memory do not depend on them) and, for batch
sizes 1, 8 and 64 of 224 x 224 JPEGs (quality 90, photo-like: smooth gradients plus noise), each
in a fresh process so that its peak memory is its own: --threads threads send --requests requests
in all to `serving_bytes`, then the same images, decoded and preprocessed, as float32 to
`serving_default`. Also times the refusal of a 400-KB PNG that declares 20,000 x 20,000 pixels
(the pixel budget reads headers before decoding). Prints a table, then one JSON line.

The figures are this process's (TensorFlow's intra-op threads on every core); TF Serving adds its
own batching and threading: `python -m export.serving_client --load` sends the same kind of load
to a running server.
"""

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags  # noqa: E402

import benchlib  # noqa: E402
from benchlib import timed_load  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("depth", 50, "ResNet depth of the exported encoder.")
flags.DEFINE_integer("image_size", 224, "The export's image size (JPEGs are resized to it).")
flags.DEFINE_integer("requests", 12, "Requests per batch size and signature.")
flags.DEFINE_integer("threads", 2, "Client threads sending at once.")
flags.DEFINE_string("batches", "1,8,64", "Batch sizes (images per request).")
flags.DEFINE_string("child", None, "Internal: version_dir,batch of one measuring process.")

JPEG_SIDE = 224


def photo_jpegs(count, seed=0):
    return benchlib.photo_jpegs(count, JPEG_SIDE, seed)


def measure(version_dir, batch):
    """One batch size, in this (fresh) process: requests/s of both signatures, peak RSS."""
    import simclr_tf  # noqa: F401  (oneDNN on, as the export command runs)
    import tensorflow as tf
    from simclr_tf import augment, export

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from serving_load import zeros_png

    image_size = export.load_metadata(version_dir)["image_size"]
    signatures = tf.saved_model.load(version_dir).signatures
    files = tf.constant(photo_jpegs(batch), tf.string)
    images = augment.preprocess_for_eval(
        tf.stack([tf.io.decode_jpeg(f) for f in files]), image_size,
        crop=augment.eval_crop(image_size))
    loaded_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results = {"batch": batch}
    for name, kwargs in (("serving_bytes", {"image_bytes": files}),
                         ("serving_default", {"images": images})):
        seconds = timed_load(lambda: signatures[name](**kwargs), FLAGS.requests, FLAGS.threads)
        results[name] = {"requests_per_sec": round(FLAGS.requests / seconds, 2),
                         "images_per_sec": round(FLAGS.requests * batch / seconds, 1)}
    hostile = tf.constant([zeros_png(20000)])
    t0 = time.perf_counter()
    try:
        signatures["serving_bytes"](image_bytes=hostile)
        refused = False
    except tf.errors.InvalidArgumentError:
        refused = True
    results["hostile_png_refused"] = refused
    results["hostile_png_ms"] = round(1000 * (time.perf_counter() - t0), 1)
    results["rss_after_load_mb"] = round(loaded_rss)
    results["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return results


def export_model(directory):
    import keras
    import simclr_tf  # noqa: F401
    from simclr_tf import config as cfg
    from simclr_tf import export, models

    keras.utils.set_random_seed(0)
    config = cfg.RunConfig(data=cfg.DataConfig(image_size=FLAGS.image_size),
                           encoder=cfg.EncoderConfig(resnet_depth=FLAGS.depth))
    encoder = models.build_float32_encoder(config.encoder)
    return export.export_encoder(encoder, directory, 1, config)


def main(_):
    if FLAGS.child:
        version_dir, batch = FLAGS.child.rsplit(",", 1)
        print(json.dumps(measure(version_dir, int(batch))))
        return
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        version_dir = export_model(directory)
        for batch in (int(b) for b in FLAGS.batches.split(",")):
            out = subprocess.run(
                [sys.executable, os.path.abspath(__file__), f"--child={version_dir},{batch}",
                 f"--requests={FLAGS.requests}", f"--threads={FLAGS.threads}"],
                capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"ResNet-{FLAGS.depth} at {FLAGS.image_size} px, {JPEG_SIDE}-px JPEGs, "
          f"{FLAGS.threads} client threads, {FLAGS.requests} requests each:")
    print("batch  serving_bytes req/s (img/s)  serving_default req/s (img/s)  peak RSS MB")
    for r in rows:
        b, d = r["serving_bytes"], r["serving_default"]
        print(f"{r['batch']:>5}  {b['requests_per_sec']:>10} ({b['images_per_sec']:>7})"
              f"  {d['requests_per_sec']:>12} ({d['images_per_sec']:>7})  {r['peak_rss_mb']:>9}")
    print(json.dumps({"benchmark": "serving", "depth": FLAGS.depth,
                      "image_size": FLAGS.image_size, "jpeg_side": JPEG_SIDE,
                      "threads": FLAGS.threads, "requests": FLAGS.requests,
                      "cores": os.cpu_count(), "results": rows}))


if __name__ == "__main__":
    app.run(main)
