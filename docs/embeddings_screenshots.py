"""Screenshots of TensorBoard's Projector and Images tabs for a run's evaluation (the pictures in
docs/embeddings.md).

    python docs/embeddings_screenshots.py --logdir=/tmp/simclr_tf/fashion_mnist --out=docs/images

Starts TensorBoard on the run directory, opens it in headless Chromium and saves
`projector.png` (the Projector tab as it opens on the evaluation's sample of h: PCA, thumbnails,
labelled by class) and `nearest_neighbours_tensorboard.png` (the Images tab, showing
eval/nearest_neighbours at its own size).
Needs TensorBoard (requirements.txt), Playwright (`pip install playwright`, in a venv if you like)
and a Chromium (`apt-get install chromium`); Playwright drives the installed Chromium, so it
downloads no browser.
"""

import argparse
import os
import shutil
import socket
import subprocess
import time
import urllib.request

from playwright.sync_api import sync_playwright


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start_tensorboard(tensorboard, logdir, port):
    command = [tensorboard, f"--logdir={logdir}", f"--port={port}", "--host=localhost"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(120):
        try:
            urllib.request.urlopen(f"http://localhost:{port}/data/runs", timeout=2)
            return server
        except OSError:
            time.sleep(1)
    server.kill()
    raise SystemExit("error: TensorBoard did not start within 2 minutes")


def projector(page, url, path):
    """The Projector tab as it opens: the first run's first tensor, which is the evaluation's h."""
    page.goto(f"{url}/#projector")
    page.wait_for_timeout(30_000)  # the sample loads, PCA runs, the sprite loads
    page.screenshot(path=path)


def images(page, url, path):
    """The Images tab at the images' own size, the training view pairs folded away."""
    page.goto(f"{url}/#images")
    page.wait_for_timeout(10_000)
    page.get_by_text("Show actual image size").click()
    page.get_by_text("augmented_view_pairs").first.click()
    page.wait_for_timeout(5_000)
    page.screenshot(path=path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", required=True, help="the run's model_dir")
    parser.add_argument("--out", default="docs/images", help="where the PNGs go")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    parser.add_argument("--tensorboard", default=shutil.which("tensorboard") or "tensorboard",
                        help="the tensorboard command (of the environment simclr_tf runs in)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    port = free_port()
    server = start_tensorboard(args.tensorboard, args.logdir, port)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=[
                "--use-gl=angle", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"])
            page = browser.new_page(viewport={"width": 1600, "height": 1100})
            url = f"http://localhost:{port}"
            projector(page, url, os.path.join(args.out, "projector.png"))
            images(page, url, os.path.join(args.out, "nearest_neighbours_tensorboard.png"))
            browser.close()
    finally:
        server.kill()
    print(f"wrote {args.out}/projector.png and {args.out}/nearest_neighbours_tensorboard.png")


if __name__ == "__main__":
    main()
