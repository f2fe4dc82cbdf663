"""The optimiser of every train mode: which one, its learning-rate schedule, and who decays what.

As in the original code: LARS adapts and decays the weights of f and g itself (not batch norm's,
nor biases), but leaves the supervised heads (the linear probe and the fine-tuning classifier,
both Dense layers named "logits") to plain momentum with their kernel's L2 in the loss; with
another optimiser the loss carries the L2 of every weight but batch norm's, biases included.
"""

import re

import keras
import tensorflow as tf

from simclr_tf.lars import LARS, is_bn_or_bias
from simclr_tf.schedules import WarmupCosine, scaled_learning_rate

# The supervised heads' Dense layers. A LARS trust ratio would shrink a linear classifier's steps
# to ~eta of its norm, so, as the original's `head_supervised`, LARS neither adapts nor decays them.
SUPERVISED_HEAD = r"(^|/)logits/"


def is_supervised_head(variable):
    return re.search(SUPERVISED_HEAD, variable.path) is not None


def build_optimizer(optimizer_config, batch_size, schedule):
    """The optimiser and its learning-rate schedule (peak LR scaled with the batch size).

    Args:
      optimizer_config: a `config.OptimizerConfig`.
      batch_size: the global batch size.
      schedule: the run's `schedules.Schedule` (warm-up and total steps).
    """
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


def is_batch_norm(variable):
    """gamma or beta of a `batchnorm.BatchNorm` (the names it gives its weights)."""
    return variable.path.rsplit("/", 1)[-1] in ("gamma", "beta")


def decayed_in_loss(variables, optimizer_name):
    """The variables whose L2 the loss carries, as the original's `add_weight_decay`.

    With LARS, which decays the other weights itself, the supervised heads' kernels. With another
    optimiser, every weight but batch norm's: biases too (the linear probe's and classifier's,
    the squeeze-and-excitation convolutions').
    """
    if optimizer_name == "lars":
        return [v for v in variables if is_supervised_head(v) and not is_bn_or_bias(v)]
    return [v for v in variables if not is_batch_norm(v)]


def l2_regularisation(weight_decay, variables):
    """weight_decay * sum of ||v||^2 / 2 (0.0 when there is nothing to decay)."""
    if not weight_decay or not variables:
        return 0.0
    return weight_decay * tf.add_n([tf.nn.l2_loss(v) for v in variables])


def wrap_for_precision(optimizer, precision):
    """float16 needs loss scaling (its gradients underflow); bfloat16 and float32 do not."""
    if precision == "float16":
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def minimize(optimizer, variables, compute_loss, num_replicas):
    """One gradient step on this replica's batch.

    Args:
      optimizer: the run's optimiser (a `LossScaleOptimizer` under float16).
      variables: the variables to train.
      compute_loss: callable() -> (loss, metrics), run under the gradient tape.
      num_replicas: replicas in sync; tf.distribute sums their gradients, so each replica's loss
        is divided by their number.

    Returns:
      (loss, metrics) of `compute_loss`.
    """
    with tf.GradientTape() as tape:
        loss, metrics = compute_loss()
        scaled = loss / num_replicas
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            scaled = optimizer.scale_loss(scaled)
    grads = tape.gradient(scaled, variables)
    optimizer.apply_gradients(zip(grads, variables))
    return loss, metrics
