"""The kNN monitor: kNN accuracy of f on the eval split every `eval_every` steps of pretraining,
run by the training loop after its compiled calls (`on_loop_end`), to TensorBoard and the log."""

import time

import tensorflow as tf
from absl import logging

from simclr_tf import config as config_lib
from simclr_tf import data as data_lib
from simclr_tf import evaluate
from simclr_tf import results as results_lib


class KnnMonitor:
    """kNN accuracy of the current f every `eval.eval_every` steps, as a training-loop hook.

    Call it as `monitor(trainer, step)` after each compiled loop (`pretrain.run_pretraining`'s
    `on_loop_end`); it runs when a multiple of `eval_every` was passed since the last run (exactly
    at the multiple when `steps_per_loop` divides `eval_every`). f runs in inference mode, so the
    training state is untouched. Writes `monitor/knn_top1|top5` to `<model_dir>/eval_<split>/`.
    """

    def __init__(self, config, num_classes):
        config = config_lib.on_eval_dataset(config)
        if config.eval.eval_dataset:
            num_classes = data_lib.dataset_info(config.data.dataset, config.data.eval_split,
                                                config.data.data_dir).num_classes
        label_map = evaluate.label_map_for(config)
        num_classes = label_map.num_classes if label_map else num_classes
        self.config = config
        self.num_classes = num_classes
        self.every = config.eval.eval_every
        self.last = None
        self.history = []  # [(step, results)]
        self._writer = None

    def due(self, step):
        if not self.every:
            return False
        # Before the first run, `last` is 0: a resumed run is evaluated at its first loop end.
        return step // self.every > (self.last or 0) // self.every

    def __call__(self, trainer, step):
        if not self.due(step):
            return None
        self.last = step
        t0 = time.time()
        results = evaluate.evaluate_encoder(trainer.encoder, self.config, self.num_classes,
                                            ("knn",))
        results["seconds"] = round(time.time() - t0, 1)
        self.history.append((step, results))
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(results_lib.eval_dir(self.config))
        with self._writer.as_default(step=step):
            for key in ("knn_top1", "knn_top5"):
                tf.summary.scalar(f"monitor/{key}", results[key])
        self._writer.flush()
        logging.info("step %d  kNN monitor on %s: top1 %.4f  top5 %.4f  (%.0f s)", step,
                     self.config.data.eval_split, results["knn_top1"], results["knn_top5"],
                     results["seconds"])
        return results
