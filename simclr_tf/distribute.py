"""tf.distribute strategies by name, the cluster they run on, and which worker writes what.

`check_tf_config` checks TF_CONFIG before a multi-worker strategy tries to use it. Only the chief
of a multi-worker run writes checkpoints, summaries and exports to `model_dir`; the other workers
still take part in saving (collectives may be involved) but write to a private temporary
directory that is removed afterwards.
"""

import json
import os
import re
import shutil

import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
_HOST_PORT = re.compile(r"(\[[0-9a-fA-F:.]+\]|[^\s:\[\]/]+):\d{1,5}")


class TFConfigError(ValueError):
    """TF_CONFIG cannot describe this run's cluster; the message is one line saying what to fix."""




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


def build_strategy(name="default", num_cpu_replicas=0, tpu=None, tpu_zone=None,
                   gcp_project=None):
    """Returns the tf.distribute strategy called `name`.

    Args:
      name: "default" (one device), "mirrored" (all GPUs, or `num_cpu_replicas` logical CPUs),
        "multi_worker" (MultiWorkerMirroredStrategy from TF_CONFIG) or "tpu".
      num_cpu_replicas: with "mirrored" and no GPU, split the CPU into this many replicas.
      tpu: TPU name or address for "tpu"; tpu_zone and gcp_project locate a Cloud TPU by
        name (as the original code's flags).
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
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
            tpu=tpu, zone=tpu_zone, project=gcp_project)
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


def check_tf_config(text):
    """TFConfigError unless TF_CONFIG (`text`; empty: one worker) is a usable cluster spec."""
    if not text or not text.strip():
        return
    example = ('e.g. {"cluster": {"worker": ["host1:2222", "host2:2222"]}, '
               '"task": {"type": "worker", "index": 0}}')
    try:
        spec = json.loads(text)
    except ValueError as e:
        raise TFConfigError(f"TF_CONFIG is not valid JSON ({e}): expected {example}") from None
    if not isinstance(spec, dict):
        raise TFConfigError(f"TF_CONFIG must be a JSON object, got {type(spec).__name__}: "
                            f"expected {example}")
    cluster, task = spec.get("cluster"), spec.get("task")
    if not isinstance(cluster, dict) or not cluster:
        raise TFConfigError(f"TF_CONFIG has no \"cluster\" of jobs: expected {example}")
    for job, addresses in cluster.items():
        if isinstance(addresses, dict):
            addresses = list(addresses.values())
        if (not isinstance(addresses, list) or not addresses
                or not all(isinstance(a, str) and _HOST_PORT.fullmatch(a) for a in addresses)):
            raise TFConfigError(f"TF_CONFIG cluster job {job!r} must be a list of \"host:port\" "
                                f"strings, got {addresses!r}")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise TFConfigError(f"TF_CONFIG has no \"task\" with \"type\" and \"index\" (which of "
                            f"the cluster's tasks this process is): expected {example}")
    job, index = task["type"], task["index"]
    if job not in cluster:
        raise TFConfigError(f"TF_CONFIG task type {job!r} is not a job of its cluster "
                            f"({', '.join(sorted(cluster))})")
    count = len(cluster[job])
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
        raise TFConfigError(f"TF_CONFIG task index {index!r} is out of range: job {job!r} has "
                            f"{count} task(s), indices 0 to {count - 1}")
