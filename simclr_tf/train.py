"""SimCLR pretraining: the per-replica step, the compiled inner loop and the outer loop.

Three pieces, as in TF Model Garden's orbit: `Pretrainer` owns the model parts, optimiser and the
replica step; `Pretrainer.train_loop` runs `steps` replica steps inside one `tf.function` and returns
the loop's mean metrics (no host sync or summary inside it); `run_pretraining` is the outer loop:
logging, TensorBoard, checkpoints and resume.
"""

import dataclasses
import math
import os
import re
import time

import keras
import tensorflow as tf
from absl import logging

from simclr_tf import data as data_lib
from simclr_tf import distribute
from simclr_tf import export as export_lib
from simclr_tf import guards
from simclr_tf.heads import LinearProbe, ProjectionHead
from simclr_tf.lars import LARS, is_bn_or_bias
from simclr_tf.config import ConfigError
from simclr_tf.losses import contrastive_loss
from simclr_tf.schedules import WarmupCosine, scaled_learning_rate

METRICS = ("loss", "contrast_loss", "contrast_acc", "contrast_entropy", "probe_loss", "probe_acc",
           "learning_rate")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Step counts derived from the config and the dataset size."""
    total_steps: int
    warmup_steps: int
    steps_per_epoch: int


def make_schedule(train_config, optimizer_config, num_examples):
    """Step counts as the reference code derives them: an epoch is num_examples examples (the
    input pipeline repeats, so batches run across epoch boundaries), total = num_examples *
    epochs // batch + 1 and warm-up = round(warmup_epochs * num_examples // batch)."""
    batch = train_config.train_batch_size
    steps_per_epoch = max(num_examples // batch, 1)
    total = train_config.train_steps or num_examples * train_config.train_epochs // batch + 1
    warmup = int(round(optimizer_config.warmup_epochs * num_examples // batch))
    return Schedule(total_steps=int(total), warmup_steps=min(warmup, int(total)),
                    steps_per_epoch=steps_per_epoch)


# The supervised heads: the linear probe's and the fine-tuning classifier's Dense layer (both named
# "logits"). As the original's `head_supervised`, LARS neither adapts nor decays them (a trust
# ratio would shrink a linear classifier's steps to ~eta of its norm); the loss carries their L2.
SUPERVISED_HEAD = r"(^|/)logits/"


def is_supervised_head(variable):
    return re.search(SUPERVISED_HEAD, variable.path) is not None


def decayed_in_loss(variables, optimizer_name):
    """The variables whose L2 the loss carries: LARS decays the others itself."""
    return [v for v in variables if not is_bn_or_bias(v)
            and (optimizer_name != "lars" or is_supervised_head(v))]


def l2_regularisation(weight_decay, variables):
    """weight_decay * sum of ||v||^2 / 2 (0.0 when there is nothing to decay)."""
    if not weight_decay or not variables:
        return 0.0
    return weight_decay * tf.add_n([tf.nn.l2_loss(v) for v in variables])


def build_optimizer(optimizer_config, batch_size, schedule):
    """The optimiser and its learning-rate schedule (peak LR scaled with the batch size)."""
    peak = scaled_learning_rate(optimizer_config.learning_rate, batch_size,
                                optimizer_config.learning_rate_scaling)
    lr = WarmupCosine(peak, schedule.warmup_steps, schedule.total_steps)
    name = optimizer_config.optimizer
    if name == "lars":
        return LARS(lr, momentum=optimizer_config.momentum,
                    weight_decay=optimizer_config.weight_decay, exclude_names=(SUPERVISED_HEAD,))
    if name == "momentum":
        return keras.optimizers.SGD(lr, momentum=optimizer_config.momentum, nesterov=True)
    if name == "adam":
        return keras.optimizers.Adam(lr)
    raise ValueError(f"optimizer must be one of lars, momentum, adam; got {name!r}")


class Pretrainer:
    """Builds f, g, the linear probe and the optimiser under `strategy`, and runs replica steps."""

    def __init__(self, config, strategy, schedule, num_classes=0):
        self.config = config
        self.strategy = strategy
        self.schedule = schedule
        multi_replica = strategy.num_replicas_in_sync > 1
        with strategy.scope():
            self.encoder = config.encoder.build(
                config.data.image_size, global_bn=config.encoder.global_bn and multi_replica)
            self.head = ProjectionHead(
                config.head.proj_head_mode, config.head.num_proj_layers,
                config.head.proj_out_dim, hidden_dim=config.head.proj_head_hidden_dim or None,
                global_bn=config.encoder.global_bn and multi_replica,
                bn_momentum=config.encoder.batch_norm_decay,
                bn_epsilon=config.encoder.batch_norm_epsilon, name="projection_head")
            self.head.build((None, config.encoder.output_dim))
            self.probe = None
            if num_classes and config.train.lineareval_while_pretraining:
                self.probe = LinearProbe(num_classes, name="linear_probe")
                self.probe.build((None, config.encoder.output_dim))
            self.optimizer = build_optimizer(config.optimizer, config.train.train_batch_size,
                                             schedule)
            if config.train.precision == "float16":
                self.optimizer = keras.optimizers.LossScaleOptimizer(self.optimizer)
            self.optimizer.build(self.trainable_variables)
            self.checkpoint = tf.train.Checkpoint(
                encoder=self.encoder, projection_head=self.head, optimizer=self.optimizer,
                **({"linear_probe": self.probe} if self.probe else {}))
        self._l2_variables = decayed_in_loss(self.trainable_variables,
                                             config.optimizer.optimizer)

    @property
    def trainable_variables(self):
        parts = [self.encoder, self.head] + ([self.probe] if self.probe else [])
        return [v for part in parts for v in part.trainable_variables]

    @property
    def step(self):
        return self.optimizer.iterations

    def _regularisation(self):
        return l2_regularisation(self.config.optimizer.weight_decay, self._l2_variables)

    def replica_step(self, batch):
        """One SimCLR step on this replica's batch; returns the replica's metrics."""
        views = tf.concat([batch["view_a"], batch["view_b"]], axis=0)
        with tf.GradientTape() as tape:
            h = self.encoder(views, training=True)
            z, _ = self.head(h, training=True)
            z_a, z_b = tf.split(z, 2, axis=0)
            loss_config = self.config.loss
            contrast_loss, metrics = contrastive_loss(
                loss_config.loss, z_a, z_b, labels=batch.get("label"),
                temperature=loss_config.temperature, hidden_norm=loss_config.hidden_norm,
                semi_hard_negatives=loss_config.semi_hard_negatives, margin=loss_config.margin)
            loss = contrast_loss + self._regularisation()
            probe_loss = probe_acc = tf.constant(0.0)
            if self.probe is not None:
                labels = tf.concat([batch["label"], batch["label"]], axis=0)
                logits = tf.cast(self.probe(h), tf.float32)
                probe_loss = tf.reduce_mean(
                    tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
                probe_acc = tf.reduce_mean(tf.cast(
                    tf.equal(tf.argmax(logits, 1, output_type=labels.dtype), labels), tf.float32))
                loss += probe_loss
            # tf.distribute sums the replicas' gradients.
            scaled_loss = loss / self.strategy.num_replicas_in_sync
            if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
                scaled_loss = self.optimizer.scale_loss(scaled_loss)
        variables = self.trainable_variables
        grads = tape.gradient(scaled_loss, variables)
        self.optimizer.apply_gradients(zip(grads, variables))
        return {"loss": loss, "contrast_loss": contrast_loss, "probe_loss": probe_loss,
                "probe_acc": probe_acc, **metrics}

    def make_train_loop(self):
        """A compiled function running `steps` replica steps and returning their mean metrics."""
        return compiled_train_loop(self.strategy, self.replica_step, METRICS, self.optimizer,
                                   self.config.train.jit_compile)


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


def make_dataset_fn(config, seed):
    """The per-input-pipeline dataset function for `distribute_datasets_from_function`.

    With `config.data.tf_data_service`, decoding and augmentation run on the service's workers
    ("parallel epochs": every worker produces its own endless stream, so each draws its own random
    seeds instead of repeating one seeded stream).
    """
    service = config.data.tf_data_service

    def dataset_fn(input_context):
        batch = input_context.get_per_replica_batch_size(config.train.train_batch_size)
        dataset = data_lib.pretrain_dataset(
            config.data.dataset, config.data.train_split, batch, config.data.image_size,
            data_dir=config.data.data_dir, input_context=input_context,
            color_jitter_strength=config.augment.color_jitter_strength,
            use_blur=config.augment.use_blur, seed=None if service else seed,
            cache=config.data.cache_dataset, augmentations=config.augment.augmentations,
            asymmetric=config.augment.asymmetric_augment)
        if service:
            dataset = dataset.apply(tf.data.experimental.service.distribute(
                processing_mode=tf.data.experimental.service.ShardingPolicy.OFF,
                service=service)).prefetch(tf.data.AUTOTUNE)
        return dataset
    return dataset_fn


def _log_view_pairs(dataset, count):
    batch = next(iter(dataset))
    pairs = tf.concat([batch["view_a"][:count], batch["view_b"][:count]], axis=2)
    tf.summary.image("augmented_view_pairs", pairs, step=0, max_outputs=count)


def export_encoder(trainer, config, step):
    """Exports f to `<model_dir>/export/<step>/` and keeps the newest `keep_export_max`."""
    base = os.path.join(config.train.model_dir, "export")
    path = export_lib.export_encoder(trainer.encoder, base, step, config)
    export_lib.prune_exports(base, config.train.keep_export_max)
    logging.info("Exported f to %s", path)
    return path


def _format_eta(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def run_pretraining(config, strategy, on_checkpoint=None, stop_requested=None, on_loop_end=None):
    """Pretrains until `total_steps`, resuming from the latest checkpoint in model_dir.

    Args:
      config: a validated `RunConfig`.
      strategy: the tf.distribute strategy to run under.
      on_checkpoint: optional callable(pretrainer, checkpoint_path) run after each save.
      on_loop_end: optional callable(pretrainer, step) run after each compiled loop call and its
        checkpoint (e.g. `evaluate.KnnMonitor`).
      stop_requested: optional callable() -> bool (e.g. `guards.StopSignal`), polled between loop
        calls; when true, saves a checkpoint and raises `guards.Preempted`.

    Returns:
      (pretrainer, last metrics dict as Python floats).
    """
    info = data_lib.dataset_info(config.data.dataset, config.data.train_split,
                                 config.data.data_dir)
    if config.loss.loss == "supcon" and not info.num_classes:
        raise ConfigError(f"--loss=supcon needs labels, but {config.data.dataset} "
                          f"({config.data.train_split}) has none: use another --loss")
    schedule = make_schedule(config.train, config.optimizer, info.num_examples)
    trainer = Pretrainer(config, strategy, schedule, num_classes=info.num_classes)
    model_dir = config.train.model_dir
    out_dir = distribute.write_dir(model_dir, strategy)
    manager = tf.train.CheckpointManager(
        trainer.checkpoint, out_dir, max_to_keep=config.train.keep_checkpoint_max,
        step_counter=trainer.step)
    guards.check_disk_space(out_dir, trainer, config.train.keep_checkpoint_max)
    restore_from = tf.train.latest_checkpoint(model_dir)
    if restore_from:
        guards.restore_checkpoint(trainer.checkpoint, restore_from)
        logging.info("Resumed from %s at step %d", restore_from, int(trainer.step.numpy()))
    start = int(trainer.step.numpy())
    total = schedule.total_steps
    # A resumed run continues the augmentation stream instead of replaying its first batches.
    dataset = strategy.distribute_datasets_from_function(
        make_dataset_fn(config, seed=config.train.seed * 1_000_003 + start))
    writer = tf.summary.create_file_writer(out_dir)
    if start == 0 and config.train.summary_images:
        with writer.as_default():
            local = make_dataset_fn(config, config.train.seed)(tf.distribute.InputContext())
            _log_view_pairs(local, config.train.summary_images)
    train_loop = trainer.make_train_loop()
    iterator = iter(dataset)
    metrics = {}
    step = start
    logging.info("Training %s from step %d to %d (%d steps/epoch, global batch %d, %d replicas)",
                 f"resnet{config.encoder.resnet_depth}x{config.encoder.width_multiplier}",
                 start, total, schedule.steps_per_epoch, config.train.train_batch_size,
                 strategy.num_replicas_in_sync)
    chief = distribute.is_chief(strategy)
    last_saved = start
    t_start = time.time()
    should_stop = guards.agreed(strategy, stop_requested)
    while step < total:
        if should_stop():
            saved = (guards.save_checkpoint(manager, trainer, step) if step != last_saved
                     else tf.train.latest_checkpoint(out_dir))
            if out_dir != model_dir:  # a non-chief worker: resuming reads the chief's copy
                distribute.remove_worker_dir(out_dir, model_dir)
                saved = saved and os.path.join(model_dir, os.path.basename(saved))
            raise guards.Preempted(step, total, saved)
        next_checkpoint = (step // config.train.checkpoint_steps + 1) * config.train.checkpoint_steps
        steps = min(config.train.steps_per_loop, total - step, next_checkpoint - step)
        t0 = time.time()
        out = train_loop(iterator, tf.constant(steps, tf.int32))
        metrics = {k: float(v) for k, v in out.items()}
        step = int(trainer.step.numpy())
        elapsed = time.time() - t0
        images_per_sec = steps * config.train.train_batch_size / max(elapsed, 1e-9)
        done = step - start
        eta = (time.time() - t_start) / max(done, 1) * (total - step)
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(
                f"loss is {metrics['loss']} at step {step}: stopping without saving; the last "
                f"good checkpoint is {manager.latest_checkpoint}")
        logging.info(
            "step %d/%d  loss %.4f (contrast %.4f, probe %.4f)  contrast_acc %.3f  entropy %.3f  "
            "probe_acc %.3f  lr %.4g  %.1f images/s  ETA %s", step, total, metrics["loss"],
            metrics["contrast_loss"], metrics["probe_loss"], metrics["contrast_acc"],
            metrics["contrast_entropy"], metrics["probe_acc"], metrics["learning_rate"],
            images_per_sec, _format_eta(eta))
        with writer.as_default(step=step):
            for k, v in metrics.items():
                tf.summary.scalar(f"train/{k}", v)
            tf.summary.scalar("train/images_per_sec", images_per_sec)
        if step % config.train.checkpoint_steps == 0 or step >= total:
            path = guards.save_checkpoint(manager, trainer, step)  # checks finite; one-line errors
            last_saved = step
            logging.info("Saved checkpoint %s", path)
            # Counted from step 0, so a resumed run exports at the same steps.
            every = config.train.export_every * config.train.checkpoint_steps
            if chief and every and step % every == 0 and step < total:
                export_encoder(trainer, config, step)
            if on_checkpoint is not None:
                on_checkpoint(trainer, path)
        if on_loop_end is not None:
            on_loop_end(trainer, step)
    if last_saved != step or not manager.latest_checkpoint:
        guards.save_checkpoint(manager, trainer, step)
    if chief:
        export_encoder(trainer, config, step)
    writer.flush()
    if out_dir != model_dir:
        distribute.remove_worker_dir(out_dir, model_dir)
    return trainer, metrics
