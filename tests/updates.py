"""What a training step changed, variable by variable, and how far two such updates are apart.

The fidelity tests compare *updates* (weights after a step minus before), not weights: a step
moves a kernel by ~1e-3 of its size under LARS, so weights agree within any loose tolerance
whether or not the step was right. The relative difference ||du - dv|| / ||du|| is taken for each
variable whose reference update is not zero, and the worst of each group is reported, since a
group's total is dominated by its largest updates (the linear probe's kernel among the kernels)
and would hide a wrong update of a small one.

`pretrain_step` runs one pretraining step from given weights on a batch split over any strategy's
replicas and returns every variable's update; `update_tolerances` derives each group's tolerance
from the noise floor measured in the same process.
"""

import numpy as np
import tensorflow as tf

from simclr_tf import pretrain
from simclr_tf.schedules import Schedule

GROUPS = ("kernel", "bn", "bn_statistics", "bias")


def group_of(path):
    """The group of a variable, from its path: kernel (convolutions and dense layers), bn (batch
    norm's gamma and beta), bn_statistics (moving mean and variance) or bias."""
    name = path.rsplit("/", 1)[-1]
    if name in ("moving_mean", "moving_variance"):
        return "bn_statistics"
    if name in ("gamma", "beta"):
        return "bn"
    if name == "bias":
        return "bias"
    return "kernel"


def values(models):
    """{path: float64 copy} of every variable of `models` (Keras layers or models)."""
    return {v.path: np.array(v.numpy(), np.float64) for m in models for v in m.variables}


def updates(before, after):
    """{path: after - before} of two `values` snapshots of the same variables."""
    assert before.keys() == after.keys()
    return {path: after[path] - before[path] for path in before}


def worst_relative_differences(reference, other):
    """{group: max over its variables of ||other - reference|| / ||reference||}, over the
    variables whose reference update is not zero (every group must have one)."""
    assert reference.keys() == other.keys()
    worst = {}
    for path, ref in reference.items():
        size = np.linalg.norm(ref)
        if size > 0:
            group = group_of(path)
            worst[group] = max(worst.get(group, 0.0), np.linalg.norm(other[path] - ref) / size)
    return worst


# --------------------------------------------------------------------------------------------
# One pretraining step, and the tolerances of its update.

def pretrain_step(strategy, weights, batch, config, max_calls=1):
    """One replica step of a Pretrainer given `weights` on `batch`, split over the replicas;
    returns (metrics, trainer, {path: the step's update of each variable}).

    Under float16 a call whose scaled gradients overflow is skipped (the loss scale halves and
    only the batch-norm statistics move): with `max_calls` > 1 the step is called again until one
    applies, and metrics["calls"] says how many it took."""
    schedule = Schedule(total_steps=10, warmup_steps=0, steps_per_epoch=10)
    trainer = pretrain.Pretrainer(config, strategy, schedule, num_classes=10)
    parts = (trainer.encoder, trainer.head, trainer.probe)
    for part, part_weights in zip(parts, weights):
        part.set_weights(part_weights)
    before = values(parts)
    n = strategy.num_replicas_in_sync
    per = len(batch["label"]) // n

    def replica_fn():
        i = tf.distribute.get_replica_context().replica_id_in_sync_group
        local = {k: tf.constant(v)[i * per:(i + 1) * per] for k, v in batch.items()}
        return trainer.replica_step(local)

    @tf.function
    def step():
        out = strategy.run(replica_fn)
        return {k: strategy.reduce("MEAN", v, axis=None) for k, v in out.items()}

    calls = 0
    while calls < max_calls:
        metrics = step()
        calls += 1
        if int(trainer.step.numpy()) >= 1:
            break
    metrics = {k: float(v) for k, v in metrics.items()}
    metrics["calls"] = calls
    return metrics, trainer, updates(before, values(parts))


# The noise floor of a step's update: the same batch in another order on one replica (the same
# math, summed in another order). Measured on a 2-core EPYC, per group, the worst variable's
# relative difference: kernels 1.4e-4, batch norm 2.4e-5, its statistics 4.9e-7, the probe's
# bias 1e-7; one against two replicas differed by 2.8e-4, 7.4e-5, 2.3e-6 and 9e-8. The tests
# allow FLOOR_MULTIPLE times the floor measured in the same run, and never less than
# FLOOR_MULTIPLE times these (a machine whose orders happen to agree bit for bit).
FLOOR_HERE = {"kernel": 1.4e-4, "bn": 2.4e-5, "bn_statistics": 4.9e-7, "bias": 1e-7}
FLOOR_MULTIPLE = 10
PERMUTATION = np.array([3, 1, 7, 0, 5, 2, 6, 4])  # of a batch of 8 (conftest's views_batch)


def update_tolerances(config, weights, batch):
    """{group: tolerance} from the floor: one replica's update against the same batch permuted."""
    _, _, reference = pretrain_step(tf.distribute.get_strategy(), weights, batch, config)
    permuted = {k: v[PERMUTATION] for k, v in batch.items()}
    _, _, shuffled = pretrain_step(tf.distribute.get_strategy(), weights, permuted, config)
    floor = worst_relative_differences(reference, shuffled)
    return reference, {g: FLOOR_MULTIPLE * max(floor[g], FLOOR_HERE[g]) for g in FLOOR_HERE}
