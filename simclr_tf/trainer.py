"""What the trainer of every train mode shares: building its models and optimiser under the
strategy, the replica step (loss, the L2 the optimiser leaves to the loss, one update) and the
compiled loop. Each mode's trainer (`pretrain.Pretrainer`, `finetune.Finetuner`,
`distill.Distiller`) writes only its models (`build_models`), its checkpoint items and its loss.
"""

from simclr_tf import loop
from simclr_tf import optim


class Trainer:
    """Builds a mode's models and optimiser under `strategy` and runs its replica steps.

    Subclasses set `metrics` (names the loop reports), `loss_parts` (metric -> short name in the
    progress line) and `verb`, and define `build_models(global_bn)`, `trainable_variables`,
    `checkpoint_items()` and `loss_and_metrics(batch)` (the loss before the L2 term).
    """

    metrics = ()
    loss_parts = {}
    verb = "Training"

    def __init__(self, config, strategy, schedule):
        self.config = config
        self.strategy = strategy
        self.schedule = schedule
        enc = config.encoder
        self.description = f"{self.verb} resnet{enc.resnet_depth}x{enc.width_multiplier}"
        # Synchronised batch norm only pays with several replicas; on one it is the plain kind.
        global_bn = enc.global_bn and strategy.num_replicas_in_sync > 1
        with strategy.scope():
            self.build_models(global_bn)
            self.optimizer = optim.wrap_for_precision(
                optim.build_optimizer(config.optimizer, config.train.train_batch_size, schedule),
                config.train.precision)
            self.optimizer.build(self.trainable_variables)
        self._l2_variables = optim.decayed_in_loss(self.trainable_variables,
                                                   config.optimizer.optimizer)

    def build_models(self, global_bn):
        raise NotImplementedError

    @property
    def trainable_variables(self):
        raise NotImplementedError

    def checkpoint_items(self):
        raise NotImplementedError

    def loss_and_metrics(self, batch):
        """(this replica's loss before the L2 term, {metric: value})."""
        raise NotImplementedError

    @property
    def step(self):
        return self.optimizer.iterations

    def _regularised(self, batch):
        loss, metrics = self.loss_and_metrics(batch)
        return loss + optim.l2_regularisation(self.config.optimizer.weight_decay,
                                              self._l2_variables), metrics

    def replica_step(self, batch):
        """One step on this replica's batch; returns the replica's metrics."""
        loss, metrics = optim.minimize(self.optimizer, self.trainable_variables,
                                       lambda: self._regularised(batch),
                                       self.strategy.num_replicas_in_sync)
        return {"loss": loss, **metrics}

    def make_train_loop(self):
        """A compiled function running `steps` replica steps and returning their mean metrics."""
        return loop.compiled_train_loop(self.strategy, self.replica_step, self.metrics,
                                        self.optimizer, self.config.train.jit_compile)
