"""Test-session setup: 4 logical CPU devices (for MirroredStrategy tests) and quiet TF logs.

The logical devices must exist before TensorFlow initialises its devices, so this runs at import,
before any test module builds a tensor.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

NUM_LOGICAL_CPUS = 4

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration()] * NUM_LOGICAL_CPUS)
