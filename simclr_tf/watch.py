"""`--mode=eval`: evaluating one checkpoint of a run, or each new one as the run writes it until
its last step (`total_steps`), each result written by `results`."""

import time

import tensorflow as tf
from absl import logging

from simclr_tf import checkpoints
from simclr_tf import evaluate
from simclr_tf import results as results_lib
from simclr_tf import tasks


def total_steps(config):
    """The final step of the run `config` describes (where watching its checkpoints stops)."""
    return tasks.task_for(config).total_steps(config)


def run_evaluation(config, checkpoint=None):
    """Evaluates `checkpoint`, or every new checkpoint of model_dir until the run's last step.

    Watching ends at the checkpoint of the final step, or after `eval.eval_timeout` seconds
    (0 = no limit) without a new checkpoint. Returns the last results.
    """
    model_dir = config.train.model_dir
    if checkpoint is not None:
        path = checkpoints.resolve(model_dir, checkpoint)
        return _evaluate_and_write(config, path)
    final = total_steps(config)
    results = None
    timeout = config.eval.eval_timeout or None
    for path in tf.train.checkpoints_iterator(model_dir, min_interval_secs=10, timeout=timeout):
        try:
            results = _evaluate_and_write(config, path)
        except tf.errors.NotFoundError:
            # The trainer's CheckpointManager deleted it (keep_checkpoint_max) meanwhile.
            logging.warning("Checkpoint %s was deleted before it was evaluated", path)
            continue
        if results["step"] >= final:
            break
    if results is None:
        raise ValueError(f"no checkpoint appeared in {model_dir} within eval_timeout="
                         f"{config.eval.eval_timeout}s")
    return results


def _evaluate_and_write(config, path):
    t0 = time.time()
    results = evaluate.evaluate_checkpoint(config, path)
    results["eval_seconds"] = round(time.time() - t0, 1)
    written = results_lib.write_results(config, results)
    logging.info("Evaluated %s (step %d) on %s: %s -> %s", path, results["step"],
                 config.data.eval_split, results_lib.summary_line(results), written)
    return results
