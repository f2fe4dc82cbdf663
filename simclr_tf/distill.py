"""SimCLRv2 distillation: a fine-tuned teacher labels the training images for a student.

SimCLRv2 (Chen et al. 2020b, eq. 2 and 3): the student minimises

    L = (1 - w) * L_distill + w * L_labels,
    L_distill = -mean_x sum_y P_T(y | x; tau) log P_S(y | x; tau),

where P(y | x; tau) = softmax(logits / tau), the teacher's logits are fixed (it runs in inference
mode, no gradient reaches it), x ranges over the whole training split (labels unused: it is the
unlabelled data) and L_labels is the cross-entropy on the examples of the label subset in the
batch (w = `distill_label_weight`, 0 = pure distillation as in the paper's main results). The
student can have the teacher's architecture (self-distillation) or a smaller one (big-to-small);
it starts from random weights, or from a pretraining checkpoint of its own architecture.
"""

import dataclasses
import os

import tensorflow as tf
from absl import logging

from simclr_tf import checkpoints
from simclr_tf import config as config_lib
from simclr_tf import data as data_lib
from simclr_tf import finetune
from simclr_tf import supervised_data
from simclr_tf import tasks
from simclr_tf.classifier import build_classifier

METRICS = ("loss", "distill_loss", "label_loss", "train_acc", "teacher_agreement",
           "learning_rate")


def distillation_loss(student_logits, teacher_logits, temperature=1.0):
    """-mean_x sum_y softmax(teacher / tau) * log_softmax(student / tau); no gradient to teacher.

    Args:
      student_logits, teacher_logits: [B, C].
      temperature: tau (> 0).

    Returns:
      Scalar float32.
    """
    if temperature <= 0:
        raise ValueError(f"distill_temperature must be positive, got {temperature}")
    teacher_probs = tf.nn.softmax(tf.stop_gradient(tf.cast(teacher_logits, tf.float32))
                                  / temperature)
    log_student = tf.nn.log_softmax(tf.cast(student_logits, tf.float32) / temperature)
    return -tf.reduce_mean(tf.reduce_sum(teacher_probs * log_student, axis=-1))


def masked_cross_entropy(logits, labels, mask):
    """Mean cross-entropy over the rows with mask 1 (0 if there are none)."""
    losses = tf.nn.sparse_softmax_cross_entropy_with_logits(tf.cast(labels, tf.int32), logits)
    mask = tf.cast(mask, tf.float32)
    return tf.math.divide_no_nan(tf.reduce_sum(losses * mask), tf.reduce_sum(mask))


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A fine-tuned run: its config (architecture, head selection) and checkpoint."""
    config: config_lib.RunConfig
    checkpoint: str


def resolve_teacher(teacher):
    """`--teacher`: a fine-tuning run directory (its latest checkpoint) or a checkpoint in one."""
    path = str(teacher)
    is_dir = tf.io.gfile.isdir(path)
    model_dir = path if is_dir else os.path.dirname(path)
    run = config_lib.load(model_dir)
    if tasks.task_for(run).evaluates_frozen_f:  # a teacher is a classifier
        raise finetune.FinetuneError(
            f"teacher {path} is a {run.train.train_mode} run: distil from a fine-tuned run "
            "(--train_mode=finetune)")
    return Teacher(run, checkpoints.resolve(model_dir, None if is_dir else path))


class Distiller(finetune.Finetuner):
    """The student (a `Classifier`), its optimiser and the distillation step; the teacher is
    restored once, frozen, and runs in inference mode on the student's augmented images."""

    metrics = METRICS
    loss_parts = {"distill_loss": "distill", "label_loss": "label"}
    verb = "Distilling into"

    def __init__(self, config, strategy, schedule, num_classes, teacher):
        classes = checkpoints.classes_of(teacher.checkpoint, checkpoints.CLASSIFIER)
        if classes and classes != num_classes:
            raise finetune.FinetuneError(
                f"teacher {teacher.checkpoint} predicts {classes} classes but "
                f"{config.data.dataset} has {num_classes}: distil on the teacher's dataset")
        super().__init__(config, strategy, schedule, num_classes)
        with strategy.scope():
            # Any input size: the teacher may have been fine-tuned at another image_size.
            self.teacher = build_classifier(teacher.config, num_classes, image_size=None)
        # The teacher's optimiser slots are not needed.
        checkpoints.read_parts(teacher.checkpoint, **self.teacher.checkpoint_items())

    def loss_and_metrics(self, batch):
        images = batch[supervised_data.IMAGE]
        teacher_logits = tf.stop_gradient(self.teacher(images, training=False))
        logits = self.model(images, training=True)
        d = self.config.distill
        distill = distillation_loss(logits, teacher_logits, d.distill_temperature)
        labels = batch[supervised_data.LABEL]
        label_loss = masked_cross_entropy(logits, labels, batch[supervised_data.LABELLED])
        loss = (1.0 - d.distill_label_weight) * distill
        if d.distill_label_weight:
            loss += d.distill_label_weight * label_loss
        agreement = tf.reduce_mean(tf.cast(tf.equal(
            tf.argmax(logits, 1), tf.argmax(teacher_logits, 1)), tf.float32))
        return loss, {"distill_loss": distill, "label_loss": label_loss,
                      "train_acc": finetune.accuracy(logits, labels),
                      "teacher_agreement": agreement}


def run_distillation(config, strategy, source=None, on_checkpoint=None, stop_requested=None):
    """Distils `config.distill.teacher` into the student `config` describes.

    Args:
      config, source: from `finetune.prepare` (the student's architecture: the flags, or the
        pretraining run `--checkpoint` names, which also gives its initial weights).
      strategy: the tf.distribute strategy.
      on_checkpoint, stop_requested: as in `loop.run`.

    Returns:
      (distiller, last metrics).
    """
    teacher = resolve_teacher(config.distill.teacher)
    info = data_lib.dataset_info(config.data.dataset, config.data.train_split,
                                 config.data.data_dir)
    if not info.num_classes:
        raise finetune.FinetuneError(f"dataset {config.data.dataset} has no classes to distil")
    subset = finetune.labelled_subset(config) if config.distill.distill_label_weight else None
    schedule = tasks.task_for(config).schedule(config)
    trainer = Distiller(config, strategy, schedule, info.num_classes, teacher)
    logging.info("Distilling %s (resnet%d x%d) into resnet%d x%d, temperature %g, label weight %g",
                 teacher.checkpoint, teacher.config.encoder.resnet_depth,
                 teacher.config.encoder.width_multiplier, config.encoder.resnet_depth,
                 config.encoder.width_multiplier, config.distill.distill_temperature,
                 config.distill.distill_label_weight)
    return finetune.train_classifier(
        trainer, config, strategy, finetune.make_dataset_fn(config, subset, mark_subset=True),
        source, on_checkpoint, stop_requested)
