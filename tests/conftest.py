"""Test-session setup: 4 logical CPU devices (for MirroredStrategy tests), the CLI's oneDNN
default and quiet TF logs.

The logical devices must exist before TensorFlow initialises its devices, so this runs at import,
before any test module builds a tensor.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as simclr_tf.run sets it

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

NUM_LOGICAL_CPUS = 4

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
