"""tf.distribute strategies by name, and which worker writes what.

Only the chief of a multi-worker run writes checkpoints, summaries and exports to `model_dir`; the
other workers still take part in saving (collectives may be involved) but write to a private
temporary directory that is removed afterwards.
"""

import os
import shutil

import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")


def split_cpu(num_replicas):
    """Splits the physical CPU into `num_replicas` logical devices (before TF initialises them)."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    existing = tf.config.get_logical_device_configuration(cpu)
    if existing and len(existing) == num_replicas:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * num_replicas)
    except RuntimeError as e:
        raise ValueError(
            "num_cpu_replicas must be set before TensorFlow initialises its devices") from e


def build_strategy(name="default", num_cpu_replicas=0, tpu=None):
    """Returns the tf.distribute strategy called `name`.

    Args:
      name: "default" (one device), "mirrored" (all GPUs, or `num_cpu_replicas` logical CPUs),
        "multi_worker" (MultiWorkerMirroredStrategy from TF_CONFIG) or "tpu".
      num_cpu_replicas: with "mirrored" and no GPU, split the CPU into this many replicas.
      tpu: TPU name or address for "tpu".
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        if num_cpu_replicas > 0 and not tf.config.list_physical_devices("GPU"):
            split_cpu(num_cpu_replicas)
            devices = [d.name for d in tf.config.list_logical_devices("CPU")]
            # Reduce through one device: on logical CPUs it is as fast as collectives, and
            # collective group keys would clash between strategies built in one process.
            return tf.distribute.MirroredStrategy(
                devices[:num_cpu_replicas], cross_device_ops=tf.distribute.ReductionToOneDevice())
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")


def is_chief(strategy):
    """True unless this is a non-chief worker of a multi-worker run."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and not has_chief


def write_dir(model_dir, strategy):
    """Where this worker writes: `model_dir` for the chief, a private temporary dir otherwise."""
    if is_chief(strategy):
        return model_dir
    resolver = strategy.cluster_resolver
    return os.path.join(model_dir, ".workers", f"{resolver.task_type}_{resolver.task_id}")


def remove_worker_dir(path, model_dir):
    """Deletes a non-chief worker's temporary directory (never the chief's model_dir)."""
    if os.path.abspath(path) != os.path.abspath(model_dir):
        shutil.rmtree(path, ignore_errors=True)
