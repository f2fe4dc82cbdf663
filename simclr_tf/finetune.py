"""Fine-tuning and linear evaluation: a `Classifier` trained on labels, from pretrained weights.

`Finetuner` owns the classifier (`simclr_tf.classifier`), its optimiser and the supervised replica
step (cross-entropy on the labels); distillation (`simclr_tf.distill`) subclasses it.
`run_finetuning` wires it to a `RunConfig` and runs it through the shared outer loop
(`simclr_tf.loop`): a class-balanced label fraction (or a file of example ids) of the training
split, the paper's fine-tuning augmentation (random crop + flip), and initial weights from a
pretraining run, one of its checkpoints, or an exported encoder (`prepare` adopts that source's
architecture, `initialize_from` loads it).

As in the original code, which restores the whole pretrained model, the classifier starts from
the linear probe trained during pretraining when that probe fits it (a classifier of h with the
same classes), unless `zero_init_logits_layer` starts it at zero; otherwise at N(0, 0.01^2).
"""

import dataclasses

import tensorflow as tf
from absl import logging

from simclr_tf import checkpoints
from simclr_tf import corrupt
from simclr_tf import data as data_lib
from simclr_tf import export as export_lib
from simclr_tf import label_subset
from simclr_tf import loop
from simclr_tf import models
from simclr_tf import supervised_data
from simclr_tf import tasks
from simclr_tf import trainer as trainer_lib
from simclr_tf.classifier import build_classifier

METRICS = ("loss", "supervised_loss", "train_acc", "learning_rate")


class FinetuneError(ValueError):
    """Fine-tuning cannot start; the message is one line naming the flag."""


# --------------------------------------------------------------------------------------------
# Where fine-tuning starts.

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
    layers = config.head.num_layers
    selector = config.finetune.ft_proj_selector
    if not -(layers + 1) <= selector <= layers:
        raise FinetuneError(
            f"ft_proj_selector={selector} is outside {-(layers + 1)}..{layers} for the {layers} "
            "layers of the projection head (0: h, j: the output of layer j, -1: of the last)")
    if selector >= 0:
        return config
    finetune_config = dataclasses.replace(config.finetune, ft_proj_selector=layers + 1 + selector)
    return dataclasses.replace(config, finetune=finetune_config)


def prepare(config):
    """Resolves `--checkpoint` and returns (config with the source's architecture, source)."""
    source = None
    if config.finetune.checkpoint:
        source = checkpoints.resolve_source(config.finetune.checkpoint)
        config = with_source_architecture(config, source)
    return resolve_selector(config), source


def initialize_from(model, source, logits_from_probe=True):
    """Loads f (and the used head layers) of `source` into the `Classifier` `model`, and, unless
    it is zero-initialised or `logits_from_probe` is off, its logits layer from the source's
    linear probe when that fits."""
    if source.kind == "export":
        model.encoder.set_weights(export_lib.load_encoder(source.path).get_weights())
    else:
        checkpoints.restore_encoder(model.encoder, source.path)
        if model.head is not None:
            checkpoints.read_parts(source.path, **{checkpoints.PROJECTION_HEAD: model.head})
    if model.zero_init_logits_layer:
        logging.info("The classifier starts at zero (--zero_init_logits_layer)")
        return
    reason = (_probe_misfit(model, source) if logits_from_probe
              else "logits_from_probe is off (--variable_schema leaves out head_supervised)")
    if reason:
        logging.info("The classifier starts at N(0, 0.01^2): %s", reason)
        return
    probe = models.build_linear_probe(model.num_classes, model.feature_dim)
    checkpoints.read_parts(source.path, **{checkpoints.LINEAR_PROBE: probe})
    model.logits_layer.set_weights(probe.dense.get_weights())
    logging.info("The classifier starts from the linear probe of %s (as the original code; "
                 "--zero_init_logits_layer starts it at zero)", source.path)


def _probe_misfit(model, source):
    """Why the source's linear probe cannot start `model`'s logits layer, or None if it can.

    The original restores the whole pretrained model, its supervised head included, so
    fine-tuning starts from the probe trained during pretraining. That probe was fitted to h
    with the pretraining dataset's classes: it fits a classifier of h with as many classes.
    """
    if source.kind == "export":
        return f"{source.path} is an exported encoder (it has no linear probe)"
    if model.ft_proj_selector:
        return (f"the linear probe of {source.path} was fitted to h, not to the output of head "
                f"layer {model.ft_proj_selector}")
    if not checkpoints.holds(source.path, checkpoints.LINEAR_PROBE):
        return f"{source.path} has no linear probe (pretrained without labels or without one)"
    expected = sorted([(model.num_classes,), (model.feature_dim, model.num_classes)])
    if checkpoints.shapes_of(source.path, checkpoints.LINEAR_PROBE) != expected:
        return (f"the linear probe of {source.path} does not predict this dataset's "
                f"{model.num_classes} classes")
    return None


# --------------------------------------------------------------------------------------------
# Training.

def accuracy(logits, labels):
    return tf.reduce_mean(tf.cast(
        tf.equal(tf.argmax(logits, 1, output_type=tf.int32), tf.cast(labels, tf.int32)),
        tf.float32))


class Finetuner(trainer_lib.Trainer):
    """The classifier, its optimiser and the supervised replica step, under `strategy`."""

    metrics = METRICS
    loss_parts = {"supervised_loss": "supervised"}
    verb = "Fine-tuning"

    def __init__(self, config, strategy, schedule, num_classes):
        self.num_classes = num_classes
        super().__init__(config, strategy, schedule)

    def build_models(self, global_bn):
        self.model = build_classifier(self.config, self.num_classes, global_bn=global_bn)

    @property
    def trainable_variables(self):
        return self.model.trainable_variables

    def checkpoint_items(self):
        return {checkpoints.OPTIMIZER: self.optimizer, **self.model.checkpoint_items()}

    def loss_and_metrics(self, batch):
        """The replica's loss (before regularisation) and metrics; overridden by distillation."""
        logits = self.model(batch[supervised_data.IMAGE], training=True)
        labels = batch[supervised_data.LABEL]
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
        return loss, {"supervised_loss": loss, "train_acc": accuracy(logits, labels)}


def training_examples(config):
    """Indices of the examples training reads at all (`--train_examples`), None = the split."""
    data = config.data
    return data_lib.training_subset(data.dataset, data.train_split, data.data_dir,
                                    data.train_examples, data.train_examples_seed)


def labelled_subset(config):
    """Indices of the labelled training examples (None = all), from the fraction or id file,
    taken within `--train_examples` when that is set."""
    ft = config.finetune
    return label_subset.subset_indices(
        config.data.dataset, config.data.train_split, config.data.data_dir,
        fraction=ft.train_label_fraction, id_file=ft.train_label_ids, seed=ft.train_label_seed,
        within=training_examples(config))


def make_dataset_fn(config, subset, mark_subset=False):
    """function(input_context, seed) -> this pipeline's fine-tuning batches."""
    examples = training_examples(config)
    corruption = corrupt.corruption_fn(config.data.corrupt)

    def dataset_fn(input_context, seed):
        batch = input_context.get_per_replica_batch_size(config.train.train_batch_size)
        return supervised_data.labelled_dataset(
            config.data.dataset, config.data.train_split, batch, config.data.image_size,
            data_dir=config.data.data_dir, input_context=input_context, subset=subset,
            mark_subset=mark_subset, seed=seed, cache=config.data.cache_dataset,
            examples=examples, corruption=corruption)
    return dataset_fn


def run_finetuning(config, strategy, source=None, on_checkpoint=None, stop_requested=None):
    """Fine-tunes (or linearly evaluates, fine_tune_after_block=4) as `config` says.

    Args:
      config, source: from `prepare` (the source run's architecture and where it is). Without a
        source the encoder starts from random weights (a supervised baseline).
      strategy: the tf.distribute strategy.
      on_checkpoint, stop_requested: as in `loop.run`.

    Returns:
      (finetuner, last metrics).
    """
    info = data_lib.dataset_info(config.data.dataset, config.data.train_split,
                                 config.data.data_dir)
    if not info.num_classes:
        raise FinetuneError(f"dataset {config.data.dataset} has no labels to fine-tune on")
    subset = labelled_subset(config)
    schedule = tasks.TASKS["finetune"].schedule(config, subset)
    trainer = Finetuner(config, strategy, schedule, info.num_classes)
    if source is None:
        logging.warning("No --checkpoint: fine-tuning from random weights (a supervised baseline)")
    num_labelled = tasks.TASKS["finetune"].epoch_examples(config, subset)
    logging.info("Fine-tuning on %d labelled examples (%s), fine_tune_after_block=%d, "
                 "ft_proj_selector=%d", num_labelled,
                 f"{100 * num_labelled / info.num_examples:.3g}% of {config.data.train_split}",
                 config.finetune.fine_tune_after_block, config.finetune.ft_proj_selector)
    return train_classifier(trainer, config, strategy, make_dataset_fn(config, subset), source,
                            on_checkpoint, stop_requested)


def train_classifier(trainer, config, strategy, dataset_fn, source, on_checkpoint=None,
                     stop_requested=None):
    """Runs a classifier's trainer (fine-tuning or a distillation student) through the shared
    loop, its weights first taken from `source` unless the run resumes; returns (trainer, last
    metrics)."""
    metrics = loop.run(
        trainer, config, strategy, dataset_fn,
        initialize=(lambda: initialize_from(trainer.model, source,
                                            config.finetune.logits_from_probe))
        if source else None,
        on_checkpoint=on_checkpoint, stop_requested=stop_requested)
    return trainer, metrics
