"""One SimCLR replica step under MultiWorkerMirroredStrategy, for tests/test_multi_worker.py.

    TF_CONFIG=... python tests/multi_worker_step.py CONFIG_DIR WEIGHTS.npz BATCH.npz OUT.json

Every worker builds the run CONFIG_DIR/config.json describes, takes its half of the fixed global
batch, starts from the given weights, runs one step and (worker 0) writes the step's metrics to
OUT.json and every variable of f, g and the probe after it to OUT.npz (keyed by path).
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import tensorflow as tf  # noqa: E402

strategy = tf.distribute.MultiWorkerMirroredStrategy()

import numpy as np  # noqa: E402

from simclr_tf import config as cfg  # noqa: E402
from simclr_tf import pretrain  # noqa: E402
from simclr_tf.schedules import Schedule  # noqa: E402


def main(config_dir, weights_path, batch_path, out_path):
    weights = np.load(weights_path)
    batch = dict(np.load(batch_path))
    config = cfg.load(config_dir)
    schedule = Schedule(total_steps=10, warmup_steps=0, steps_per_epoch=10)
    trainer = pretrain.Pretrainer(config, strategy, schedule, num_classes=10)
    parts = (trainer.encoder, trainer.head, trainer.probe)
    for p, part in enumerate(parts):
        part.set_weights([weights[f"{p}_{i}"] for i in range(len(part.get_weights()))])
    task = strategy.cluster_resolver.task_id
    per = len(batch["label"]) // strategy.num_replicas_in_sync
    local = {k: tf.constant(v[task * per:(task + 1) * per]) for k, v in batch.items()}

    @tf.function
    def step():
        out = strategy.run(trainer.replica_step, args=(local,))
        return {k: strategy.reduce("MEAN", v, axis=None) for k, v in out.items()}

    metrics = {k: float(v) for k, v in step().items()}
    if task == 0:
        with open(out_path, "w") as f:
            json.dump(metrics, f)
        np.savez(os.path.splitext(out_path)[0] + ".npz",
                 **{v.path: v.numpy() for part in parts for v in part.variables})


if __name__ == "__main__":
    main(*sys.argv[1:5])
