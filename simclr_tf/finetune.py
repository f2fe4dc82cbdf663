"""Fine-tuning and linear evaluation: f (partly frozen) -> [part of g] -> a linear classifier.

`Classifier` is the model: the encoder f, frozen up to `fine_tune_after_block` (-1: everything
trains; 0: after the stem; k = 1..3: after block group k; 4: f is frozen, the paper's linear
evaluation), optionally the first `ft_proj_selector` layers of the projection head g (SimCLRv2
fine-tunes from the middle of g), and a linear `logits` layer (optionally zero-initialised).
Frozen layers run in inference mode (batch norm uses and keeps its moving statistics) and get no
gradient, so they stay exactly as they were.

`Finetuner` owns the model, the optimiser and the replica step (cross-entropy on the labels);
`train_classifier` is the outer loop (checkpoints, resume, summaries), shared with distillation;
`run_finetuning` wires them to a `RunConfig`: a class-balanced label fraction (or a file of example
ids) of the training split, the paper's fine-tuning augmentation (random crop + flip), and
initial weights from a pretraining run, one of its checkpoints, or an exported encoder.
"""

import dataclasses
import math
import os
import time

import keras
import tensorflow as tf
from absl import logging

from simclr_tf import config as config_lib
from simclr_tf import data as data_lib
from simclr_tf import distribute
from simclr_tf import export as export_lib
from simclr_tf import guards
from simclr_tf import label_subset
from simclr_tf import supervised_data
from simclr_tf.heads import ProjectionHead, logits_initializer
from simclr_tf.train import (build_optimizer, compiled_train_loop, decayed_in_loss,
                             l2_regularisation)
from simclr_tf.train import make_schedule as train_schedule

METRICS = ("loss", "supervised_loss", "train_acc", "learning_rate")
LINEAR_EVAL_BLOCK = 4


class FinetuneError(ValueError):
    """Fine-tuning cannot start; the message is one line naming the flag."""


# --------------------------------------------------------------------------------------------
# The model.

def head_layers(head_config):
    """Number of dense layers of the projection head `head_config` describes."""
    return {"none": 0, "linear": 1}.get(head_config.proj_head_mode, head_config.num_proj_layers)


def _stem_output(encoder):
    """Name of the last stem layer (the input of block group 1)."""
    last = None
    for layer in encoder.layers:
        if layer.name.startswith("group"):
            break
        if layer.name.startswith("stem"):
            last = layer.name
    if last is None:
        raise FinetuneError(f"encoder {encoder.name} has no stem layers to freeze")
    return last


class Classifier:
    """logits = W · [g_{1..j}](f(images)) + b, with f frozen up to `fine_tune_after_block`.

    Args:
      encoder: the Keras encoder f (functional, with simclr_tf's layer names).
      num_classes: width of the logits.
      head: the `ProjectionHead` g, needed when `ft_proj_selector > 0`.
      ft_proj_selector: 0 classifies h; j > 0 classifies the output of g's layer j (hiddens[j]).
      fine_tune_after_block: -1 (all of f trains), 0 (after the stem), 1..3 (after block group k)
        or 4 (f frozen: linear evaluation).
      zero_init_logits_layer: start the logits layer at zero (SimCLRv2).
    """

    def __init__(self, encoder, num_classes, head=None, ft_proj_selector=0,
                 fine_tune_after_block=-1, zero_init_logits_layer=False):
        if not -1 <= fine_tune_after_block <= LINEAR_EVAL_BLOCK:
            raise FinetuneError(f"fine_tune_after_block must be in -1..4, got "
                                f"{fine_tune_after_block}")
        if ft_proj_selector and (head is None or not 0 < ft_proj_selector <= head.num_layers):
            raise FinetuneError(
                f"ft_proj_selector={ft_proj_selector} needs a projection head with at least that "
                f"many layers (and counts from 0 here); this one has "
                f"{0 if head is None else head.num_layers}")
        self.encoder = encoder
        self.head = head if ft_proj_selector else None
        self.ft_proj_selector = ft_proj_selector
        self.fine_tune_after_block = fine_tune_after_block
        self._frozen = self._tail = None
        if 0 <= fine_tune_after_block < LINEAR_EVAL_BLOCK:
            name = (_stem_output(encoder) if fine_tune_after_block == 0
                    else f"block_group{fine_tune_after_block}")
            boundary = encoder.get_layer(name).output
            # Two views of the same layers (and weights): the frozen front and the trained back.
            self._frozen = keras.Model(encoder.input, boundary, name=f"{encoder.name}_frozen")
            self._tail = keras.Model(boundary, encoder.output, name=f"{encoder.name}_tuned")
        feature_dim = (int(encoder.output.shape[-1]) if not ft_proj_selector
                       else head.dense_layers[ft_proj_selector - 1].units)
        self.logits_layer = keras.layers.Dense(
            num_classes, kernel_initializer=logits_initializer(zero_init_logits_layer),
            name="logits")
        self.logits_layer.build((None, feature_dim))

    @property
    def fine_tuned_layers(self):
        """The parts whose weights train: [tuned part of f] + [head layers] + [logits]."""
        parts = []
        if self.fine_tune_after_block == -1:
            parts.append(self.encoder)
        elif self._tail is not None:
            parts.append(self._tail)
        if self.head is not None:
            j = self.ft_proj_selector
            parts += self.head.dense_layers[:j] + self.head.bn_layers[:j]
        return parts + [self.logits_layer]

    @property
    def trainable_variables(self):
        seen, out = set(), []
        for part in self.fine_tuned_layers:
            for v in part.trainable_variables:
                if id(v) not in seen:
                    seen.add(id(v))
                    out.append(v)
        return out

    def features(self, images, training=False):
        """The classifier's input: h, or g's layer `ft_proj_selector` output."""
        if self.fine_tune_after_block == LINEAR_EVAL_BLOCK:
            h = tf.stop_gradient(self.encoder(images, training=False))
        elif self._frozen is not None:
            x = tf.stop_gradient(self._frozen(images, training=False))
            h = self._tail(x, training=training)
        else:
            h = self.encoder(images, training=training)
        if self.head is None:
            return h
        x = h
        # The first ft_proj_selector layers of g, as ProjectionHead.call runs them (the later
        # layers are not run, so their batch-norm statistics stay as pretraining left them).
        for j in range(self.ft_proj_selector):
            x = self.head.bn_layers[j](self.head.dense_layers[j](x), training=training)
            if j != self.head.num_layers - 1:
                x = tf.nn.relu(x)
        return x

    def __call__(self, images, training=False):
        return tf.cast(self.logits_layer(self.features(images, training)), tf.float32)

    def checkpoint_items(self):
        """Named parts for `tf.train.Checkpoint` (f under "encoder", as pretraining saves it)."""
        items = {"encoder": self.encoder, "classifier": self.logits_layer}
        if self.head is not None:
            items["projection_head"] = self.head
        return items


def build_classifier(config, num_classes, global_bn=False, image_size=-1):
    """The `Classifier` a `RunConfig` describes (call under the strategy's scope).

    image_size: the static input side; -1 = the config's, None = any.
    """
    ft, head_config = config.finetune, config.head
    size = config.data.image_size if image_size == -1 else image_size
    encoder = config.encoder.build(size, global_bn=global_bn)
    head = None
    if ft.ft_proj_selector:
        head = ProjectionHead(
            head_config.proj_head_mode, head_config.num_proj_layers, head_config.proj_out_dim,
            hidden_dim=head_config.proj_head_hidden_dim or None,
            global_bn=global_bn, bn_momentum=config.encoder.batch_norm_decay,
            bn_epsilon=config.encoder.batch_norm_epsilon, name="projection_head")
        head.build((None, config.encoder.output_dim))
    return Classifier(encoder, num_classes, head, ft.ft_proj_selector, ft.fine_tune_after_block,
                      ft.zero_init_logits_layer)


# --------------------------------------------------------------------------------------------
# Where fine-tuning starts.

@dataclasses.dataclass(frozen=True)
class Source:
    """Initial weights: a pretraining checkpoint (with its run's config) or an export version."""
    kind: str  # "checkpoint" or "export"
    path: str
    encoder: config_lib.EncoderConfig
    head: config_lib.HeadConfig | None  # None for an export (it has no projection head)


def resolve_source(checkpoint):
    """Reads what `--checkpoint` names: a run directory (its latest checkpoint), a checkpoint
    prefix inside a run directory, or an exported encoder version directory."""
    path = str(checkpoint)
    if tf.io.gfile.exists(os.path.join(path, "saved_model.pb")):
        meta = export_lib.load_metadata(path)
        return Source("export", path, config_lib.EncoderConfig(**meta["encoder"]), None)
    is_dir = tf.io.gfile.isdir(path)
    model_dir = path if is_dir else os.path.dirname(path)
    if not tf.io.gfile.exists(os.path.join(model_dir, config_lib.CONFIG_FILENAME)):
        raise FinetuneError(
            f"checkpoint {path} is neither a simclr_tf run directory, a checkpoint in one, nor an "
            "exported encoder (no config.json or saved_model.pb)")
    prefix = export_lib.resolve_checkpoint(model_dir, None if is_dir else path)
    run = config_lib.load(model_dir)
    return Source("checkpoint", prefix, run.encoder, run.head)


def with_source_architecture(config, source):
    """`config` with the encoder (and head) of the run it fine-tunes, so no flag must repeat it.

    The global_bn setting stays the one of this run (it is about this run's replicas).
    """
    encoder = dataclasses.replace(source.encoder, global_bn=config.encoder.global_bn)
    head = source.head if source.head is not None else config.head
    if source.head is None and config.finetune.ft_proj_selector:
        raise FinetuneError(f"ft_proj_selector={config.finetune.ft_proj_selector} needs the "
                            f"projection head, but {source.path} is an exported encoder without "
                            "one: fine-tune from the pretraining checkpoint instead")
    return dataclasses.replace(config, encoder=encoder, head=head)


def resolve_selector(config):
    """`config` with a negative ft_proj_selector counted from the head's end; checks the range.

    As the original code indexes [h, layer 1, ..., layer L] in Python, -1 picks the last layer's
    output and -(L + 1) picks h; the resolved layer number is what the run saves.
    """
    layers = head_layers(config.head)
    selector = config.finetune.ft_proj_selector
    if not -(layers + 1) <= selector <= layers:
        raise FinetuneError(
            f"ft_proj_selector={selector} is outside {-(layers + 1)}..{layers} for the {layers} "
            "layers of the projection head (0: h, j: the output of layer j, -1: of the last)")
    if selector >= 0:
        return config
    finetune_config = dataclasses.replace(config.finetune, ft_proj_selector=layers + 1 + selector)
    return dataclasses.replace(config, finetune=finetune_config)


def initialize_from(model, source):
    """Loads f (and the used head layers) of `source` into `model`."""
    if source.kind == "export":
        loaded = export_lib.load_encoder(source.path)
        model.encoder.set_weights(loaded.get_weights())
        return
    export_lib.restore_encoder(model.encoder, source.path)
    if model.head is not None:
        status = tf.train.Checkpoint(projection_head=model.head).read(source.path)
        try:
            status.assert_existing_objects_matched()
        except AssertionError as e:
            raise FinetuneError(f"checkpoint {source.path} does not hold the projection head "
                                f"({str(e).splitlines()[0][:200]})") from None
        status.expect_partial()


# --------------------------------------------------------------------------------------------
# Training.

def accuracy(logits, labels):
    return tf.reduce_mean(tf.cast(
        tf.equal(tf.argmax(logits, 1, output_type=tf.int32), tf.cast(labels, tf.int32)),
        tf.float32))


class Finetuner:
    """The classifier, its optimiser and the supervised replica step, under `strategy`."""

    metrics = METRICS

    def __init__(self, config, strategy, schedule, num_classes):
        self.config = config
        self.strategy = strategy
        self.schedule = schedule
        global_bn = config.encoder.global_bn and strategy.num_replicas_in_sync > 1
        with strategy.scope():
            self.model = build_classifier(config, num_classes, global_bn=global_bn)
            self.optimizer = build_optimizer(config.optimizer, config.train.train_batch_size,
                                             schedule)
            self.optimizer.build(self.model.trainable_variables)
            self.checkpoint = tf.train.Checkpoint(optimizer=self.optimizer,
                                                  **self.model.checkpoint_items())
        self._l2_variables = decayed_in_loss(self.model.trainable_variables,
                                             config.optimizer.optimizer)

    @property
    def step(self):
        return self.optimizer.iterations

    def _regularisation(self):
        return l2_regularisation(self.config.optimizer.weight_decay, self._l2_variables)

    def loss_and_metrics(self, batch):
        """The replica's loss (before regularisation) and metrics; overridden by distillation."""
        logits = self.model(batch[supervised_data.IMAGE], training=True)
        labels = batch[supervised_data.LABEL]
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
        return loss, {"supervised_loss": loss, "train_acc": accuracy(logits, labels)}

    def replica_step(self, batch):
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            loss, metrics = self.loss_and_metrics(batch)
            loss = loss + self._regularisation()
            # tf.distribute sums the replicas' gradients.
            scaled = loss / self.strategy.num_replicas_in_sync
        grads = tape.gradient(scaled, variables)
        self.optimizer.apply_gradients(zip(grads, variables))
        return {"loss": loss, **metrics}

    def make_train_loop(self):
        return compiled_train_loop(self.strategy, self.replica_step, self.metrics, self.optimizer,
                                   self.config.train.jit_compile)


def make_schedule(config, num_examples):
    """Steps of a fine-tuning run: epochs count passes over the labelled examples."""
    return train_schedule(config.train, config.optimizer, num_examples)


def train_classifier(trainer, config, strategy, dataset_fn, initialize=None, on_checkpoint=None,
                     stop_requested=None):
    """The outer loop of fine-tuning and distillation: resume or initialise, train, checkpoint.

    Args:
      trainer: a `Finetuner` (or subclass) built for `config`.
      config: the `RunConfig`.
      strategy: its tf.distribute strategy.
      dataset_fn: per-input-pipeline function(input_context, seed) -> dataset of batches.
      initialize: callable() loading the initial weights; skipped when resuming.
      on_checkpoint: optional callable(trainer, checkpoint_path) after each save.
      stop_requested: optional callable() -> bool polled between loop calls; when true, saves
        and raises `guards.Preempted`.

    Returns:
      The last loop's metrics as Python floats.
    """
    model_dir = config.train.model_dir
    out_dir = distribute.write_dir(model_dir, strategy)
    manager = tf.train.CheckpointManager(trainer.checkpoint, out_dir,
                                         max_to_keep=config.train.keep_checkpoint_max,
                                         step_counter=trainer.step)
    latest = tf.train.latest_checkpoint(model_dir)
    if latest:
        guards.restore_checkpoint(trainer.checkpoint, latest)
        logging.info("Resumed %s from %s", config.train.train_mode, latest)
    elif initialize is not None:
        initialize()
    start = step = int(trainer.step.numpy())
    total = trainer.schedule.total_steps
    dataset = strategy.distribute_datasets_from_function(
        lambda ctx: dataset_fn(ctx, config.train.seed * 1_000_003 + start))
    iterator = iter(dataset)
    train_loop = trainer.make_train_loop()
    writer = tf.summary.create_file_writer(out_dir)
    metrics = {}
    last_saved = start
    logging.info("%s from step %d to %d (%d steps/epoch)", config.train.train_mode, start, total,
                 trainer.schedule.steps_per_epoch)
    should_stop = guards.agreed(strategy, stop_requested)
    while step < total:
        if should_stop():
            saved = (manager.save(checkpoint_number=step) if step != last_saved
                     else tf.train.latest_checkpoint(out_dir))
            raise guards.Preempted(step, total, saved)
        every = config.train.checkpoint_steps
        steps = min(config.train.steps_per_loop, total - step, (step // every + 1) * every - step)
        t0 = time.time()
        out = train_loop(iterator, tf.constant(steps, tf.int32))
        metrics = {k: float(v) for k, v in out.items()}
        step = int(trainer.step.numpy())
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(
                f"loss is {metrics['loss']} at step {step}: stopping without saving; the last "
                f"good checkpoint is {manager.latest_checkpoint}")
        images_per_sec = steps * config.train.train_batch_size / max(time.time() - t0, 1e-9)
        logging.info("step %d/%d  %s  %.1f images/s", step, total,
                     "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()), images_per_sec)
        with writer.as_default(step=step):
            for k, v in metrics.items():
                tf.summary.scalar(f"train/{k}", v)
        if step % config.train.checkpoint_steps == 0 or step >= total:
            path = manager.save(checkpoint_number=step)
            last_saved = step
            if on_checkpoint is not None:
                on_checkpoint(trainer, path)
    if last_saved != step or not manager.latest_checkpoint:
        manager.save(checkpoint_number=step)
    writer.flush()
    if out_dir != model_dir:
        distribute.remove_worker_dir(out_dir, model_dir)
    return metrics


def labelled_subset(config):
    """Indices of the labelled training examples (None = all), from the fraction or id file."""
    ft = config.finetune
    return label_subset.subset_indices(
        config.data.dataset, config.data.train_split, config.data.data_dir,
        fraction=ft.train_label_fraction, id_file=ft.train_label_ids, seed=ft.train_label_seed)


def make_dataset_fn(config, subset, mark_subset=False):
    """function(input_context, seed) -> this pipeline's fine-tuning batches."""
    def dataset_fn(input_context, seed):
        batch = input_context.get_per_replica_batch_size(config.train.train_batch_size)
        return supervised_data.labelled_dataset(
            config.data.dataset, config.data.train_split, batch, config.data.image_size,
            data_dir=config.data.data_dir, input_context=input_context, subset=subset,
            mark_subset=mark_subset, seed=seed, cache=config.data.cache_dataset)
    return dataset_fn


def prepare(config):
    """Resolves `--checkpoint` and returns (config with the source's architecture, source)."""
    source = None
    if config.finetune.checkpoint:
        source = resolve_source(config.finetune.checkpoint)
        config = with_source_architecture(config, source)
    return resolve_selector(config), source


def run_finetuning(config, strategy, source=None, on_checkpoint=None, stop_requested=None):
    """Fine-tunes (or linearly evaluates, fine_tune_after_block=4) as `config` says.

    Args:
      config, source: from `prepare` (the source run's architecture and where it is). Without a
        source the encoder starts from random weights (a supervised baseline).
      strategy: the tf.distribute strategy.
      on_checkpoint, stop_requested: as in `train_classifier`.

    Returns:
      (finetuner, last metrics).
    """
    info = data_lib.dataset_info(config.data.dataset, config.data.train_split,
                                 config.data.data_dir)
    if not info.num_classes:
        raise FinetuneError(f"dataset {config.data.dataset} has no labels to fine-tune on")
    subset = labelled_subset(config)
    num_labelled = info.num_examples if subset is None else len(subset)
    schedule = make_schedule(config, num_labelled)
    trainer = Finetuner(config, strategy, schedule, info.num_classes)
    if source is None:
        logging.warning("No --checkpoint: fine-tuning from random weights (a supervised baseline)")
    logging.info("Fine-tuning on %d labelled examples (%s), fine_tune_after_block=%d, "
                 "ft_proj_selector=%d", num_labelled,
                 f"{100 * num_labelled / info.num_examples:.3g}% of {config.data.train_split}",
                 config.finetune.fine_tune_after_block, config.finetune.ft_proj_selector)
    metrics = train_classifier(
        trainer, config, strategy, make_dataset_fn(config, subset),
        initialize=(lambda: initialize_from(trainer.model, source)) if source else None,
        on_checkpoint=on_checkpoint, stop_requested=stop_requested)
    return trainer, metrics

