"""Test-session setup and the helpers tests share.

Setup: 4 logical CPU devices (for MirroredStrategy tests), the CLI's oneDNN default and quiet TF
logs. The logical devices must exist before TensorFlow initialises its devices, so this runs at
import, before any test module builds a tensor.

Shared helpers, as fixtures: tiny configs (`pretrain_config`, `finetune_config`), tiny data
(`image_folder`, `views_batch`, `colour_data`), hostile image files (`zeros_png`), a CLI
subprocess (`cli`), and `parsed_flags`.
"""
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as simclr_tf.run sets it

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

NUM_LOGICAL_CPUS = 4
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration()] * NUM_LOGICAL_CPUS)


@pytest.fixture
def parsed_flags():
    """parse(argv) -> RunConfig through run.py's own flags; restores the flags afterwards."""
    from absl import flags
    from simclr_tf import run

    saved = flags.FLAGS.flag_values_dict()

    def parse(argv):
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["simclr_tf.run"] + argv)
        return run.config_from_flags()

    yield parse
    flags.FLAGS.unparse_flags()
    for name, value in saved.items():
        setattr(flags.FLAGS, name, value)


def _write_image_folder(root, per_class=8, size=20, classes=("cats", "dogs")):
    """PNG images of random pixels, `per_class` in each class sub-folder; returns the dataset
    name `folder:<root>`."""
    rng = np.random.default_rng(0)
    for label in classes:
        os.makedirs(os.path.join(root, label))
        for i in range(per_class):
            pixels = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
            tf.io.write_file(os.path.join(str(root), label, f"{i}.png"), tf.io.encode_png(pixels))
    return f"folder:{root}"


@pytest.fixture(scope="session")
def image_folder():
    """image_folder(root, per_class=8, size=20, classes=("cats", "dogs")) -> "folder:<root>"."""
    return _write_image_folder


def _pretrain_config(model_dir="/tmp/unused", **train_overrides):
    """A ResNet-18 (CIFAR stem) SimCLR run on 16-px views, batch 8, 4 steps."""
    from simclr_tf import config as cfg

    train_kwargs = dict(model_dir=str(model_dir), train_batch_size=8, train_steps=4,
                        steps_per_loop=2, checkpoint_steps=2, summary_images=0)
    train_kwargs.update(train_overrides)
    return cfg.RunConfig(
        data=cfg.DataConfig(dataset="fashion_mnist", image_size=16),
        encoder=cfg.EncoderConfig(resnet_depth=18, cifar_stem=True, global_bn=True),
        head=cfg.HeadConfig(proj_out_dim=16),
        optimizer=cfg.OptimizerConfig(learning_rate=0.5, warmup_epochs=0),
        loss=cfg.LossConfig(temperature=0.5),
        train=cfg.TrainConfig(**train_kwargs),
    )


@pytest.fixture(scope="session")
def pretrain_config():
    """pretrain_config(model_dir, **train_overrides) -> a tiny pretraining `RunConfig`."""
    return _pretrain_config


def _finetune_config(model_dir="/tmp/unused", **finetune_kwargs):
    """A ResNet-18 fine-tuning run (3-layer head) on 16-px images, batch 12, momentum SGD."""
    from simclr_tf import config as cfg

    return cfg.RunConfig(
        data=cfg.DataConfig(dataset="fashion_mnist", image_size=16),
        encoder=cfg.EncoderConfig(resnet_depth=18, cifar_stem=True),
        head=cfg.HeadConfig(proj_out_dim=16, num_proj_layers=3),
        optimizer=cfg.OptimizerConfig(optimizer="momentum", learning_rate=1.0, weight_decay=0.0,
                                      warmup_epochs=0, learning_rate_scaling="linear"),
        train=cfg.TrainConfig(model_dir=str(model_dir), train_batch_size=12, train_steps=40,
                              steps_per_loop=2, checkpoint_steps=2, summary_images=0,
                              train_mode="finetune"),
        finetune=cfg.FinetuneConfig(**finetune_kwargs))


@pytest.fixture(scope="session")
def finetune_config():
    """finetune_config(model_dir, **finetune_settings) -> a tiny fine-tuning `RunConfig`."""
    return _finetune_config


@pytest.fixture(scope="session")
def views_batch():
    """views_batch(n=8, size=16, seed=0) -> {view_a, view_b, label} of random numpy arrays."""
    def make(n=8, size=16, seed=0):
        rng = np.random.default_rng(seed)
        return {"view_a": rng.uniform(size=(n, size, size, 3)).astype(np.float32),
                "view_b": rng.uniform(size=(n, size, size, 3)).astype(np.float32),
                "label": rng.integers(0, 10, size=n).astype(np.int32)}
    return make


class ColourData:
    """Images whose class c is their dominant colour (red, green, blue) plus noise: linearly
    separable in h, so a classifier must reach 100% on them."""

    num_classes = 3

    @staticmethod
    def batch(n=12, size=16, seed=0):
        rng = np.random.default_rng(seed)
        labels = np.arange(n) % ColourData.num_classes
        images = 0.1 + 0.3 * rng.uniform(size=(n, size, size, 3))
        images[np.arange(n), :, :, labels] += 0.6
        return {"image": tf.constant(images, tf.float32), "label": tf.constant(labels, tf.int32),
                "labelled": tf.ones([n])}


@pytest.fixture(scope="session")
def colour_data():
    return ColourData


def _run_cli(*args, timeout=600, env=None):
    environment = {name: value for name, value in
                   dict(os.environ, PYTHONPATH=REPO, **(env or {})).items() if value is not None}
    return subprocess.run([sys.executable, "-m", "simclr_tf.run", *args], capture_output=True,
                          text=True, timeout=timeout, env=environment, cwd=REPO)


@pytest.fixture(scope="session")
def zeros_png():
    """zeros_png(side) -> a real PNG of side x side zeros: small on disk, huge decoded. (Defined in
    tests/serving_load.py, which runs on its own.)"""
    from serving_load import zeros_png as make
    return make


@pytest.fixture(scope="session")
def cli():
    """cli(*flags, timeout=600, env=None) -> the finished `python -m simclr_tf.run` process
    (`env`: variables to set, or to unset with None)."""
    return _run_cli
