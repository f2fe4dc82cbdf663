"""LARS (You et al. 2017) as SimCLR uses it, as a Keras 3 optimiser that works under tf.distribute.

For each variable w with gradient g (weight decay is coupled: added to the gradient first):
    g <- g + weight_decay * w                               (unless excluded from weight decay)
    trust = eta * ||w|| / ||g||  (1 if either norm is 0)     (1 if excluded from layer adaptation)
    v <- momentum * v + lr * trust * g
    w <- w - v                   (Nesterov: w <- w - (momentum * v + lr * trust * g))
BN parameters and biases (every variable of rank <= 1) are excluded from both weight decay and layer
adaptation, as in the paper; more can be excluded by name.
"""

import re

import keras
import tensorflow as tf


def is_bn_or_bias(variable):
    """BN gamma/beta and biases: the variables LARS neither decays nor adapts."""
    return len(variable.shape) <= 1


@keras.saving.register_keras_serializable(package="simclr_tf")
class LARS(keras.optimizers.Optimizer):
    """Layer-wise Adaptive Rate Scaling with momentum.

    Args:
      learning_rate: float or `keras.optimizers.schedules.LearningRateSchedule`.
      momentum: momentum coefficient (0.9).
      weight_decay: coupled L2 weight decay (SimCLR: 1e-6).
      eta: trust coefficient (0.001).
      nesterov: use Nesterov momentum.
      exclude_names: regexes; variables whose path matches are excluded from weight decay and
        layer adaptation, in addition to every variable of rank <= 1.
    """

    def __init__(self, learning_rate=0.1, momentum=0.9, weight_decay=0.0, eta=0.001,
                 nesterov=False, exclude_names=(), name="lars", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.momentum = momentum
        self.lars_weight_decay = weight_decay
        self.eta = eta
        self.nesterov = nesterov
        self.exclude_names = tuple(exclude_names)
        self._excluded = []

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        pattern = re.compile("|".join(self.exclude_names)) if self.exclude_names else None
        self._excluded = [
            is_bn_or_bias(v) or bool(pattern and pattern.search(v.path)) for v in variables]
        self.velocities = self.add_optimizer_variables(variables, "velocity")

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        excluded = self._excluded[index]
        velocity = self.velocities[index]
        w = tf.convert_to_tensor(variable)
        g = tf.cast(gradient, w.dtype)
        lr = tf.cast(learning_rate, w.dtype)
        if not excluded:
            if self.lars_weight_decay:
                g = g + self.lars_weight_decay * w
            w_norm = tf.norm(w)
            g_norm = tf.norm(g)
            trust = tf.where(w_norm > 0, tf.where(g_norm > 0, self.eta * w_norm / g_norm, 1.0), 1.0)
            lr = lr * trust
        new_velocity = self.momentum * velocity + lr * g
        self.assign(velocity, new_velocity)
        update = self.momentum * new_velocity + lr * g if self.nesterov else new_velocity
        self.assign_sub(variable, update)

    def get_config(self):
        config = super().get_config()
        config.update(momentum=self.momentum, weight_decay=self.lars_weight_decay, eta=self.eta,
                      nesterov=self.nesterov, exclude_names=list(self.exclude_names))
        return config
