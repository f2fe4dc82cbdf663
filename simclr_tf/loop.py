"""The training loop every train mode runs through: resume, train, report, save, stop.

Three pieces, as in TF Model Garden's orbit. A trainer (`pretrain.Pretrainer`,
`finetune.Finetuner`, `distill.Distiller`) says what it checkpoints, how one replica step goes and
what it reports (the `Trainer` interface below); `compiled_train_loop` runs `steps` replica steps
inside one `tf.function` with no host sync; `run` is the outer loop, written once, so every train
mode gets the same guarantees:

* it resumes from the latest complete checkpoint of model_dir (or initialises the weights when
  there is none), and its dataset continues the seeded stream at that step;
* disk space is checked before the first save, and every save refuses non-finite weights and
  leaves the last complete checkpoint intact, and named, when the disk is full (`checkpoints`);
* a non-finite loss stops the run with one line, saving nothing;
* a stop request (SIGTERM, see `preemption`) saves a checkpoint and raises `Preempted`;
* non-chief workers of a multi-worker run write to a temporary directory, removed at the end;
* one progress line per loop call (step, loss and its parts, metrics, learning rate, images/s,
  ETA) and the same values as TensorBoard scalars under `train/`.
"""

import math
import os
import time
import typing

import tensorflow as tf
from absl import logging

from simclr_tf import checkpoints
from simclr_tf import distribute
from simclr_tf import preemption
from simclr_tf.schedules import Schedule


class Trainer(typing.Protocol):
    """What `run` needs of a train mode."""

    description: str  # what is trained, for the log: "Pretraining resnet50x1"
    schedule: Schedule
    metrics: tuple  # names the compiled loop returns: "loss", ..., "learning_rate"
    loss_parts: dict  # metric name -> its label inside the progress line's "loss (...)"

    @property
    def step(self):
        """The global step: the optimiser's iteration count."""

    def checkpoint_items(self):
        """{name: trackable} saved in every checkpoint (models, layers, the optimiser)."""

    def make_train_loop(self):
        """A `compiled_train_loop`: (iterator, steps) -> {metric: mean over the steps}."""


def compiled_train_loop(strategy, step_fn, metrics, optimizer, jit_compile=False):
    """A `tf.function(iterator, steps)` running `steps` replica steps under `strategy`.

    `step_fn(batch)` returns a dict with every name in `metrics` but "learning_rate"; the loop
    returns their means over the steps (and replicas) plus the optimiser's current learning rate,
    with no host sync inside. With `jit_compile`, XLA compiles `step_fn` (one replica or a TPU:
    see `config.validate`).
    """
    keys = [k for k in metrics if k != "learning_rate"]
    if jit_compile:
        step_fn = tf.function(step_fn, jit_compile=True)

    @tf.function
    def train_loop(iterator, steps):
        totals = tf.zeros([len(keys)])
        for _ in tf.range(steps):
            per_replica = strategy.run(step_fn, args=(next(iterator),))
            totals += tf.stack([strategy.reduce(
                tf.distribute.ReduceOp.MEAN, per_replica[k], axis=None) for k in keys])
        means = dict(zip(keys, tf.unstack(totals / tf.cast(steps, tf.float32))))
        means["learning_rate"] = optimizer.learning_rate
        return means

    return train_loop


def run(trainer, config, strategy, dataset_fn, *, initialize=None, stop_requested=None,
        at_start=None, on_checkpoint=None, on_loop_end=None, export_bytes=0):
    """Trains until the schedule's last step, resuming from model_dir's latest checkpoint.

    Args:
      trainer: a `Trainer` built for `config` under `strategy`.
      config: the run's `RunConfig` (its `train` section: model_dir, steps, checkpoints, seed).
      strategy: the tf.distribute strategy.
      dataset_fn: function(input_context, seed) -> this input pipeline's batches; the seed is
        derived from `train.seed` and the start step, so a resumed run continues the stream.
      initialize: optional callable() loading initial weights (e.g. from --checkpoint), run only
        when model_dir has no checkpoint to resume from.
      stop_requested: optional callable() -> bool (e.g. `preemption.StopSignal`), polled between
        loop calls; when true (on any worker), saves a checkpoint and raises
        `preemption.Preempted`.
      at_start: optional callable() run inside the TensorBoard writer before the first step of
        a fresh run (e.g. to write example images).
      on_checkpoint: optional callable(trainer, checkpoint_path) after each save.
      on_loop_end: optional callable(trainer, step) after each loop call and its checkpoint.
      export_bytes: room an export takes, for the disk-space check (0: the run exports nothing).

    Returns:
      The last loop call's metrics as Python floats ({} when nothing was left to train).

    Raises:
      preemption.Preempted, FloatingPointError (non-finite loss or weights),
      checkpoints.CheckpointError (no room, a checkpoint that does not fit, a failed write).
    """
    train = config.train
    model_dir = train.model_dir
    out_dir = distribute.write_dir(model_dir, strategy)
    items = trainer.checkpoint_items()
    variables = _unique_variables(items.values())
    manager = checkpoints.manager(tf.train.Checkpoint(**items), out_dir,
                                  train.keep_checkpoint_max, trainer.step)
    try:
        checkpoints.check_disk_space(out_dir, variables, train.keep_checkpoint_max, export_bytes)
        resume_from = checkpoints.latest(model_dir)
        if resume_from:
            checkpoints.restore(resume_from, items)
            logging.info("Resumed from %s at step %d", resume_from, int(trainer.step.numpy()))
        elif initialize is not None:
            initialize()
        return _train(trainer, config, strategy, dataset_fn, manager, variables, out_dir,
                      stop_requested, at_start, on_checkpoint, on_loop_end)
    finally:
        if out_dir != model_dir:
            distribute.remove_worker_dir(out_dir, model_dir)


def _train(trainer, config, strategy, dataset_fn, manager, variables, out_dir, stop_requested,
           at_start, on_checkpoint, on_loop_end):
    train = config.train
    start = step = int(trainer.step.numpy())
    total = trainer.schedule.total_steps
    logging.info("%s from step %d to %d (%d steps/epoch, global batch %d, %d replicas)",
                 trainer.description, start, total, trainer.schedule.steps_per_epoch,
                 train.train_batch_size, strategy.num_replicas_in_sync)
    if start >= total:
        if not manager.latest_checkpoint:
            checkpoints.save(manager, variables, step)
        return {}
    writer = tf.summary.create_file_writer(out_dir)
    if start == 0 and at_start is not None:
        with writer.as_default():
            at_start()
    seed = train.seed * 1_000_003 + start
    iterator = iter(strategy.distribute_datasets_from_function(lambda ctx: dataset_fn(ctx, seed)))
    train_loop = trainer.make_train_loop()
    should_stop = preemption.agreed(strategy, stop_requested)
    metrics = {}
    last_saved = start
    t_start = time.time()
    while step < total:
        if should_stop():
            saved = (checkpoints.save(manager, variables, step) if step != last_saved
                     else checkpoints.latest(out_dir))
            if saved and out_dir != train.model_dir:
                # A non-chief worker: resuming reads the chief's copy.
                saved = os.path.join(train.model_dir, os.path.basename(saved))
            raise preemption.Preempted(step, total, saved)
        every = trainer.schedule.checkpoint_steps or train.checkpoint_steps
        steps = min(train.steps_per_loop, total - step, (step // every + 1) * every - step)
        t0 = time.time()
        out = train_loop(iterator, tf.constant(steps, tf.int32))
        metrics = {k: float(v) for k, v in out.items()}
        step = int(trainer.step.numpy())
        images_per_sec = steps * train.train_batch_size / max(time.time() - t0, 1e-9)
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(
                f"loss is {metrics['loss']} at step {step}: stopping without saving; the last "
                f"good checkpoint is {checkpoints.latest(out_dir)}")
        eta = (time.time() - t_start) / max(step - start, 1) * (total - step)
        logging.info("%s", progress_line(trainer, step, total, metrics, images_per_sec, eta))
        with writer.as_default(step=step):
            for k, v in metrics.items():
                tf.summary.scalar(f"train/{k}", v)
            tf.summary.scalar("train/images_per_sec", images_per_sec)
        if step % every == 0 or step >= total:
            path = checkpoints.save(manager, variables, step)
            last_saved = step
            logging.info("Saved checkpoint %s", path)
            if on_checkpoint is not None:
                on_checkpoint(trainer, path)
        if on_loop_end is not None:
            on_loop_end(trainer, step)
    if last_saved != step or not manager.latest_checkpoint:
        checkpoints.save(manager, variables, step)
    writer.flush()
    return metrics


def progress_line(trainer, step, total, metrics, images_per_sec, eta_seconds):
    """`step 120/500  loss 4.5 (contrast 4.3, probe 0.2)  contrast_acc 0.410  ...  lr 0.3
    410.2 images/s  ETA 0h12m05s`: the same shape in every train mode."""
    parts = ", ".join(f"{label} {metrics[k]:.4f}" for k, label in trainer.loss_parts.items())
    line = f"step {step}/{total}  loss {metrics['loss']:.4f}" + (f" ({parts})" if parts else "")
    for k in trainer.metrics:
        if k not in ("loss", "learning_rate") and k not in trainer.loss_parts:
            line += f"  {k} {metrics[k]:.3f}"
    seconds = int(eta_seconds)
    eta = f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
    return (f"{line}  lr {metrics['learning_rate']:.4g}  {images_per_sec:.1f} images/s  "
            f"ETA {eta}")


def _unique_variables(parts):
    seen, variables = set(), []
    for part in parts:
        for v in part.variables:
            if id(v) not in seen:
                seen.add(id(v))
                variables.append(v)
    return variables
