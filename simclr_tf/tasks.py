"""One task per train mode (`--train_mode`): what its epoch counts, its schedule, how it starts and
trains, and what its checkpoints are evaluated as.

Whoever needs a step count or a choice that depends on the train mode asks `task_for(config)`: the
CLI (which run to start, the summary's epochs), `watch` (the last step a `--mode=eval` watcher
waits for), `evaluate` (frozen f or a classifier), `summary`, and the modes' own runs for their
schedules. So a run and the watcher of its checkpoints always agree on where it ends.

* pretrain: SimCLR on the training split (or its `--train_examples`); its checkpoints hold f,
  evaluated frozen (probe, kNN, linear evaluation); f is exported.
* finetune: a classifier trained on the labelled examples (`--train_label_fraction` or
  `--train_label_ids`, within `--train_examples`), so its epochs count labelled examples; it starts
  from `--checkpoint`; its checkpoints are evaluated as a classifier.
* distill: a student classifier trained on the teacher's labels of the whole training split (or
  its `--train_examples`); evaluated as a classifier.
"""

import dataclasses

from absl import logging

from simclr_tf import data as data_lib
from simclr_tf.schedules import make_schedule


@dataclasses.dataclass(frozen=True)
class Task:
    mode: str  # the --train_mode value
    title: str  # what the summary calls it
    evaluates_frozen_f: bool  # else: a classifier's top-1 / top-5
    exports_f: bool

    def epoch_examples(self, config):
        """Examples one epoch of this mode passes over."""
        return config.data.train_examples or split_size(config)

    def schedule(self, config):
        """The run's `schedules.Schedule` (total and warm-up steps, checkpoint interval)."""
        return make_schedule(config.train, config.optimizer, self.epoch_examples(config))

    def total_steps(self, config):
        """The run's last step: where it stops and where watching its checkpoints ends."""
        return self.schedule(config).total_steps

    def prepare(self, config):
        """(config, source): the config to train with and where its initial weights come from."""
        return config, None

    def train(self, config, strategy, source, stop_requested):
        """Runs the training; returns (trainer, last metrics)."""
        raise NotImplementedError


def split_size(config):
    return data_lib.dataset_info(config.data.dataset, config.data.train_split,
                                 config.data.data_dir).num_examples


class Pretraining(Task):
    def train(self, config, strategy, source, stop_requested):
        from simclr_tf import distribute, knn_monitor, pretrain
        monitor = None
        if config.eval.eval_every and distribute.is_chief(strategy):
            info = data_lib.dataset_info(config.data.dataset, config.data.eval_split,
                                         config.data.data_dir)
            if info.num_classes:
                monitor = knn_monitor.KnnMonitor(config, info.num_classes)
            else:
                logging.warning("eval_every: %s has no labels: no kNN monitor",
                                config.data.eval_split)
        return pretrain.run_pretraining(config, strategy, stop_requested=stop_requested,
                                        on_loop_end=monitor)


class FineTuning(Task):
    def epoch_examples(self, config, subset=None):
        """The labelled examples: `subset` (`finetune.labelled_subset(config)`, worked out here
        unless given), or the whole split when that is None."""
        if subset is None:
            from simclr_tf import finetune
            subset = finetune.labelled_subset(config)
        return split_size(config) if subset is None else len(subset)

    def schedule(self, config, subset=None):
        return make_schedule(config.train, config.optimizer, self.epoch_examples(config, subset))

    def prepare(self, config):
        from simclr_tf import finetune
        return finetune.prepare(config)

    def train(self, config, strategy, source, stop_requested):
        from simclr_tf import finetune
        return finetune.run_finetuning(config, strategy, source, stop_requested=stop_requested)


class Distillation(Task):
    def prepare(self, config):
        from simclr_tf import finetune
        return finetune.prepare(config)

    def train(self, config, strategy, source, stop_requested):
        from simclr_tf import distill
        return distill.run_distillation(config, strategy, source, stop_requested=stop_requested)


TASKS = {
    "pretrain": Pretraining("pretrain", "SimCLR pretraining", evaluates_frozen_f=True,
                            exports_f=True),
    "finetune": FineTuning("finetune", "Fine-tuning", evaluates_frozen_f=False, exports_f=False),
    "distill": Distillation("distill", "Distillation", evaluates_frozen_f=False, exports_f=False),
}


def task_for(config):
    """The `Task` of `config.train.train_mode`."""
    return TASKS[config.train.train_mode]
