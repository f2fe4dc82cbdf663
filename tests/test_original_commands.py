"""The original code's commands (google-research/simclr, its README) run here as written.

The CIFAR-10 pretraining and linear-evaluation commands run for real, with Fashion-MNIST for the
dataset they name (this machine cannot download CIFAR-10) and a few steps. The ImageNet commands
need a TPU: they are parsed, and what their flags mean here is checked.
"""

import json
import shlex

import pytest

from simclr_tf import config as cfg

# As the original README writes them (its variables kept).
CIFAR10_PRETRAIN = r"""python run.py --train_mode=pretrain \
  --train_batch_size=512 --train_epochs=1000 \
  --learning_rate=1.0 --weight_decay=1e-4 --temperature=0.5 \
  --dataset=cifar10 --image_size=32 --eval_split=test --resnet_depth=18 \
  --use_blur=False --color_jitter_strength=0.5 \
  --model_dir=/tmp/simclr_test --use_tpu=False"""
CIFAR10_LINEAR_EVAL = r"""python run.py --mode=train_then_eval --train_mode=finetune \
  --fine_tune_after_block=4 --zero_init_logits_layer=True \
  --variable_schema='(?!global_step|(?:.*/|^)Momentum|head)' \
  --global_bn=False --optimizer=momentum --learning_rate=0.1 --weight_decay=0.0 \
  --train_epochs=100 --train_batch_size=512 --warmup_epochs=0 \
  --dataset=cifar10 --image_size=32 --eval_split=test --resnet_depth=18 \
  --checkpoint=/tmp/simclr_test --model_dir=/tmp/simclr_test_ft --use_tpu=False"""
IMAGENET_PRETRAIN = r"""python run.py --train_mode=pretrain \
  --train_batch_size=4096 --train_epochs=100 --temperature=0.1 \
  --learning_rate=0.075 --learning_rate_scaling=sqrt --weight_decay=1e-4 \
  --dataset=imagenet2012 --image_size=224 --eval_split=validation \
  --data_dir=$DATA_DIR --model_dir=$MODEL_DIR \
  --use_tpu=True --tpu_name=$TPU_NAME --train_summary_steps=0"""
IMAGENET_FINETUNE_1PCT = r"""python run.py --mode=train_then_eval --train_mode=finetune \
  --fine_tune_after_block=-1 --zero_init_logits_layer=True \
  --variable_schema='(?!global_step|(?:.*/|^)Momentum|head_supervised)' \
  --global_bn=True --optimizer=lars --learning_rate=0.005 \
  --learning_rate_scaling=sqrt --weight_decay=0 \
  --train_epochs=60 --train_batch_size=1024 --warmup_epochs=0 \
  --dataset=imagenet2012_subset/1pct --image_size=224 --eval_split=validation \
  --data_dir=$DATA_DIR --model_dir=$MODEL_DIR --checkpoint=$CHKPT_DIR \
  --use_tpu=True --tpu_name=$TPU_NAME --train_summary_steps=0 \
  --num_proj_layers=3 --ft_proj_selector=1"""
VARIABLES = {"$DATA_DIR": "gs://bucket/data", "$MODEL_DIR": "gs://bucket/model",
             "$TPU_NAME": "my-tpu", "$CHKPT_DIR": "gs://bucket/pretrained"}


def _flags(command, **replace):
    """The command's flags (after `python run.py`), with `replace` = {old text: new text} applied
    before the shell variables are given their test values."""
    for old, new in [*replace.items(), *VARIABLES.items()]:
        command = command.replace(old, new)
    words = shlex.split(command.replace("\\\n", " "))
    assert words[:2] == ["python", "run.py"]
    return words[2:]


def test_the_imagenet_commands_mean_what_they_meant(parsed_flags):
    from simclr_tf import run

    config = parsed_flags(_flags(IMAGENET_PRETRAIN))
    assert run.strategy_from_flags() == ("tpu", "my-tpu")
    assert (config.data.dataset, config.data.image_size, config.data.eval_split) == (
        "imagenet2012", 224, "validation")
    assert (config.train.train_batch_size, config.optimizer.learning_rate_scaling,
            config.loss.temperature) == (4096, "sqrt", 0.1)

    config = parsed_flags(_flags(IMAGENET_FINETUNE_1PCT))
    assert run.strategy_from_flags() == ("tpu", "my-tpu")
    assert config.finetune.checkpoint == "gs://bucket/pretrained"
    assert (config.finetune.ft_proj_selector, config.head.num_proj_layers) == (1, 3)
    # The schema leaves out head_supervised: the classifier does not start from the probe.
    assert not config.finetune.logits_from_probe and config.finetune.zero_init_logits_layer
    cfg.validate(config, 8, "tpu")

    parsed_flags(["--use_tpu=False"])
    assert run.strategy_from_flags() == ("mirrored", None)
    parsed_flags(["--use_tpu", "--master=grpc://10.0.0.2:8470"])
    assert run.strategy_from_flags() == ("tpu", "grpc://10.0.0.2:8470")
    parsed_flags(["--use_tpu", "--strategy=mirrored"])
    with pytest.raises(cfg.ConfigError, match="--use_tpu=True means --strategy=tpu"):
        run.strategy_from_flags()


def test_the_original_flags_without_a_setting_of_their_own_map_onto_this_clis(parsed_flags):
    config = parsed_flags(["--keep_hub_module_max=0", "--checkpoint_epochs=2",
                           "--checkpoint_steps=0", "--eval_steps=3"])
    assert config.train.keep_export_max == 0 and config.train.checkpoint_epochs == 2
    assert config.eval.eval_steps == 3
    cfg.validate(config)
    from simclr_tf.schedules import make_schedule
    schedule = make_schedule(config.train, config.optimizer, 60_000)
    assert schedule.checkpoint_steps == 2 * (60_000 // 512)
    with pytest.raises(cfg.ConfigError, match="contradicts --keep_export_max=3"):
        parsed_flags(["--keep_hub_module_max=1", "--keep_export_max=3"])
    with pytest.raises(cfg.ConfigError, match="not a regular expression"):
        parsed_flags(["--variable_schema=(head"])


@pytest.mark.slow
def test_the_cifar10_pretraining_and_linear_evaluation_commands_run_as_written(tmp_path, cli):
    here = {"--dataset=cifar10": "--dataset=fashion_mnist",
            "/tmp/simclr_test_ft": str(tmp_path / "ft"), "/tmp/simclr_test": str(tmp_path / "pre")}
    # Appended, so they override: two steps, and batches of 64 rather than its 512 (a 2-core CI).
    a_few_steps = ["--train_steps=2", "--steps_per_loop=1", "--eval_steps=1",
                   "--train_batch_size=64"]
    result = cli(*_flags(CIFAR10_PRETRAIN, **here), *a_few_steps)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Pretraining resnet18x1 from step 0 to 2" in result.stderr
    result = cli(*_flags(CIFAR10_LINEAR_EVAL, **here), *a_few_steps)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--variable_schema: fine-tuning restores f" in result.stderr
    with open(tmp_path / "ft" / "results.json") as f:
        results = json.load(f)
    assert results["step"] == 2 and results["num_examples"] == 256  # one eval batch
    saved = cfg.load(str(tmp_path / "ft"))
    assert saved.finetune.fine_tune_after_block == 4 and saved.encoder.resnet_depth == 18


@pytest.mark.slow
def test_the_imagenet_fine_tuning_command_runs_on_a_dataset_here(tmp_path, cli):
    # Its 1% ImageNet fine-tuning of a 3-layer-head SimCLRv2 model from the middle of the head,
    # as written, with what this machine has: Fashion-MNIST (train, test) for the ImageNet subset
    # (train, validation), no TPU, and
    # (appended, so they override) a small image size, batch and step budget.
    pretrain = _flags(CIFAR10_PRETRAIN, **{"--dataset=cifar10": "--dataset=fashion_mnist",
                                           "/tmp/simclr_test": str(tmp_path / "pre")})
    result = cli(*pretrain, "--num_proj_layers=3", "--train_steps=2", "--steps_per_loop=1",
                 "--train_batch_size=32")
    assert result.returncode == 0, result.stderr[-3000:]
    here = {"--dataset=imagenet2012_subset/1pct": "--dataset=fashion_mnist",
            "--eval_split=validation": "--eval_split=test", "--data_dir=$DATA_DIR ": "", "$MODEL_DIR": str(tmp_path / "ft"),
            "$CHKPT_DIR": str(tmp_path / "pre"),
            "--use_tpu=True --tpu_name=$TPU_NAME": "--use_tpu=False"}
    result = cli(*_flags(IMAGENET_FINETUNE_1PCT, **here), "--image_size=32",
                 "--train_batch_size=16", "--train_steps=2", "--steps_per_loop=1",
                 "--eval_steps=1", "--eval_batch_size=64")
    assert result.returncode == 0, result.stderr[-3000:]
    saved = cfg.load(str(tmp_path / "ft"))
    assert (saved.head.num_proj_layers, saved.finetune.ft_proj_selector) == (3, 1)
    assert saved.encoder.resnet_depth == 18  # the pretrained model's, from --checkpoint
    with open(tmp_path / "ft" / "results.json") as f:
        results = json.load(f)
    assert results["step"] == 2 and results["num_examples"] == 64
    assert "top-1" in result.stdout
