"""Sends image files to a running TF Serving and prints their embeddings (REST, `serving_bytes`).

    python -m export.serving_client --model=simclr [--host=localhost --port=8501] a.jpg b.png
    python -m export.serving_client --model=simclr --load=200 --threads=8 --batch_size=8 *.jpg

Each file goes base64-encoded as `{"image_bytes": {"b64": ...}}` (TF Serving decodes inputs whose
name ends in `_bytes`); the server decodes, centre-crops and resizes it exactly as the model was
evaluated. Prints one line per file: the path, then the embedding. With `--load=N` it sends N
requests of `--batch_size` files (cycling through them) from `--threads` threads instead and
prints one JSON line: requests/s, and each distinct error with its count (a hostile file among
them should come back as its one-line refusal, the others as embeddings). Standard library and
numpy only.
"""

import argparse
import base64
import collections
import concurrent.futures
import json
import sys
import time
import urllib.error
import urllib.request

import numpy as np

SIGNATURE = "serving_bytes"
INPUT_NAME = "image_bytes"
OUTPUT_NAME = "embedding"


def predict_url(host, port, model, version=None):
    """The REST predict endpoint of `model` (latest version unless `version`)."""
    version_part = f"/versions/{int(version)}" if version is not None else ""
    return f"http://{host}:{port}/v1/models/{model}{version_part}:predict"


def build_request(images, signature_name=SIGNATURE, input_name=INPUT_NAME):
    """The JSON body (a dict) of a row-format predict request for encoded image files.

    Args:
      images: list of bytes, each a whole JPEG/PNG file.
      signature_name: the bytes signature of the export.
      input_name: its input; must end in `_bytes` for TF Serving to base64-decode it.
    """
    if not input_name.endswith("_bytes"):
        raise ValueError(f"input_name must end in '_bytes' for base64 inputs, got {input_name!r}")
    instances = [{input_name: {"b64": base64.b64encode(data).decode("ascii")}} for data in images]
    return {"signature_name": signature_name, "instances": instances}


def parse_response(body, output_name=OUTPUT_NAME):
    """float32 [batch, D] embeddings from a predict response (dict or JSON text)."""
    if isinstance(body, (str, bytes)):
        body = json.loads(body)
    if "error" in body:
        raise RuntimeError(f"TF Serving: {body['error']}")
    predictions = body["predictions"]
    # One output -> a list of vectors; several outputs -> a list of {name: value} objects.
    rows = [p[output_name] if isinstance(p, dict) else p for p in predictions]
    return np.asarray(rows, dtype=np.float32)


def post_json(url, body, timeout=60.0):
    """POSTs `body` as JSON and returns the decoded JSON reply (TF Serving errors included)."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")
        try:
            return json.loads(text)  # TF Serving explains failures as {"error": ...}
        except ValueError:
            return {"error": f"HTTP {e.code}: {text[:200]}"}


def embed_files(paths, url, batch_size=32, post=post_json):
    """[len(paths), D] embeddings, sending `batch_size` files per request."""
    chunks = []
    for start in range(0, len(paths), batch_size):
        images = []
        for path in paths[start:start + batch_size]:
            with open(path, "rb") as f:
                images.append(f.read())
        chunks.append(parse_response(post(url, build_request(images))))
    return np.concatenate(chunks) if chunks else np.zeros([0, 0], np.float32)


def load_test(url, files, requests, batch_size=8, threads=8, post=post_json):
    """Sends `requests` requests of `batch_size` of `files` (bytes, cycled) from `threads`
    threads; returns {requests, seconds, requests_per_sec, ok, errors: {message: count}}."""
    bodies = [build_request([files[(r * batch_size + i) % len(files)] for i in range(batch_size)])
              for r in range(requests)]

    def send(body):
        reply = post(url, body)
        return reply["error"].splitlines()[0] if "error" in reply else None

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        outcomes = list(pool.map(send, bodies))
    seconds = time.perf_counter() - t0
    errors = collections.Counter(o for o in outcomes if o is not None)
    return {"requests": requests, "seconds": round(seconds, 2),
            "requests_per_sec": round(requests / max(seconds, 1e-9), 2),
            "ok": outcomes.count(None), "errors": dict(errors)}


def format_embedding(path, embedding, precision=6):
    values = " ".join(f"{v:.{precision}g}" for v in embedding)
    return f"{path}\t{values}"


def main(argv=None, post=post_json):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", help="image files (JPEG, PNG, GIF or BMP)")
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--port", type=int, default=8501, help="TF Serving's REST port")
    parser.add_argument("--model", default="simclr", help="model name given to TF Serving")
    parser.add_argument("--version", type=int, default=None, help="model version; default latest")
    parser.add_argument("--batch_size", type=int, default=32, help="files per request")
    parser.add_argument("--save", default=None, help="also write the embeddings to this .npy")
    parser.add_argument("--load", type=int, default=0,
                        help="send this many requests (a load test) instead of embedding once")
    parser.add_argument("--threads", type=int, default=8, help="--load: concurrent requests")
    args = parser.parse_args(argv)
    url = predict_url(args.host, args.port, args.model, args.version)
    if args.load:
        try:
            files = []
            for path in args.images:
                with open(path, "rb") as f:
                    files.append(f.read())
        except OSError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(json.dumps(load_test(url, files, args.load, args.batch_size, args.threads, post)))
        return 0
    try:
        embeddings = embed_files(args.images, url, args.batch_size, post=post)
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for path, embedding in zip(args.images, embeddings):
        print(format_embedding(path, embedding))
    if args.save:
        np.save(args.save, embeddings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
