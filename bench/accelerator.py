"""One accelerator window in one command: device, matmul peaks, ResNet steps, input pipeline, serving.

On the device machine (the device tool runs a command in the repository root, $OUT its output
folder; at most 8 minutes with the defaults, --deadline_s=420 plus a 30 s watchdog):

    python bench/accelerator.py --log_file=$OUT/accelerator.log

Here, on a CPU, a quick check of every code path (about a minute on 2 idle cores):

    python bench/accelerator.py --smoke --log_file=/tmp/accelerator_smoke.log

Before it can run there: the device machine reaches no network, so `pip install -r
requirements.txt` (which needs PyPI) cannot run on it, and its image has NO TensorFlow: it holds
Python 3.12 with PyTorch, JAX, CuPy, numpy, absl-py, pillow, tensorboard and CUDA 13 libraries
(nvidia-*-cu13), per the workplace's device notes (KINDS.md). TensorFlow 2.21 is built against
CUDA 12.5 and cuDNN 9 (tf.sysconfig.get_build_info()), so the caller must bring
`tensorflow[and-cuda]==2.21.0` (its nvidia-*-cu12 libraries too), keras==3.15.1,
tensorflow-datasets==4.9.10 and importlib_resources, as cp312 manylinux x86_64 wheels fetched
where PyPI is reachable and installed there with `pip install --no-index`. TensorFlow alone is
hundreds of MB as a wheel (1.9 GB installed), far over the 64 MiB a device call can carry, so until
a device image holds TensorFlow this bench cannot run on that machine. Without a GPU visible to
TensorFlow (CPU-only TensorFlow, CUDA libraries missing) the device part says so and, unless
--norequire_gpu, the other parts are skipped with that reason instead of running for hours on a CPU.

Prints progress lines on stderr and ONE JSON line, the last line on stdout; --log_file gets the
progress lines and the same JSON as its last line. Every part runs under its own time budget
(--*_budget_s) and the overall --deadline_s; a part (or one of its runs) that would not fit is
skipped with the reason, an error is reported as its text, and a watchdog prints the JSON with
what was measured so far if the deadline plus --watchdog_grace_s passes (a running part is then
"aborted"). So a JSON always comes back. Each part: {"status": "ok" | "partial" (some runs
skipped) | "skipped" | "error" | "aborted", "reason" or "error" (text), "seconds", ...}.

Parts and definitions:
1. device: TensorFlow's version and build info (CUDA/cuDNN versions of the build), each GPU's name
   and compute capability (`tf.config.experimental.get_device_details`), the memory TensorFlow's
   allocator may use (device_lib's memory_limit) and nvidia-smi's total/free, whether TF32 is on.
2. matmul: peak GFLOP/s of `tf.matmul` in float32, bfloat16 and float16, square --matmul_size
   matrices, best of --matmul_repeats calls of --matmul_chain chained products (benchlib).
   float32 on an Ampere or later GPU runs on TF32 tensor cores while
   `tf.config.experimental.tensor_float_32_execution_enabled()` (TensorFlow's default), reported.
3. resnet: ResNet-(--depth) at --image_size px. The global batch (images; 2 views each) is the
   largest power of two that fits: the float32 bare step's peak memory
   (`tf.config.experimental.get_memory_info`) at --probe_batch and twice it gives the memory per
   example and the fixed part; the allocator's limit then gives a batch, verified by one float32
   full step and halved on out-of-memory (at most --batch_tries tries; --batch fixes it). Then for
   each of --configs (precision:xla; mixed_float16 wraps the optimiser in a LossScaleOptimizer,
   as `config.train.precision=float16` does; xla = jit_compile of the replica step):
   - bare: forward + backward of f alone on random views, mean(h^2), SGD (benchlib, the same
     step as bench/train_throughput.py);
   - full: `pretrain.Pretrainer.replica_step` (f, g, NT-Xent, LARS with weight decay, the linear
     probe on 10 synthetic classes) on synthetic views already on the device;
   - full_uint8 (if listed in --kinds): the same on a synthetic uint8 batch, the views made in
     the step as --augment_on_device makes them.
   Each run: one warm-up step (tracing, compiling), one timed step, then the best of
   --timed_loops loops of as many steps as fit in --timed_seconds (at most --steps).
   examples/s = batch x steps / s; views/s = 2 x examples/s.
4. pipeline: the full step (--pipeline_precision, --pipeline_xla, the batch of part 3) fed by the
   real input pipeline (`pretrain.make_dataset_fn`) reading an image folder of --pipeline_images
   synthetic JPEGs and PNGs of 256-300 px (sized to the view side) written to a temporary folder,
   against the same step with --augment_on_device (uint8 batches; views made in the step). Then
   the host pipeline alone (no step), single-threaded through tf.data options
   (private_threadpool_size=1, max_intra_op_parallelism=1), gives views/s per host core, and
   host cores needed = views/s of the step unfed (part 3's full step at the same precision and
   XLA setting if it ran, else this part's --augment_on_device step) / views/s per core.
5. serving: f exported (`simclr_tf.export`, random weights) and loaded in this process;
   `serving_default` (float32 preprocessed images) and `serving_bytes` (224-px JPEGs, decoded on
   the host) requests/s and images/s at each of --serving_batches, --serving_threads client
   threads, as many requests as fit in --serving_seconds (at most --serving_requests).
"""

import copy
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback

START = time.monotonic()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags  # noqa: E402

import benchlib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_boolean("smoke", False, "Tiny sizes on the CPU: every code path in about a minute.")
flags.DEFINE_string("log_file", "/tmp/accelerator_bench.log",
                    "Progress lines and the final JSON line.")
flags.DEFINE_boolean("require_gpu", None,
                     "Skip parts 2-5 when TensorFlow sees no GPU (default: on, off with --smoke).")
flags.DEFINE_float("deadline_s", None, "Overall deadline from start (default 420; smoke 240).")
flags.DEFINE_float("watchdog_grace_s", 30, "After the deadline plus this, print what was "
                   "measured and exit, whatever is running.")
flags.DEFINE_float("device_budget_s", None, "Budget of part 1 (default 20; smoke 20).")
flags.DEFINE_float("matmul_budget_s", None, "Budget of part 2 (default 30; smoke 15).")
flags.DEFINE_float("resnet_budget_s", None, "Budget of part 3 (default 180; smoke 90).")
flags.DEFINE_float("pipeline_budget_s", None, "Budget of part 4 (default 90; smoke 60).")
flags.DEFINE_float("serving_budget_s", None, "Budget of part 5 (default 70; smoke 40).")
flags.DEFINE_integer("matmul_size", None, "Side of the matmul matrices (default 8192; smoke 256).")
flags.DEFINE_integer("matmul_repeats", 5, "Timed calls per dtype; the best counts.")
flags.DEFINE_integer("matmul_chain", None, "Chained products per call (default 10; smoke 1).")
flags.DEFINE_integer("depth", None, "ResNet depth (default 50; smoke 18).")
flags.DEFINE_integer("image_size", None, "View side (default 224; smoke 32, CIFAR stem).")
flags.DEFINE_integer("batch", 0, "Global batch (images); 0: the largest power of two that fits "
                     "on a GPU, --smoke_batch on a CPU.")
flags.DEFINE_integer("smoke_batch", 4, "Global batch without a GPU.")
flags.DEFINE_integer("fallback_batch", 64, "Global batch on a GPU if the batch search fails.")
flags.DEFINE_integer("probe_batch", 16, "Batch of the memory probe (and twice it).")
flags.DEFINE_integer("max_batch", 4096, "Upper bound of the batch search.")
flags.DEFINE_integer("batch_tries", 3, "Tries of the batch search's verification step.")
flags.DEFINE_float("memory_fraction", 0.85, "Fraction of the allocator's limit the batch search "
                   "plans to fill.")
flags.DEFINE_list("configs", None, "precision:xla runs of part 3, in order of priority (default "
                  "float32:off,mixed_bfloat16:off,mixed_bfloat16:on,mixed_float16:off,"
                  "float32:on,mixed_float16:on; smoke float32:off,mixed_float16:off,"
                  "mixed_bfloat16:on).")
flags.DEFINE_list("kinds", ["bare", "full"], "Steps of part 3: bare, full, full_uint8.")
flags.DEFINE_integer("steps", None, "Most steps per timed loop (default 20; smoke 2).")
flags.DEFINE_float("timed_seconds", None, "Aim of one timed loop (default 2; smoke 1).")
flags.DEFINE_integer("timed_loops", None, "Timed loops per run after the timed first step; "
                     "the fastest counts (default 2; smoke 0).")
flags.DEFINE_string("pipeline_precision", None, "Precision of part 4's steps (default "
                    "mixed_bfloat16; smoke float32: mixed precision is slow on CPUs).")
flags.DEFINE_boolean("pipeline_xla", False, "XLA-compile part 4's steps.")
flags.DEFINE_integer("pipeline_images", None, "Images written for part 4 (default 256; smoke 16).")
flags.DEFINE_integer("pipeline_core_batch", None,
                     "Batch of the single-threaded pipeline loop (default 32; smoke 4).")
flags.DEFINE_float("pipeline_core_seconds", None,
                   "Aim of the single-threaded pipeline loop (default 8; smoke 1).")
flags.DEFINE_list("serving_batches", None, "Batches of part 5 (default 1,64; smoke 1,4).")
flags.DEFINE_integer("serving_requests", None, "Most requests per batch and signature "
                     "(default 200; smoke 2).")
flags.DEFINE_float("serving_seconds", None, "Aim per batch and signature (default 3; smoke 1).")
flags.DEFINE_integer("serving_threads", 2, "Client threads sending at once.")

PARTS = ("device", "matmul", "resnet", "pipeline", "serving")
DEFAULTS = {
    "deadline_s": (420, 240), "device_budget_s": (20, 20), "matmul_budget_s": (30, 15),
    "resnet_budget_s": (180, 90), "pipeline_budget_s": (90, 60), "serving_budget_s": (70, 40),
    "timed_loops": (2, 0), "pipeline_precision": ("mixed_bfloat16", "float32"),
    "matmul_size": (8192, 256), "matmul_chain": (10, 1), "depth": (50, 18),
    "image_size": (224, 32), "steps": (20, 2), "timed_seconds": (2.0, 1.0),
    "pipeline_images": (256, 16), "pipeline_core_batch": (32, 4),
    "pipeline_core_seconds": (8.0, 1.0), "serving_requests": (200, 2),
    "serving_seconds": (3.0, 1.0),
    "configs": ("float32:off,mixed_bfloat16:off,mixed_bfloat16:on,mixed_float16:off,"
                "float32:on,mixed_float16:on", "float32:off,mixed_float16:off,mixed_bfloat16:on"),
    "serving_batches": ("1,64", "1,4"),
}
# Seconds a run of part 3 is assumed to take before one like it has run (trace, compile, timing).
FIRST_RUN_GUESS_S = {False: 25.0, True: 50.0}
SMOKE_RUN_GUESS_S = 3.0
PRECISIONS = {"float32": "float32", "mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}


def setting(name):
    """The flag's value, or its default for this mode (--smoke or not)."""
    value = getattr(FLAGS, name)
    if value is not None:
        return value
    value = DEFAULTS[name][1 if FLAGS.smoke else 0]
    return value.split(",") if name in ("configs", "serving_batches") else value


def elapsed():
    return time.monotonic() - START


def first_lines(error, limit=600):
    text = f"{type(error).__name__}: {error}".strip()
    return text if len(text) <= limit else text[:limit] + " ..."


def finite(value):
    """JSON-safe: non-finite floats become None (and the JSON stays strict)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


class Report:
    """The result being built, the progress log, and the one JSON line printed at the end (by
    the main thread, or by the watchdog when the deadline has passed)."""

    def __init__(self, log_file, deadline_s):
        self.deadline_s = deadline_s
        self.lock = threading.Lock()
        self.emitted = False
        self.current_part = None
        self.log_error = None
        try:
            directory = os.path.dirname(os.path.abspath(log_file))
            os.makedirs(directory, exist_ok=True)
            self.log_fh = open(log_file, "w", buffering=1)
        except OSError as e:
            self.log_fh = None
            self.log_error = first_lines(e)
        self.result = {"benchmark": "accelerator", "smoke": FLAGS.smoke,
                       "command": " ".join(sys.argv), "log_file": os.path.abspath(log_file),
                       "deadline_s": deadline_s, "parts": {}}
        if self.log_error:
            self.result["log_file_error"] = self.log_error

    def time_left(self):
        return self.deadline_s - elapsed()

    def log(self, message):
        line = f"[accelerator {elapsed():6.1f}s] {message}"
        print(line, file=sys.stderr, flush=True)
        if self.log_fh:
            try:
                self.log_fh.write(line + "\n")
            except (OSError, ValueError):
                pass

    def emit(self, aborted_reason=None):
        """Prints the JSON once; later calls do nothing."""
        with self.lock:
            if self.emitted:
                return
            self.emitted = True
            result = None
            for _ in range(20):  # the main thread may be writing into it (watchdog)
                try:
                    result = copy.deepcopy(self.result)
                    break
                except RuntimeError:
                    time.sleep(0.05)
            if result is None:
                result = {"benchmark": "accelerator", "parts": {},
                          "error": "could not copy the results while they changed"}
            if aborted_reason:
                result["aborted"] = aborted_reason
                part = result["parts"].get(self.current_part)
                if part is not None and part.get("status") == "running":
                    part["status"] = "aborted"
                    part["reason"] = aborted_reason
            for name in PARTS:
                part = result["parts"].setdefault(name, {"status": "skipped"})
                if part.get("status") in (None, "running"):
                    part["status"] = "skipped"
                if part["status"] in ("skipped", "aborted") and not part.get("reason"):
                    part["reason"] = aborted_reason or "not reached"
            result["elapsed_s"] = round(elapsed(), 1)
            text = json.dumps(finite(result), allow_nan=False)
            if self.log_fh:
                try:
                    self.log_fh.write(text + "\n")
                    self.log_fh.flush()
                except (OSError, ValueError):
                    pass
            print(text, flush=True)


class Budget:
    """Seconds left to a part: its own budget and the overall deadline, whichever ends first."""

    def __init__(self, report, seconds):
        self.report = report
        self.end = time.monotonic() + seconds

    def left(self):
        return min(self.end - time.monotonic(), self.report.time_left())

    def too_little(self, needed):
        """A reason string if fewer than `needed` seconds are left, else None."""
        left = self.left()
        if left >= needed:
            return None
        which = ("the overall deadline" if self.report.time_left() <= self.end - time.monotonic()
                 else "this part's budget")
        return f"{which}: {max(left, 0):.0f} s left, a run like this needs ~{needed:.0f} s"


def run_part(report, name, fn, *args):
    """Runs fn(report, part, budget, *args) into result["parts"][name]; never raises."""
    part = {"status": "running"}
    report.result["parts"][name] = part
    report.current_part = name
    budget_s = float(setting(f"{name}_budget_s"))
    left = report.time_left()
    if budget_s <= 0:
        part.update(status="skipped", reason=f"--{name}_budget_s={budget_s:g}")
        return part
    if left < 3:
        part.update(status="skipped", reason=f"the overall deadline: {max(left, 0):.0f} s left")
        return part
    part["budget_s"] = round(min(budget_s, left), 1)
    report.log(f"part {name}: start (budget {part['budget_s']} s)")
    t0 = time.monotonic()
    try:
        fn(report, part, Budget(report, budget_s), *args)
        if part["status"] == "running":
            part["status"] = "ok"
    except Exception as e:  # noqa: BLE001  (reported, never fatal)
        part["status"] = "error"
        part["error"] = first_lines(e)
        report.log(f"part {name}: error\n{traceback.format_exc()}")
    part["seconds"] = round(time.monotonic() - t0, 1)
    report.log(f"part {name}: {part['status']} in {part['seconds']} s")
    return part


def skip_run(part, key, reason, report):
    part.setdefault("skipped_runs", {})[key] = reason
    part["status"] = "partial"
    report.log(f"  {key}: skipped ({reason})")


# ---------------------------------------------------------------------------------------------
# 1. device


def gpu_names(tf):
    return [d.name.replace("/physical_device:", "") for d in tf.config.list_physical_devices("GPU")]


def nvidia_smi():
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total,memory.free,driver_version",
         "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=15, check=True)
    rows = []
    for line in out.stdout.strip().splitlines():
        name, total, free, driver = [x.strip() for x in line.split(",")]
        rows.append({"name": name, "memory_total_mib": int(total), "memory_free_mib": int(free),
                     "driver_version": driver})
    return rows


def allocator_limits(tf):
    """{"GPU:0": bytes TensorFlow's allocator may use, ...} (device_lib: no public API says)."""
    from tensorflow.python.client import device_lib
    return {d.name.replace("/device:", ""): int(d.memory_limit)
            for d in device_lib.list_local_devices() if d.device_type == "GPU"}


def part_device(report, part, budget, tf):
    part["tensorflow_version"] = tf.__version__
    try:
        import keras
        part["keras_version"] = keras.__version__
    except Exception as e:  # noqa: BLE001
        part["keras_version_error"] = first_lines(e)
    part["python_version"] = sys.version.split()[0]
    part["host_cpu_cores"] = os.cpu_count()
    try:
        part["build_info"] = {k: v for k, v in tf.sysconfig.get_build_info().items()}
    except Exception as e:  # noqa: BLE001
        part["build_info_error"] = first_lines(e)
    part["built_with_cuda"] = tf.test.is_built_with_cuda()
    try:
        part["tf32_enabled"] = tf.config.experimental.tensor_float_32_execution_enabled()
    except Exception as e:  # noqa: BLE001
        part["tf32_error"] = first_lines(e)
    gpus = tf.config.list_physical_devices("GPU")
    part["gpus"] = []
    for gpu in gpus:
        entry = {"device": gpu.name}
        try:
            details = tf.config.experimental.get_device_details(gpu)
            entry["name"] = details.get("device_name")
            capability = details.get("compute_capability")
            entry["compute_capability"] = list(capability) if capability else None
        except Exception as e:  # noqa: BLE001
            entry["details_error"] = first_lines(e)
        part["gpus"].append(entry)
    if gpus:
        try:
            part["allocator_limit_bytes"] = allocator_limits(tf)
        except Exception as e:  # noqa: BLE001
            part["allocator_limit_error"] = first_lines(e)
        try:
            part["nvidia_smi"] = nvidia_smi()
        except Exception as e:  # noqa: BLE001
            part["nvidia_smi_error"] = first_lines(e)
        part["device"] = "GPU"
    else:
        part["device"] = "CPU"
        part["note"] = ("TensorFlow sees no GPU: everything runs on the CPU"
                        + ("" if tf.test.is_built_with_cuda() else
                           " (this TensorFlow was built without CUDA)"))
    report.log(f"  device: {part['device']} {[g.get('name') for g in part['gpus']]}, "
               f"TF {tf.__version__}, cuda {part.get('build_info', {}).get('cuda_version')}, "
               f"cudnn {part.get('build_info', {}).get('cudnn_version')}")


# ---------------------------------------------------------------------------------------------
# 2. matmul


def part_matmul(report, part, budget, tf):
    size, chain = setting("matmul_size"), setting("matmul_chain")
    part.update(size=size, chain=chain, repeats=FLAGS.matmul_repeats)
    try:
        part["tf32_enabled"] = tf.config.experimental.tensor_float_32_execution_enabled()
    except Exception as e:  # noqa: BLE001
        part["tf32_error"] = first_lines(e)
    part["gflops"] = {}
    last = 2.0
    for name, dtype in (("float32", tf.float32), ("bfloat16", tf.bfloat16),
                        ("float16", tf.float16)):
        reason = budget.too_little(last * 1.5)
        if reason:
            skip_run(part, name, reason, report)
            continue
        t0 = time.monotonic()
        try:
            gflops = benchlib.matmul_gflops(tf, size, dtype, FLAGS.matmul_repeats, chain)
            part["gflops"][name] = round(gflops, 1)
            report.log(f"  matmul {name} {size}^2: {gflops:,.0f} GFLOP/s")
        except Exception as e:  # noqa: BLE001
            part.setdefault("errors", {})[name] = first_lines(e)
            part["status"] = "partial"
            report.log(f"  matmul {name}: {first_lines(e)}")
        last = time.monotonic() - t0


# ---------------------------------------------------------------------------------------------
# 3. ResNet steps


def run_config(cfg, precision="float32", jit=False, batch=8, dataset="fashion_mnist",
               augment_on_device=False):
    return cfg.RunConfig(
        data=cfg.DataConfig(dataset=dataset, image_size=setting("image_size")),
        encoder=cfg.EncoderConfig(resnet_depth=setting("depth")),
        augment=cfg.AugmentConfig(augment_on_device=augment_on_device),
        train=cfg.TrainConfig(train_batch_size=batch, train_steps=1000, jit_compile=jit,
                              precision=PRECISIONS[precision], summary_images=0))


class Policy:
    """The global Keras dtype policy for a run (as simclr_tf.run sets it), float32 after."""

    def __init__(self, precision):
        self.precision = precision

    def __enter__(self):
        import keras
        keras.config.set_dtype_policy(self.precision)

    def __exit__(self, *exc):
        import keras
        keras.config.set_dtype_policy("float32")


def release(tf):
    import keras
    keras.backend.clear_session()
    gc.collect()


def synthetic_full_loop(tf, config, batch, uint8):
    """A callable(steps) running `steps` `Pretrainer` replica steps on one synthetic batch that
    stays on the device: views (uint8=False) or a uint8 batch whose views the step makes."""
    from simclr_tf import data as data_lib
    from simclr_tf import pretrain
    from simclr_tf.schedules import make_schedule
    strategy = tf.distribute.get_strategy()
    schedule = make_schedule(config.train, config.optimizer, 1_000_000)
    trainer = pretrain.Pretrainer(config, strategy, schedule, num_classes=10)
    size = config.data.image_size
    labels = tf.random.uniform([batch], 0, 10, tf.int32)
    if uint8:
        side = config.augment.augment_input_size
        feed = {data_lib.IMAGE: tf.cast(tf.random.uniform([batch, side, side, 3], 0, 256,
                                                          tf.int32), tf.uint8),
                data_lib.SEED: tf.constant([1, 2], tf.int64), data_lib.LABEL: labels}
    else:
        feed = {data_lib.VIEW_A: tf.random.uniform([batch, size, size, 3]),
                data_lib.VIEW_B: tf.random.uniform([batch, size, size, 3]),
                data_lib.LABEL: labels}
    # As loop.compiled_train_loop, but the batch is a tensor argument already on the device
    # (an iterator over a host dataset would copy it in every step).
    step_fn = trainer.replica_step
    if config.train.jit_compile:
        step_fn = tf.function(step_fn, jit_compile=True)

    @tf.function
    def loop(batch_tensors, steps):
        loss = tf.constant(0.0)
        for _ in tf.range(steps):
            loss = tf.cast(strategy.run(step_fn, args=(batch_tensors,))["loss"], tf.float32)
        return loss

    return lambda steps: loop(feed, tf.constant(steps)).numpy()


def make_run(tf, cfg, precision, jit, kind, batch):
    """callable(steps) for one run of part 3, built under the run's dtype policy."""
    config = run_config(cfg, precision, jit, batch)
    with Policy(precision):
        if kind == "bare":
            return benchlib.bare_encoder_loop(tf, tf.distribute.get_strategy(), config, batch,
                                              1, jit)[0]
        return synthetic_full_loop(tf, config, batch, uint8=(kind == "full_uint8"))


def timed_run(report, budget, call, batch, warm=False):
    """Warm-up (unless `warm`), one timed step, then up to --timed_loops loops of as many steps
    as fit in --timed_seconds, while the budget allows; the fastest seconds per step count."""
    t0 = time.monotonic()
    if not warm:
        call(1)
    warm_s = time.monotonic() - t0
    t0 = time.monotonic()
    call(1)
    best = one = time.monotonic() - t0  # seconds per step
    steps = int(max(1, min(setting("steps"), setting("timed_seconds") / max(one, 1e-6))))
    loops = []
    for _ in range(setting("timed_loops")):
        if budget.left() < 1.5 * steps * best + 2:
            break
        t0 = time.monotonic()
        call(steps)
        loops.append(steps)
        best = min(best, (time.monotonic() - t0) / steps)
    examples = batch / best
    return {"examples_per_sec": round(examples, 2), "views_per_sec": round(2 * examples, 2),
            "step_ms": round(1000 * best, 2), "timed_loops_steps": [1] + loops,
            "first_call_s": round(warm_s, 1)}


def gpu_memory_peak(tf, device):
    return tf.config.experimental.get_memory_info(device)["peak"]


def find_batch(report, part, budget, tf, cfg, on_gpu):
    """The global batch, and (if it was built to verify it) the float32 full step at it."""
    search = part["batch_search"] = {}
    if FLAGS.batch:
        search["method"] = "--batch"
        return FLAGS.batch, None
    if not on_gpu:
        search["method"] = "--smoke_batch (no GPU: no memory statistics)"
        return FLAGS.smoke_batch, None
    device = "GPU:0"
    probe = FLAGS.probe_batch
    peaks = {}
    for batch in (probe, 2 * probe):
        config = run_config(cfg, "float32", False, batch)
        loop, encoder = benchlib.bare_encoder_loop(tf, tf.distribute.get_strategy(), config,
                                                   batch, 1, False)
        loop()  # trace; the peak below is that of a warm step
        tf.config.experimental.reset_memory_stats(device)
        loop()
        peaks[batch] = gpu_memory_peak(tf, device)
        del loop, encoder
        release(tf)
    per_example = max((peaks[2 * probe] - peaks[probe]) / probe, 1.0)
    fixed = max(peaks[probe] - per_example * probe, 0)
    limit = allocator_limits(tf)[device]
    usable = FLAGS.memory_fraction * limit - fixed
    estimate = max(int(usable / per_example), 1)
    batch = min(2 ** int(math.log2(estimate)), FLAGS.max_batch)
    search.update(method="memory estimate, verified by a float32 full step",
                  probe_peaks_bytes={str(k): v for k, v in peaks.items()},
                  bytes_per_example_bare=round(per_example), fixed_bytes=round(fixed),
                  allocator_limit_bytes=limit, memory_fraction=FLAGS.memory_fraction,
                  estimated_batch=estimate, tries=[])
    report.log(f"  batch search: {per_example / 2**20:.1f} MiB/example (bare float32), "
               f"limit {limit / 2**30:.1f} GiB -> estimate {estimate}, try {batch}")
    for _ in range(FLAGS.batch_tries):
        t0 = time.monotonic()
        try:
            call = make_run(tf, cfg, "float32", False, "full", batch)
            call(1)
            search["tries"].append({"batch": batch, "fits": True,
                                    "seconds": round(time.monotonic() - t0, 1)})
            return batch, call
        except (tf.errors.ResourceExhaustedError, tf.errors.InternalError) as e:
            if not (isinstance(e, tf.errors.ResourceExhaustedError)
                    or "memory" in str(e).lower() or "OOM" in str(e)):
                raise
            search["tries"].append({"batch": batch, "fits": False, "error": first_lines(e, 200),
                                    "seconds": round(time.monotonic() - t0, 1)})
            report.log(f"  batch {batch}: out of memory, halving")
            call = None
            release(tf)
            batch //= 2
            if batch < 1:
                break
    raise RuntimeError(f"no batch fitted in {FLAGS.batch_tries} tries: {search['tries']}")


def part_resnet(report, part, budget, tf, cfg, on_gpu, shared):
    part.update(model=f"resnet{setting('depth')}", image_size=setting("image_size"),
                kinds=list(FLAGS.kinds))
    try:
        part["tf32_enabled"] = tf.config.experimental.tensor_float_32_execution_enabled()
    except Exception as e:  # noqa: BLE001
        part["tf32_error"] = first_lines(e)
    try:
        batch, verified = find_batch(report, part, budget, tf, cfg, on_gpu)
    except Exception as e:  # noqa: BLE001
        tried = [t["batch"] for t in part["batch_search"].get("tries", [])]
        batch = max(1, min([FLAGS.fallback_batch] + [b // 2 for b in tried]))
        verified = None
        part["batch_search"].update(error=first_lines(e), fallback=batch)
        report.log(f"  batch search failed, batch {batch}: {first_lines(e, 300)}\n"
                   f"{traceback.format_exc()}")
        release(tf)
    part["global_batch"] = shared["batch"] = batch
    part["views_per_step"] = 2 * batch
    try:
        import keras
        from simclr_tf import models
        f = models.build_encoder(run_config(cfg).encoder, setting("image_size"), False)
        part["gflop_per_example"] = round(
            3 * 2 * benchlib.forward_flops_per_view(f, keras) / 1e9, 3)
        del f
    except Exception as e:  # noqa: BLE001
        part["gflop_per_example_error"] = first_lines(e)
    part["runs"] = []
    cost = {}
    guess = FIRST_RUN_GUESS_S if on_gpu else {False: SMOKE_RUN_GUESS_S, True: SMOKE_RUN_GUESS_S}
    for item in setting("configs"):
        try:
            precision, xla = item.split(":")
            jit = {"on": True, "off": False}[xla]
            PRECISIONS[precision]  # noqa: B018  (KeyError names it)
        except (ValueError, KeyError):
            skip_run(part, item, "not precision:on|off with precision in "
                     f"{sorted(PRECISIONS)}", report)
            continue
        for kind in FLAGS.kinds:
            key = f"{precision}:{xla}:{kind}"
            reused = verified if (precision, jit, kind) == ("float32", False, "full") else None
            reason = budget.too_little(cost.get((jit, kind), guess[jit]))
            if reason:
                skip_run(part, key, reason, report)
                continue
            t0 = time.monotonic()
            run = {"precision": precision, "xla": jit, "kind": kind}
            try:
                call = reused or make_run(tf, cfg, precision, jit, kind, batch)
                with Policy(precision):
                    run.update(timed_run(report, budget, call, batch, warm=reused is not None))
                if "gflop_per_example" in part:
                    run["tflops"] = round(
                        run["examples_per_sec"] * part["gflop_per_example"] / 1e3, 2)
                report.log(f"  {key}: {run['examples_per_sec']:,.1f} examples/s "
                           f"({run['views_per_sec']:,.1f} views/s, {run['step_ms']} ms/step, "
                           f"first call {run['first_call_s']} s)")
            except Exception as e:  # noqa: BLE001
                run["error"] = first_lines(e)
                part["status"] = "partial"
                report.log(f"  {key}: error {first_lines(e, 300)}\n{traceback.format_exc()}")
            run["seconds"] = round(time.monotonic() - t0, 1)
            cost[(jit, kind)] = max(cost.get((jit, kind), 0), run["seconds"])
            part["runs"].append(run)
            shared.setdefault("runs", {})[key] = run
            call = None
            if reused is not None:
                verified = None
            release(tf)
    if not any("examples_per_sec" in r for r in part["runs"]):
        part["status"] = "error" if part["runs"] else "skipped"
        part.setdefault("reason", "no run of part 3 completed")


# ---------------------------------------------------------------------------------------------
# 4. host pipeline against --augment_on_device


def write_images(directory, count, image_size):
    """`count` photo-like JPEGs and PNGs of varying sizes (256-300 px at 224; scaled to the view
    side), in two class sub-folders."""
    import numpy as np
    import tensorflow as tf
    rng = np.random.default_rng(0)
    low, high = round(image_size * 256 / 224), round(image_size * 300 / 224)
    for i in range(count):
        h, w = rng.integers(low, high + 1, 2)
        ramp = np.add.outer(np.arange(h), np.arange(w))[..., None]
        pixels = ((ramp * rng.uniform(0.2, 1.0, 3) + rng.normal(0, 12, (h, w, 3)) + 40 * i)
                  % 256).astype(np.uint8)
        folder = os.path.join(directory, "class_a" if i % 2 else "class_b")
        os.makedirs(folder, exist_ok=True)
        if i % 4 == 3:
            data, name = tf.io.encode_png(pixels).numpy(), f"{i:04d}.png"
        else:
            data, name = tf.io.encode_jpeg(pixels, quality=90).numpy(), f"{i:04d}.jpg"
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)


def pipeline_per_core(report, tf, cfg, dataset, precision, budget):
    """Views/s of the host pipeline alone, on one thread."""
    from simclr_tf import pretrain
    batch = setting("pipeline_core_batch")
    config = run_config(cfg, precision, False, batch, dataset=dataset)
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
    dataset = pretrain.make_dataset_fn(config)(tf.distribute.InputContext(), 0).with_options(
        options)
    iterator = iter(dataset)
    for _ in range(2):
        next(iterator)  # traces, XLA compiles, fills the shuffle buffer
    aim = min(setting("pipeline_core_seconds"), max(budget.left() / 3, 0.5))
    t0 = time.monotonic()
    batches = 0
    while batches < 2 or time.monotonic() - t0 < aim:
        next(iterator)
        batches += 1
    seconds = time.monotonic() - t0
    return {"batch": batch, "batches": batches,
            "views_per_sec_per_core": round(2 * batch * batches / seconds, 2),
            "threading": "private_threadpool_size=1, max_intra_op_parallelism=1"}


def part_pipeline(report, part, budget, tf, cfg, shared):
    precision, jit = setting("pipeline_precision"), FLAGS.pipeline_xla
    if precision not in PRECISIONS:
        raise ValueError(f"--pipeline_precision={precision!r}: one of {sorted(PRECISIONS)}")
    batch = shared.get("batch") or FLAGS.batch or (FLAGS.smoke_batch if FLAGS.smoke else 128)
    with tempfile.TemporaryDirectory(prefix="accelerator_images_") as directory:
        count = setting("pipeline_images")
        write_images(directory, count, setting("image_size"))
        dataset = "folder:" + directory
        part.update(images=count, global_batch=batch, precision=precision, xla=jit,
                    image_sides=[round(setting("image_size") * s / 224) for s in (256, 300)])
        report.log(f"  wrote {count} images; batch {batch}, {precision}, xla {jit}")
        strategy = tf.distribute.get_strategy()
        for key, on_device in (("host_pipeline", False), ("augment_on_device", True)):
            guess = SMOKE_RUN_GUESS_S if FLAGS.smoke else FIRST_RUN_GUESS_S[jit]
            reason = budget.too_little(guess)
            if reason:
                skip_run(part, key, reason, report)
                continue
            t0 = time.monotonic()
            try:
                config = run_config(cfg, precision, jit, batch, dataset=dataset,
                                    augment_on_device=on_device)
                cfg.validate(config)
                with Policy(precision):
                    call = benchlib.full_step_loop(tf, strategy, config, 1)[0]
                    part[key] = timed_run(report, budget, call, batch)
                report.log(f"  {key}: {part[key]['views_per_sec']:,.1f} views/s")
            except Exception as e:  # noqa: BLE001
                part[key] = {"error": first_lines(e)}
                part["status"] = "partial"
                report.log(f"  {key}: error {first_lines(e, 300)}\n{traceback.format_exc()}")
            part[key]["seconds"] = round(time.monotonic() - t0, 1)
            call = None
            release(tf)
        reason = budget.too_little(5)
        if reason:
            skip_run(part, "per_core", reason, report)
        else:
            try:
                part["per_core"] = pipeline_per_core(report, tf, cfg, dataset, precision, budget)
                report.log(f"  host pipeline alone, one thread: "
                           f"{part['per_core']['views_per_sec_per_core']:,.1f} views/s")
            except Exception as e:  # noqa: BLE001
                part["per_core"] = {"error": first_lines(e)}
                part["status"] = "partial"
    per_core = part.get("per_core", {}).get("views_per_sec_per_core")
    unfed = shared.get("runs", {}).get(f"{precision}:{'on' if jit else 'off'}:full", {})
    if unfed.get("views_per_sec") and shared.get("batch") == batch:
        step, basis = unfed["views_per_sec"], f"part 3's {precision} full step on synthetic views"
    else:
        step = part.get("augment_on_device", {}).get("views_per_sec")
        basis = "this part's --augment_on_device step"
    if per_core and step:
        part["host_cores_needed"] = round(step / per_core, 2)
        part["host_cores_needed_basis"] = basis
        part["step_views_per_sec"] = step
        report.log(f"  host cores needed: {part['host_cores_needed']} ({basis})")
    if "host_pipeline" not in part and "augment_on_device" not in part:
        part["status"] = "skipped"
        part.setdefault("reason", "no run of part 4 fitted")


# ---------------------------------------------------------------------------------------------
# 5. serving


def part_serving(report, part, budget, tf, cfg):
    import keras
    from simclr_tf import augment, export, models
    image_size, depth = setting("image_size"), setting("depth")
    jpeg_side = 224 if image_size > 32 else 48
    part.update(model=f"resnet{depth}", image_size=image_size, jpeg_side=jpeg_side,
                threads=FLAGS.serving_threads, results=[])
    keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(0)
    reason = budget.too_little(SMOKE_RUN_GUESS_S if FLAGS.smoke else 20)
    if reason:
        part.update(status="skipped", reason=f"export and load: {reason}")
        return
    with tempfile.TemporaryDirectory(prefix="accelerator_export_") as directory:
        config = cfg.RunConfig(data=cfg.DataConfig(image_size=image_size),
                               encoder=cfg.EncoderConfig(resnet_depth=depth))
        t0 = time.monotonic()
        version_dir = export.export_encoder(models.build_float32_encoder(config.encoder),
                                            directory, 1, config)
        part["export_s"] = round(time.monotonic() - t0, 1)
        signatures = tf.saved_model.load(version_dir).signatures
        release(tf)
        report.log(f"  exported and loaded in {time.monotonic() - t0:.1f} s")
        for batch in (int(b) for b in setting("serving_batches")):
            row = {"batch": batch}
            part["results"].append(row)
            files = tf.constant(benchlib.photo_jpegs(batch, jpeg_side), tf.string)
            images = augment.preprocess_for_eval(
                tf.stack([tf.io.decode_jpeg(f) for f in files]), image_size,
                crop=augment.eval_crop(image_size))
            for name, kwargs in ((export.SERVING_DEFAULT, {export.IMAGES: images}),
                                 (export.SERVING_BYTES, {export.IMAGE_BYTES: files})):
                reason = budget.too_little(3)
                if reason:
                    row[name] = {"skipped": reason}
                    skip_run(part, f"{name}@{batch}", reason, report)
                    continue
                try:
                    signature = signatures[name]

                    def call():
                        # .numpy() waits for the device, as a server answering would.
                        next(iter(signature(**kwargs).values())).numpy()
                    t0 = time.monotonic()
                    call()  # first call: tracing, autotuning
                    first = time.monotonic() - t0
                    t0 = time.monotonic()
                    call()
                    one = max(time.monotonic() - t0, 1e-6)
                    aim = min(setting("serving_seconds"), max(budget.left() / 4, 0.2))
                    count = int(max(2, min(setting("serving_requests"),
                                           aim * FLAGS.serving_threads / one)))
                    seconds = benchlib.timed_load(call, count, FLAGS.serving_threads)
                    row[name] = {"requests": count,
                                 "requests_per_sec": round(count / seconds, 2),
                                 "images_per_sec": round(count * batch / seconds, 1),
                                 "first_call_s": round(first, 2)}
                    report.log(f"  {name} batch {batch}: {count / seconds:,.1f} requests/s")
                except Exception as e:  # noqa: BLE001
                    row[name] = {"error": first_lines(e)}
                    part["status"] = "partial"
                    report.log(f"  {name} batch {batch}: error {first_lines(e, 300)}")


# ---------------------------------------------------------------------------------------------


def main(_):
    deadline = float(setting("deadline_s"))
    report = Report(FLAGS.log_file, deadline)
    require_gpu = (not FLAGS.smoke) if FLAGS.require_gpu is None else FLAGS.require_gpu
    report.result["budgets_s"] = {name: setting(f"{name}_budget_s") for name in PARTS}

    def on_deadline():
        report.log(f"watchdog: {deadline + FLAGS.watchdog_grace_s:.0f} s passed, "
                   f"printing what was measured")
        report.emit(aborted_reason=f"watchdog at {deadline + FLAGS.watchdog_grace_s:.0f} s "
                    f"(--deadline_s + --watchdog_grace_s) stopped part "
                    f"{report.current_part!r} while it ran")
        os._exit(0)

    watchdog = threading.Timer(max(deadline + FLAGS.watchdog_grace_s - elapsed(), 1), on_deadline)
    watchdog.daemon = True
    watchdog.start()
    report.log(f"start: {' '.join(sys.argv)}; deadline {deadline:.0f} s")
    try:
        import simclr_tf  # noqa: F401  (before TensorFlow: its oneDNN setting)
        import tensorflow as tf
        from simclr_tf import config as cfg
    except Exception as e:  # noqa: BLE001
        report.result["error"] = f"import failed: {first_lines(e)}"
        report.log(traceback.format_exc())
        for name in PARTS:
            report.result["parts"][name] = {"status": "skipped",
                                            "reason": f"import failed: {first_lines(e, 200)}"}
        report.emit()
        return
    report.log(f"TensorFlow {tf.__version__} imported")
    device = run_part(report, "device", part_device, tf)
    try:
        on_gpu = bool(tf.config.list_physical_devices("GPU"))
    except Exception:  # noqa: BLE001
        on_gpu = False
    report.result["on_gpu"] = on_gpu
    shared = {}
    parts = (("matmul", part_matmul, (tf,)),
             ("resnet", part_resnet, (tf, cfg, on_gpu, shared)),
             ("pipeline", part_pipeline, (tf, cfg, shared)),
             ("serving", part_serving, (tf, cfg)))
    for name, fn, args in parts:
        if require_gpu and not on_gpu:
            report.result["parts"][name] = {
                "status": "skipped",
                "reason": "TensorFlow sees no GPU (" + device.get("note", "see part device")
                + "); --norequire_gpu runs this part on the CPU"}
            continue
        run_part(report, name, fn, *args)
    report.current_part = None
    watchdog.cancel()
    report.log("done")
    report.emit()


if __name__ == "__main__":
    app.run(main)
