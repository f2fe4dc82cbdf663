"""SimCLR pretraining: f, g and the linear probe, their replica step, and the run around them.

`Pretrainer` owns the model parts and the optimiser and runs one replica step: two views through f
and g, the contrastive loss over the global batch, the probe on stop_gradient(h), one update.
`run_pretraining` wires it to a `RunConfig` and runs it through the shared outer loop
(`simclr_tf.loop`), exporting f at the end (and every `export_every` checkpoints).
"""

import contextlib
import dataclasses
import os

import tensorflow as tf
from absl import logging
from tensorflow.python.eager import context as eager_context

from simclr_tf import checkpoints
from simclr_tf import corrupt
from simclr_tf import data as data_lib
from simclr_tf import distribute
from simclr_tf import export as export_lib
from simclr_tf import loop
from simclr_tf import models
from simclr_tf import tasks
from simclr_tf import trainer as trainer_lib
from simclr_tf.config import ConfigError
from simclr_tf.losses import contrastive_loss

METRICS = ("loss", "contrast_loss", "contrast_acc", "contrast_entropy", "probe_loss", "probe_acc",
           "learning_rate")


class Pretrainer(trainer_lib.Trainer):
    """Builds f, g, the linear probe and the optimiser under `strategy`, and runs replica steps.

    Args:
      config: the run's `RunConfig`.
      strategy: the tf.distribute strategy.
      schedule: the run's `schedules.Schedule`.
      num_classes: classes of the dataset; a linear probe is trained when positive and
        `train.lineareval_while_pretraining`.
    """

    metrics = METRICS
    loss_parts = {"contrast_loss": "contrast", "probe_loss": "probe"}
    verb = "Pretraining"

    def __init__(self, config, strategy, schedule, num_classes=0):
        self.num_classes = num_classes
        super().__init__(config, strategy, schedule)

    def build_models(self, global_bn):
        config = self.config
        self.encoder = models.build_encoder(config.encoder, config.data.image_size, global_bn)
        width = models.encoder_output_dim(self.encoder)
        self.head = models.build_projection_head(config, width, global_bn)
        self.probe = None
        if self.num_classes and config.train.lineareval_while_pretraining:
            self.probe = models.build_linear_probe(self.num_classes, width)

    @property
    def _step_compiled_by_xla(self):
        """Whether XLA compiles the whole step (--jit_compile, or a TPU), views included."""
        return (self.config.train.jit_compile
                or isinstance(self.strategy, tf.distribute.TPUStrategy))

    @property
    def trainable_variables(self):
        parts = [self.encoder, self.head] + ([self.probe] if self.probe else [])
        return [v for part in parts for v in part.trainable_variables]

    def checkpoint_items(self):
        items = {checkpoints.ENCODER: self.encoder, checkpoints.PROJECTION_HEAD: self.head,
                 checkpoints.OPTIMIZER: self.optimizer}
        if self.probe is not None:
            items[checkpoints.LINEAR_PROBE] = self.probe
        return items

    def loss_and_metrics(self, batch):
        """The contrastive loss of two views through f and g, plus the probe's on h."""
        if data_lib.IMAGE in batch:  # --augment_on_device: the views are made here
            # Plain ops where XLA compiles the whole step, else its stages compiled one by one.
            made_in = "graph" if self._step_compiled_by_xla else "device"
            batch = data_lib.views_of_batch(batch, made_in=made_in, **view_settings(self.config))
        views = tf.concat([batch[data_lib.VIEW_A], batch[data_lib.VIEW_B]], axis=0)
        h = self.encoder(views, training=True)
        z, _ = self.head(h, training=True)
        z_a, z_b = tf.split(z, 2, axis=0)
        loss_config = self.config.loss
        contrast_loss, metrics = contrastive_loss(
            loss_config.loss, z_a, z_b, labels=batch.get("label"),
            temperature=loss_config.temperature, hidden_norm=loss_config.hidden_norm,
            semi_hard_negatives=loss_config.semi_hard_negatives, margin=loss_config.margin)
        loss = contrast_loss
        probe_loss = probe_acc = tf.constant(0.0)
        if self.probe is not None:
            labels = tf.concat([batch["label"], batch["label"]], axis=0)
            logits = tf.cast(self.probe(h), tf.float32)
            probe_loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
            probe_acc = tf.reduce_mean(tf.cast(
                tf.equal(tf.argmax(logits, 1, output_type=labels.dtype), labels), tf.float32))
            loss += probe_loss
        return loss, {"contrast_loss": contrast_loss, "probe_loss": probe_loss,
                      "probe_acc": probe_acc, **metrics}


def view_settings(config):
    """The keyword arguments of `data.views_of_batch` that make this run's views."""
    return dict(image_size=config.data.image_size, **_pipeline_view_settings(config))


def _pipeline_view_settings(config):
    aug = config.augment
    return dict(color_jitter_strength=aug.color_jitter_strength, use_blur=aug.use_blur,
                augmentations=aug.augmentations, asymmetric=aug.asymmetric_augment)


def make_dataset_fn(config):
    """function(input_context, seed) -> this input pipeline's batches of two views.

    With `config.data.tf_data_service`, decoding and augmentation run on the service's workers
    ("parallel epochs": every worker produces its own endless stream, so each draws its own random
    seeds instead of repeating one seeded stream). With `config.augment.augment_on_device` the
    batches hold uint8 images and a seed, and `Pretrainer` makes the views in its step.
    """
    service = config.data.tf_data_service
    data = config.data
    examples = data_lib.training_subset(data.dataset, data.train_split, data.data_dir,
                                        data.train_examples, data.train_examples_seed)
    corruption = corrupt.corruption_fn(data.corrupt)

    def dataset_fn(input_context, seed):
        batch = input_context.get_per_replica_batch_size(config.train.train_batch_size)
        with _unseeded_ops() if service else contextlib.nullcontext():
            dataset = _pipeline(input_context, batch, seed)
        if service:
            dataset = dataset.apply(tf.data.experimental.service.distribute(
                processing_mode=tf.data.experimental.service.ShardingPolicy.OFF,
                service=service)).prefetch(tf.data.AUTOTUNE)
        return dataset

    def _pipeline(input_context, batch, seed):
        return data_lib.pretrain_dataset(
            config.data.dataset, config.data.train_split, batch, config.data.image_size,
            data_dir=config.data.data_dir, input_context=input_context,
            seed=None if service else seed, cache=config.data.cache_dataset, examples=examples,
            corruption=corruption, augment_on_device=config.augment.augment_on_device,
            augment_input_size=config.augment.augment_input_size,
            **_pipeline_view_settings(config))
    return dataset_fn


@contextlib.contextmanager
def _unseeded_ops():
    """Builds what runs inside without TensorFlow's global seed, then sets it again.

    With a global seed (keras.utils.set_random_seed, as run.py sets), an op given no seed gets a
    fixed one when it is built, and every tf.data service worker runs the same graph: every worker
    would produce the same stream (the shuffles, the file order and the views' seeds; a test saw
    each batch twice with 2 workers). Built without it, those ops draw their seeds when they run,
    on each worker. Setting the global seed again restarts the count of ops seeded since.
    """
    global_seed = eager_context.global_seed()  # no public getter
    tf.random.set_seed(None)
    try:
        yield
    finally:
        tf.random.set_seed(global_seed)


def _view_pairs_summary(config):
    """Writes `summary_images` pairs of augmented views (side by side) to TensorBoard."""
    count = config.train.summary_images
    batch = next(iter(make_dataset_fn(config)(tf.distribute.InputContext(), config.train.seed)))
    if data_lib.IMAGE in batch:
        batch = data_lib.views_of_batch(batch, **view_settings(config))
    pairs = tf.concat([batch[data_lib.VIEW_A][:count], batch[data_lib.VIEW_B][:count]], axis=2)
    tf.summary.image("augmented_view_pairs", pairs, step=0, max_outputs=count)


def export_encoder(trainer, config, step):
    """Exports f to `<model_dir>/export/<step>/` and keeps the newest `keep_export_max`."""
    base = os.path.join(config.train.model_dir, "export")
    path = export_lib.export_encoder(trainer.encoder, base, step, config)
    export_lib.prune_exports(base, config.train.keep_export_max)
    logging.info("Exported f to %s", path)
    return path


def run_pretraining(config, strategy, on_checkpoint=None, stop_requested=None, on_loop_end=None):
    """Pretrains until the schedule's last step, resuming from the latest checkpoint in model_dir.

    Args:
      config: a validated `RunConfig`.
      strategy: the tf.distribute strategy to run under.
      on_checkpoint: optional callable(pretrainer, checkpoint_path) run after each save.
      stop_requested: optional callable() -> bool (e.g. `preemption.StopSignal`), polled between
        loop calls; when true, saves a checkpoint and raises `preemption.Preempted`.
      on_loop_end: optional callable(pretrainer, step) run after each compiled loop call and its
        checkpoint (e.g. `knn_monitor.KnnMonitor`).

    Returns:
      (pretrainer, last metrics dict as Python floats).
    """
    info = data_lib.dataset_info(config.data.dataset, config.data.train_split,
                                 config.data.data_dir)
    if config.loss.loss == "supcon" and not info.num_classes:
        raise ConfigError(f"--loss=supcon needs labels, but {config.data.dataset} "
                          f"({config.data.train_split}) has none: use another --loss")
    if config.data.train_examples:
        info = dataclasses.replace(info, num_examples=config.data.train_examples)
        logging.info("Pretraining on %d images of %s (--train_examples)", info.num_examples,
                     config.data.train_split)
    schedule = tasks.task_for(config).schedule(config)
    trainer = Pretrainer(config, strategy, schedule, num_classes=info.num_classes)
    chief = distribute.is_chief(strategy)
    # Counted from step 0, so a resumed run exports at the same steps.
    export_steps = config.train.export_every * schedule.checkpoint_steps

    def after_checkpoint(trainer, path):
        step = int(trainer.step.numpy())
        if chief and export_steps and step % export_steps == 0 and step < schedule.total_steps:
            export_encoder(trainer, config, step)
        if on_checkpoint is not None:
            on_checkpoint(trainer, path)

    metrics = loop.run(
        trainer, config, strategy, make_dataset_fn(config), stop_requested=stop_requested,
        at_start=(lambda: _view_pairs_summary(config)) if config.train.summary_images else None,
        on_checkpoint=after_checkpoint, on_loop_end=on_loop_end,
        export_bytes=checkpoints.size_in_bytes(trainer.encoder.variables))
    if chief:
        export_encoder(trainer, config, int(trainer.step.numpy()))
    return trainer, metrics
