"""Where an evaluation's results go: TensorBoard scalars under `<model_dir>/eval_<split>/`,
`results-<step>.json` beside them for each evaluated checkpoint, and `<model_dir>/results.json` for
the latest (each written atomically)."""

import json
import os
import re

import tensorflow as tf

from simclr_tf import config as config_lib
from simclr_tf import rundir

RESULTS_FILENAME = "results.json"


def eval_dir(config):
    """`<model_dir>/eval_<split>` (a sliced split such as test[:10%] as test__10__), or
    `eval_<eval_dataset>_<its split>` when f is evaluated on another dataset."""
    name = config_lib.on_eval_dataset(config).data.eval_split
    if config.eval.eval_dataset:
        name = f"{config.eval.eval_dataset}_{name}"
    return os.path.join(config.train.model_dir, f"eval_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}")


def write_results(config, results, summary_prefix="eval"):
    """TensorBoard scalars in eval_<split>/, results.json (latest) and results-<step>.json."""
    model_dir = config.train.model_dir
    directory = eval_dir(config)
    tf.io.gfile.makedirs(directory)
    writer = tf.summary.create_file_writer(directory)
    with writer.as_default(step=results["step"]):
        for key, value in results.items():
            if isinstance(value, float):
                tf.summary.scalar(f"{summary_prefix}/{key}", value)
    writer.flush()
    text = json.dumps(results, indent=2, sort_keys=True)
    for path in (os.path.join(directory, f"results-{results['step']}.json"),
                 os.path.join(model_dir, RESULTS_FILENAME)):
        rundir.write_atomically(path, text + "\n")
    return os.path.join(model_dir, RESULTS_FILENAME)


def summary_line(results):
    """`knn_top1 0.7300  linear_top1 0.8360 ...`: the accuracies of `results` on one line."""
    keys = [k for k in sorted(results) if k.endswith(("top1", "top5"))]
    return "  ".join(f"{k} {results[k]:.4f}" for k in keys)
