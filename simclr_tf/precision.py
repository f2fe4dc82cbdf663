"""The numeric precision a run computes in: `--precision=auto` picks it from the hardware.

bfloat16 (Keras `mixed_bfloat16`: bfloat16 activations and matmuls, float32 variables, loss and
batch-norm statistics) where the hardware multiplies bfloat16 natively: TPUs, NVIDIA GPUs of
compute capability 8.0 and newer, and CPUs with AVX512_BF16 or AMX-BF16 (about 1.6x the float32
step on a 2-core AVX512_BF16 machine, docs/performance.md). Everywhere else float32: without native
support bfloat16 is emulated and slower than float32. float16 is never chosen automatically (it
needs loss scaling and suits older GPUs best); ask for it with `--precision=float16`.
"""

AUTO = "auto"
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo="/proc/cpuinfo"):
    """The CPU's feature flags (empty where /proc/cpuinfo is not there, e.g. not Linux)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def gpu_compute_capabilities():
    """[(major, minor), ...] of the visible GPUs."""
    import tensorflow as tf
    found = []
    for gpu in tf.config.list_physical_devices("GPU"):
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        if capability:
            found.append(tuple(capability))
    return found


def choose(strategy_name, flags=None, gpus=None):
    """(precision, why) for this hardware: "bfloat16" where it is native, else "float32".

    `flags` and `gpus` default to this machine's (`cpu_flags()`, `gpu_compute_capabilities()`).
    """
    if strategy_name == "tpu":
        return "bfloat16", "TPU (native bfloat16)"
    gpus = gpu_compute_capabilities() if gpus is None else gpus
    if gpus:
        if all(capability >= (8, 0) for capability in gpus):
            return "bfloat16", f"GPU of compute capability {'.'.join(map(str, min(gpus)))}"
        return "float32", (f"GPU of compute capability {'.'.join(map(str, min(gpus)))} has no "
                           "fast bfloat16 (--precision=float16 with loss scaling may pay)")
    flags = cpu_flags() if flags is None else flags
    native = sorted(f for f in _CPU_BF16_FLAGS if f in flags)
    if native:
        return "bfloat16", f"CPU with {', '.join(f.upper() for f in native)}"
    return "float32", "CPU without native bfloat16 (no AVX512_BF16 or AMX-BF16)"


def resolve(requested, strategy_name):
    """(precision, why): `requested` itself unless it is "auto"."""
    if requested != AUTO:
        return requested, "--precision"
    return choose(strategy_name)
