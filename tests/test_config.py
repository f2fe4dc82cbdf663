"""The configuration: one source for every default, derived defaults resolved by the config itself,
config.json that refuses what it does not know, vocabularies that agree with the code, and no model
code imported by config.py."""

import ast
import dataclasses
import os

import pytest

from simclr_tf import config as cfg

CONFIG_SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "simclr_tf", "config.py")


def test_every_setting_is_a_flag_with_the_same_default_and_a_help(parsed_flags):
    assert parsed_flags([]) == cfg.RunConfig()
    names = [field.name for _, field in cfg.settings()]
    assert len(names) == len(set(names))  # one flag per setting
    from absl import flags
    for section, field in cfg.settings():
        assert field.metadata["help"], f"{section}.{field.name}"
        assert flags.FLAGS[field.name].help.endswith(field.metadata["help"])


def test_derived_defaults_are_resolved_by_the_config_as_by_the_cli(parsed_flags):
    small, large = cfg.RunConfig(), cfg.RunConfig(data=cfg.DataConfig(image_size=224))
    assert (small.encoder.cifar_stem, small.augment.use_blur) == (True, False)
    assert (large.encoder.cifar_stem, large.augment.use_blur) == (False, True)
    assert (small.augment.augment_input_size, large.augment.augment_input_size) == (37, 256)
    assert parsed_flags(["--image_size=224"]) == large
    explicit = cfg.RunConfig(data=cfg.DataConfig(image_size=224),
                             encoder=cfg.EncoderConfig(cifar_stem=True),
                             augment=cfg.AugmentConfig(use_blur=False))
    assert (explicit.encoder.cifar_stem, explicit.augment.use_blur) == (True, False)
    assert cfg.RunConfig.from_json(large.to_json()) == large


def test_config_json_with_an_unknown_setting_is_an_error_naming_it(tmp_path):
    text = cfg.RunConfig().to_json()
    with pytest.raises(cfg.ConfigError, match=r"unknown setting\(s\) encoder.resnet_dpeth"):
        cfg.RunConfig.from_json(text.replace('"resnet_depth"', '"resnet_dpeth"'))
    with pytest.raises(cfg.ConfigError, match=r"unknown setting\(s\) model"):
        cfg.RunConfig.from_json('{"model": {}}')
    # A setting it lacks (a run written before the setting existed) takes its default.
    assert cfg.RunConfig.from_json('{"head": {"proj_out_dim": 64}}') == cfg.RunConfig(
        head=cfg.HeadConfig(proj_out_dim=64))
    (tmp_path / cfg.CONFIG_FILENAME).write_text('{"train": {"train_steps": 3, "typo": 1}}')
    with pytest.raises(cfg.ConfigError) as error:
        cfg.load(str(tmp_path))
    assert str(error.value).startswith(f"{tmp_path}/config.json: unknown setting(s) train.typo")
    (tmp_path / cfg.CONFIG_FILENAME).write_text('{"train": ')
    with pytest.raises(cfg.ConfigError, match="config.json is unreadable"):
        cfg.load(str(tmp_path))


def test_vocabularies_agree_with_the_modules_that_implement_them():
    from simclr_tf import heads, losses, schedules, views
    from simclr_tf.optim import build_optimizer
    from simclr_tf.resnet import DEPTHS, min_image_size
    from simclr_tf.schedules import Schedule

    assert cfg.RESNET_DEPTHS == tuple(sorted(DEPTHS))
    assert cfg.PROJ_HEAD_MODES == heads.PROJ_HEAD_MODES
    assert cfg.LOSSES == losses.LOSSES and cfg.SEMI_HARD_LOSSES == losses.SEMI_HARD_LOSSES
    assert cfg.AUGMENTATIONS == tuple(views.TRANSFORMS)
    assert cfg.LR_SCALINGS == schedules.LR_SCALINGS
    assert cfg.MIN_IMAGE_SIZE == {"CIFAR": min_image_size(True),
                                  "ImageNet": min_image_size(False)}
    for name in cfg.OPTIMIZERS:
        build_optimizer(cfg.OptimizerConfig(optimizer=name), 256, Schedule(10, 1, 10))
    assert cfg.LossConfig().margin == losses.DEFAULT_MARGIN


def test_config_imports_no_model_code():
    tree = ast.parse(open(CONFIG_SOURCE).read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            module = node.module
            imported.add(module if module.startswith("simclr_tf") else module.split(".")[0])
    # The run directory's housekeeping and the error line only: no model code.
    assert imported <= {"dataclasses", "json", "os", "tensorflow", "simclr_tf.errors",
                        "simclr_tf.rundir"}, imported


def test_sections_are_frozen_and_the_head_counts_its_layers():
    config = cfg.RunConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train.train_steps = 3
    assert [cfg.HeadConfig(proj_head_mode=mode, num_proj_layers=3).num_layers
            for mode in ("none", "linear", "nonlinear")] == [0, 1, 3]


@pytest.mark.parametrize("flags, gpus, strategy, expected", [
    ({"avx2", "avx512f", "avx512_bf16"}, [], "default", "bfloat16"),  # Zen 4, Cooper Lake on
    ({"avx2", "amx_bf16", "amx_tile"}, [], "default", "bfloat16"),  # Sapphire Rapids on
    ({"avx2", "avx512f", "avx512_vnni"}, [], "default", "float32"),  # AVX-512 without bfloat16
    ({"avx2", "fma"}, [], "default", "float32"),
    (set(), [], "default", "float32"),  # not Linux: no /proc/cpuinfo
    ({"avx2"}, [(8, 0)], "mirrored", "bfloat16"),  # A100
    ({"avx2"}, [(9, 0), (8, 6)], "mirrored", "bfloat16"),
    ({"avx512_bf16"}, [(7, 0)], "default", "float32"),  # V100: the GPU decides, float16 is opt-in
    ({"avx2"}, [(8, 0), (7, 5)], "mirrored", "float32"),  # mixed GPUs: the slowest decides
    (set(), [], "tpu", "bfloat16"),
])
def test_auto_precision_is_bfloat16_only_where_the_hardware_has_it(flags, gpus, strategy,
                                                                   expected):
    from simclr_tf import precision
    chosen, why = precision.choose(strategy, flags=flags, gpus=gpus)
    assert chosen == expected and why
    assert precision.resolve("float16", strategy) == ("float16", "--precision")


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    from simclr_tf import precision
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512_bf16\n"
                       "\nprocessor\t: 1\nflags\t\t: fpu avx2 avx512_bf16\n")
    assert precision.cpu_flags(str(cpuinfo)) == {"fpu", "avx2", "avx512_bf16"}
    assert precision.cpu_flags(str(tmp_path / "absent")) == set()
