"""One task per train mode: every mode is registered, and each counts its epochs over what it
trains on (hand-computed step counts on a 16-image folder, 8 per class)."""

import dataclasses

import pytest

from simclr_tf import config as cfg
from simclr_tf import tasks


def test_every_train_mode_has_a_task():
    assert set(tasks.TASKS) == set(cfg.TRAIN_MODES)
    assert all(task.mode == mode for mode, task in tasks.TASKS.items())
    assert [mode for mode, task in tasks.TASKS.items() if task.evaluates_frozen_f] == ["pretrain"]


@pytest.mark.parametrize("mode, train_examples, fraction, epoch, last_step", [
    ("pretrain", 0, 1.0, 16, 16 * 2 // 4 + 1),
    ("pretrain", 8, 1.0, 8, 8 * 2 // 4 + 1),  # --train_examples: epochs over those 8
    ("distill", 0, 1.0, 16, 9),  # the teacher labels the whole split
    ("distill", 6, 0.5, 6, 6 * 2 // 4 + 1),  # labels or not, epochs count its training images
    ("finetune", 0, 1.0, 16, 9),
    ("finetune", 0, 0.5, 8, 8 * 2 // 4 + 1),  # epochs count the labelled examples
    ("finetune", 8, 1.0, 8, 5),  # all the labels within --train_examples
])
def test_each_mode_counts_its_epochs_over_what_it_trains_on(tmp_path, image_folder, mode,
                                                           train_examples, fraction, epoch,
                                                           last_step):
    dataset = image_folder(tmp_path / "images", per_class=8, size=8)
    config = cfg.RunConfig(
        data=cfg.DataConfig(dataset=dataset, image_size=8, train_examples=train_examples),
        train=cfg.TrainConfig(train_mode=mode, train_batch_size=4, train_epochs=2),
        finetune=cfg.FinetuneConfig(train_label_fraction=fraction))
    task = tasks.task_for(config)
    assert task.epoch_examples(config) == epoch
    assert task.total_steps(config) == last_step
    assert task.schedule(config).steps_per_epoch == epoch // 4
    steps = dataclasses.replace(config, train=dataclasses.replace(config.train, train_steps=7))
    assert task.total_steps(steps) == 7
