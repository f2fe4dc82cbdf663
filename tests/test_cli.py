"""The CLI: flags map onto the config, and bad values get one-line errors naming the flag."""

import os
import subprocess
import sys

import pytest

from simclr_tf import config as cfg

BAD_FLAGS = [
    (["--resnet_depth=42"], 1, "resnet_depth must be one of"),
    (["--width_multiplier=0"], 1, "width_multiplier must be a positive integer"),
    (["--sk_ratio=1.5"], 1, "sk_ratio must be in"),
    (["--train_batch_size=0"], 1, "train_batch_size must be positive"),
    (["--train_batch_size=30"], 4, "not divisible by the 4 replicas"),
    (["--train_batch_size=1"], 1, "train_batch_size=1 leaves the contrastive loss without "
                                  "negatives (an image's only other view is its positive): use "
                                  "at least 2"),
    (["--image_size=4"], 1, "image_size=4 is too small for the CIFAR stem"),
    (["--image_size=16", "--cifar_stem=false"], 1, "too small for the ImageNet stem"),
    (["--image_size=224", "--eval_image_size=16"], 1,
     "eval_image_size=16 is too small for the ImageNet stem: use at least 32"),
    (["--optimizer=sgdw"], 1, "optimizer must be one of"),
    (["--learning_rate_scaling=cubic"], 1, "learning_rate_scaling must be one of"),
    (["--learning_rate=-1"], 1, "learning_rate must be positive"),
    (["--temperature=0"], 1, "temperature must be positive"),
    (["--num_proj_layers=0"], 1, "num_proj_layers must be >= 1"),
    (["--precision=float8"], 1, "precision must be one of"),
    (["--steps_per_loop=0"], 1, "steps_per_loop must be positive"),
    (["--train_epochs=0", "--train_steps=0"], 1, "set train_epochs or train_steps"),
    (["--seed=-1"], 1, "seed must be in 0..2**32-1, got -1"),
    (["--seed=4294967296"], 1, "seed must be in 0..2**32-1"),
]


@pytest.mark.parametrize("argv,replicas,message", BAD_FLAGS)
def test_bad_flags_raise_one_line_config_errors(parsed_flags, argv, replicas, message):
    config = parsed_flags(argv)
    with pytest.raises(cfg.ConfigError) as error:
        cfg.validate(config, replicas)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_jit_compile_is_refused_on_several_replicas_but_not_on_one_or_a_tpu(parsed_flags):
    config = parsed_flags(["--jit_compile"])
    with pytest.raises(cfg.ConfigError) as error:
        cfg.validate(config, 2, "mirrored")
    assert str(error.value) == (
        "jit_compile=True runs one replica (or --strategy=tpu), not 2 replicas of "
        "--strategy=mirrored: XLA cannot compile that step's cross-replica ops; drop "
        "--jit_compile or use one replica")
    cfg.validate(config, 1, "mirrored")
    cfg.validate(config, 8, "tpu")
    cfg.validate(parsed_flags([]), 2, "multi_worker")


def test_flags_map_onto_config_with_small_image_defaults(parsed_flags):
    config = parsed_flags(["--image_size=32", "--resnet_depth=18", "--temperature=0.5"])
    assert config.encoder.cifar_stem and not config.augment.use_blur
    assert config.encoder.resnet_depth == 18 and config.loss.temperature == 0.5
    big = parsed_flags(["--image_size=224"])
    assert not big.encoder.cifar_stem and big.augment.use_blur
    assert big.eval.eval_image_size == 0
    assert parsed_flags(["--image_size=16", "--eval_image_size=28"]).eval.eval_image_size == 28
    cfg.validate(big)


def test_one_image_per_batch_is_refused_for_contrastive_pretraining_only(parsed_flags):
    with pytest.raises(cfg.ConfigError, match=r"^train_batch_size=1 leaves the contrastive loss "
                       r"without negatives .*: use at least 2$"):
        cfg.validate(parsed_flags(["--train_batch_size=1"]))
    cfg.validate(parsed_flags(["--train_batch_size=2"]))
    cfg.validate(parsed_flags(["--train_batch_size=1", "--train_mode=finetune"]))


def test_config_json_round_trip(tmp_path):
    config = cfg.RunConfig(encoder=cfg.EncoderConfig(resnet_depth=152, width_multiplier=3,
                                                     sk_ratio=0.0625))
    cfg.save(config, str(tmp_path))
    assert cfg.load(str(tmp_path)) == config
    with pytest.raises(cfg.ConfigError, match="config.json not found"):
        cfg.load(str(tmp_path / "missing"))


def test_cli_prints_one_line_error_without_traceback(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run(
        [sys.executable, "-m", "simclr_tf.run", "--resnet_depth=42",
         f"--model_dir={tmp_path}"], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "This TensorFlow binary is optimized" not in result.stderr  # TF_CPP_MIN_LOG_LEVEL in time
    assert result.stderr.strip().splitlines()[-1] == (
        "error: resnet_depth must be one of [18, 34, 50, 101, 152, 200], got 42")


NOISE = ("absl::InitializeLog", "cudart_stub", "cuInit", "cpu_feature_guard",
         "oneDNN custom operations", "This TensorFlow binary is optimized")


def test_tensorflows_start_up_messages_are_silenced_unless_asked_for(tmp_path):
    """A run that gets as far as building its strategy and reading its dataset (whose name is
    wrong): without TF_CPP_MIN_LOG_LEVEL, none of TensorFlow's C++ start-up lines; with it set,
    they are back."""
    argv = [sys.executable, "-m", "simclr_tf.run", "--dataset=no_such_dataset",
            f"--model_dir={tmp_path}"]
    quiet_env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    quiet = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=quiet_env)
    assert quiet.returncode == 2
    assert quiet.stderr.strip().splitlines()[-1].startswith("error: unknown dataset")
    assert [line for line in quiet.stderr.splitlines() if any(n in line for n in NOISE)] == []
    loud = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                          env={**quiet_env, "TF_CPP_MIN_LOG_LEVEL": "0"})
    assert "absl::InitializeLog" in loud.stderr
    # The export command too.
    exporting = subprocess.run([sys.executable, "-m", "export", f"--model_dir={tmp_path}/none"],
                               capture_output=True, text=True, timeout=120, env=quiet_env,
                               cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert exporting.stderr.strip().splitlines() == [
        f"error: model_dir {tmp_path}/none does not exist"]
