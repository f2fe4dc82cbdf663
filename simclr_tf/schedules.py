"""How long a run is and how its learning rate moves: step counts, LR scaling with the batch size,
and SimCLR's linear warm-up + cosine decay."""

import dataclasses
import math

import keras
import tensorflow as tf

LR_SCALINGS = ("linear", "sqrt")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Step counts derived from the config and the dataset size (checkpoint_steps 0: the
    train config's)."""
    total_steps: int
    warmup_steps: int
    steps_per_epoch: int
    checkpoint_steps: int = 0


def make_schedule(train_config, optimizer_config, num_examples):
    """Step counts as the reference code derives them: an epoch is num_examples examples (the
    input pipeline repeats, so batches run across epoch boundaries), total = num_examples *
    epochs // batch + 1 and warm-up = round(warmup_epochs * num_examples // batch).

    Pretraining and distillation count epochs over the training split, fine-tuning over its
    labelled examples: `num_examples` says which.
    """
    batch = train_config.train_batch_size
    steps_per_epoch = max(num_examples // batch, 1)
    total = train_config.train_steps or num_examples * train_config.train_epochs // batch + 1
    warmup = int(round(optimizer_config.warmup_epochs * num_examples // batch))
    checkpoint_steps = (train_config.checkpoint_epochs * steps_per_epoch
                        or train_config.checkpoint_steps)
    return Schedule(total_steps=int(total), warmup_steps=min(warmup, int(total)),
                    steps_per_epoch=steps_per_epoch, checkpoint_steps=checkpoint_steps)


def scaled_learning_rate(base_learning_rate, batch_size, scaling):
    """SimCLR's LR scaling: base * batch / 256 ("linear") or base * sqrt(batch) ("sqrt")."""
    if scaling == "linear":
        return base_learning_rate * batch_size / 256.0
    if scaling == "sqrt":
        return base_learning_rate * math.sqrt(batch_size)
    raise ValueError(f"learning_rate_scaling must be one of {LR_SCALINGS}, got {scaling!r}")


@keras.saving.register_keras_serializable(package="simclr_tf")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to `peak` over `warmup_steps`, then cosine decay to 0 at
    `total_steps`."""

    def __init__(self, peak, warmup_steps, total_steps):
        super().__init__()
        if total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        self.peak = float(peak)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warmup = self.peak * step / max(self.warmup_steps, 1)
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        progress = tf.clip_by_value((step - self.warmup_steps) / decay_steps, 0.0, 1.0)
        cosine = self.peak * 0.5 * (1.0 + tf.cos(math.pi * progress))
        return tf.where(step < self.warmup_steps, warmup, cosine)

    def get_config(self):
        return {"peak": self.peak, "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps}
