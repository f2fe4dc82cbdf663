"""Learning-rate scaling with the batch size, and SimCLR's warm-up + cosine schedule."""

import math

import keras
import tensorflow as tf

LR_SCALINGS = ("linear", "sqrt")


def scaled_learning_rate(base_learning_rate, batch_size, scaling):
    """SimCLR's LR scaling: base * batch / 256 ("linear") or base * sqrt(batch) ("sqrt")."""
    if scaling == "linear":
        return base_learning_rate * batch_size / 256.0
    if scaling == "sqrt":
        return base_learning_rate * math.sqrt(batch_size)
    raise ValueError(f"learning_rate_scaling must be one of {LR_SCALINGS}, got {scaling!r}")


class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to `peak` over `warmup_steps`, then cosine decay to 0 at `total_steps`."""

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
