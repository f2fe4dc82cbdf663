"""Mixed good and hostile requests from several threads at once to an export's signatures, in a
fresh process (so its peak memory is the serving's own), for tests/test_export.py.

    python tests/serving_load.py VERSION_DIR OUT.json [THREADS] [ROUNDS]

First every request is sent alone, one at a time: the good ones' embeddings are the reference.
Then THREADS threads each send every request ROUNDS times, in their own shuffled order. Each good
request must get its reference embedding (to 1e-5) and each bad one its one-line message. Writes
{"requests", "seconds", "mismatches", "peak_rss_mb", "baseline_rss_mb"} to OUT.json.
"""

import concurrent.futures
import json
import os
import random
import resource
import struct
import sys
import time
import zlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

import simclr_tf  # noqa: E402,F401  (oneDNN on, as the export command runs)
import tensorflow as tf  # noqa: E402

from simclr_tf import export  # noqa: E402


def zeros_png(side):
    """A real 1-bit PNG of side x side zeros: a few hundred KB at 20,000 px (1.2 GB decoded)."""
    row = b"\0" * (1 + (side + 7) // 8)
    packer = zlib.compressobj(9)
    pixels = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()

    def chunk(kind, payload):
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels)
            + chunk(b"IEND", b""))


def requests(image_size, limits):
    """[(signature, input tensor, expected message or None)] of good and bad requests."""
    rng = np.random.default_rng(0)
    photos = [tf.io.encode_jpeg(rng.integers(0, 256, (h, w, 3), np.uint8), quality=90).numpy()
              for h, w in ((48, 64), (120, 90), (33, 33))]
    pngs = [tf.io.encode_png(rng.integers(0, 256, (h, w, 3), np.uint8)).numpy()
            for h, w in ((40, 40), (25, 70))]
    side = int(np.sqrt(limits["max_image_pixels"]))  # just within the per-image limit
    over_request = limits["max_request_pixels"] // (side * side) + 1
    def files(*images):
        return tf.constant(list(images), tf.string)

    good = [("serving_default", tf.random.stateless_uniform([k, image_size, image_size, 3],
                                                            [k, 0]), None) for k in (1, 3)]
    good += [("serving_bytes", files(*photos), None), ("serving_bytes", files(*pngs), None),
             ("serving_bytes", files(photos[0], pngs[0]), None)]
    bad = [
        ("serving_default", tf.fill([1, image_size, image_size, 3], 255.0),
         "divide uint8 pixels by 255"),
        ("serving_default", tf.zeros([image_size, image_size, 3]), "got shape"),
        ("serving_bytes", files(photos[0], zeros_png(20000)),
         "image_bytes[1] is 20000x20000 = 400000000 pixels, over the limit"),
        ("serving_bytes", files(b"not an image"), "is not a JPEG, PNG, GIF or BMP file"),
        ("serving_bytes", files(*[zeros_png(side)] * over_request),
         f"the {over_request} images of the request hold"),
        ("serving_bytes", files(), "an empty batch"),
    ]
    return good + bad


def send(signatures, request):
    """(embedding, None) or (None, the error's message)."""
    name, value, _ = request
    key = "images" if name != "serving_bytes" else "image_bytes"
    try:
        return signatures[name](**{key: value})["embedding"].numpy(), None
    except tf.errors.InvalidArgumentError as e:
        return None, e.message


def check(request, reference, result):
    """A mismatch description, or None."""
    name, _, expected = request
    embedding, message = result
    if expected is None:
        if message is not None:
            return f"{name}: good request refused: {message.splitlines()[0]}"
        if not np.allclose(embedding, reference, rtol=0, atol=1e-5):
            return f"{name}: embedding differs by {np.abs(embedding - reference).max()}"
        return None
    if message is None:
        return f"{name}: bad request ({expected}) was embedded"
    if expected not in message:
        return f"{name}: expected {expected!r}, got {message!r}"
    return None


def main(version_dir, out_path, threads=8, rounds=3):
    meta = export.load_metadata(version_dir)
    loaded = tf.saved_model.load(version_dir)
    signatures = loaded.signatures
    cases = requests(meta["image_size"], meta["serving_limits"])
    references = [send(signatures, request)[0] for request in cases]
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    mismatches = [m for request, reference in zip(cases, references)
                  if (m := check(request, reference, send(signatures, request)))]

    def worker(seed):
        order = list(range(len(cases))) * rounds
        random.Random(seed).shuffle(order)
        return [check(cases[i], references[i], send(signatures, cases[i])) for i in order]

    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for found in pool.map(worker, range(threads)):
            mismatches += [m for m in found if m]
    result = {"requests": threads * rounds * len(cases), "seconds": round(time.time() - t0, 2),
              "mismatches": mismatches[:20],
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
              "baseline_rss_mb": round(baseline)}
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:5]))
