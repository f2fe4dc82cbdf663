"""Representation quality on Fashion-MNIST, with the baselines needed to judge it; one JSON line.

    python bench/quality.py                        # the benchmark: budget 18 min per trained model
    python bench/quality.py --budget_minutes=2     # a quick check of the machinery
    python bench/quality.py --lines=simclr --temperature=0.1   # one line, e.g. to try a setting
    python bench/quality.py --budget_minutes=0.2 --batch=8 --eval_examples=200    # smoke run

Everything runs in this one process, in this order, on the offline Fashion-MNIST (train: 60,000
images, test: 10,000), all accuracies top-1 on the whole test split unless named otherwise. Every
encoder line is trained on 16 px views and evaluated on the images at their own 28 px
(`--eval_image_size`; the encoder is fully convolutional): random resized crops enlarge objects
in training, so a larger test size matches them better (Touvron et al. 2019, "Fixing the
train-test resolution discrepancy"):

1. raw pixels: the fast linear evaluation (multinomial logistic regression, L2 picked on a held-out
   10% of train) on the 28x28 pixels, and cosine kNN (k=200, tau=0.1) on them.
2. random encoder: the encoder below with its initial weights (batch-norm moving statistics
   estimated on 30 batches of training images): fast linear evaluation and kNN of h.
3. SimCLR: pretraining of ResNet-18 (CIFAR stem) on 16 px views for `--budget_minutes` of training
   time (LARS, batch 256, no blur: the paper's small-image recipe, but tau 0.2: after 80 steps
   its kNN accuracy (5k bank) was 70.1-70.5% against 67.5% with the paper's 0.5, which is tuned
   for hundreds of epochs, and colour jitter 1.0, the paper's ImageNet strength: on gray images
   only brightness and contrast act, and with 0.5, the paper's CIFAR strength, the linear
   evaluation's held-out top-1 was 90.4% against 91.0%; tau 0.1 gave 89.9% and batch 128 90.4%);
   at `--curve_points` checkpoints a kNN accuracy with a 5,000-image bank (the curve), at the end
   the fast linear evaluation and kNN with the whole train split, and the linear probe trained
   during pretraining.
   With `--nocifar_stem --image_size=32 --eval_image_size=48` (the default run's encoder) the
   step is 2.8x cheaper and SimCLR runs 15 epochs in 18 minutes in bfloat16, but its linear
   evaluation was lower (89.4% against 90.4%, kNN 83.1% both; supervised frozen f 92.4% /
   91.1%; docs/quality.md, 2026-12-07), so the CIFAR stem at 16 px stays the default.
4. supervised: the same encoder plus a linear layer trained with all labels (crop + flip,
   cross-entropy, momentum SGD with weight decay) for the same time budget; its test accuracy at
   the training size (its classifier was fitted to h of 16-px images), and its f frozen and
   evaluated exactly as SimCLR's f is (`frozen_f_knn_*`, `frozen_f_linear_*`: kNN and the linear
   evaluation at the evaluation size): what SimCLR's f is judged against.

The training budget is wall-clock training time: a short calibration measures the seconds per step
of each trainer, the cosine schedule is sized to fill the budget, and a deadline stops training
(after saving) should it run slower; time spent on the curve's evaluations is not counted. The
JSON (also written to `<out_dir>/quality.json`) holds every number, the steps, epochs and minutes
actually used, the load average, and whether the targets were met (SimCLR linear eval >= 90% and
>= 5 points above the random encoder's; SimCLR's f at least the supervised f, frozen, by the
linear evaluation and by kNN, and kNN >= 88%; the whole run <= 60 min). `<out_dir>/quality.svg` plots
accuracy against training minutes for every line. `--lines` runs some of the lines only (the
targets are then judged on what ran); compare settings on the SimCLR line's
`linear_heldout_top1` (the held-out 10% of train that picks the L2), not on the test split.
`--eval_examples=N` (a smoke run, as the tests make: not the benchmark) evaluates every line on
the first N test images, with the first N training images as the bank and the logistic
regression's training set (the curve's bank too, when N < 5,000).

Cost on 2 lightly loaded cores: 2 x budget_minutes of training plus calibration, feature
extraction (2 x 70,000 images at 28 px, and the supervised test split at 16 px), logistic
regressions and curve points. The run of 2026-11-26 17:56 with `--precision=bfloat16` on a 2-core
AVX-512 EPYC took 54.5 minutes, 18.6 of them outside training; the default budget of 18 minutes
per model is sized for the whole run to stay under 60 minutes there. A slower machine evaluates
more slowly: lower --budget_minutes to stay under 60.
"""

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # simclr_tf's default; TF loads first here
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags, logging  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from simclr_tf import config as cfg  # noqa: E402
from simclr_tf import data as data_lib  # noqa: E402
from simclr_tf import checkpoints, evaluate, finetune, knn, linear_eval, loop, tasks  # noqa: E402
from simclr_tf import pretrain as pretrain_lib  # noqa: E402
from simclr_tf.preemption import Preempted  # noqa: E402
from simclr_tf.schedules import make_schedule  # noqa: E402

flags.DEFINE_float("budget_minutes", 18.0, "Training time of SimCLR, and of the supervised model.")
flags.DEFINE_string("out_dir", "/tmp/simclr_tf_quality", "Runs, quality.json and quality.svg.")
flags.DEFINE_string("data_dir", None, "tensorflow-datasets directory.")
flags.DEFINE_integer("image_size", 16, "Side of the encoder's input in training.")
flags.DEFINE_integer("eval_image_size", 28,
                     "Side of the images every encoder line is evaluated on (Fashion-MNIST's own "
                     "28; 0: image_size).")
flags.DEFINE_bool("cifar_stem", True,
                  "CIFAR stem (3x3 stride 1, no max-pool); false: the ImageNet stem (7x7 stride 2 "
                  "and max-pool), whose blocks see 1/16 of the positions at the same size.")
flags.DEFINE_integer("batch", 256, "Global batch of both trainers.")
flags.DEFINE_integer("curve_points", 4, "Evaluations during each training (the plot's points).")
flags.DEFINE_integer("seed", 0, "Seed of weights, augmentations and the held-out split.")
flags.DEFINE_float("simclr_learning_rate", 0.075, "LARS base LR (x sqrt(batch)).")
flags.DEFINE_float("temperature", 0.2, "NT-Xent temperature.")
flags.DEFINE_float("color_jitter_strength", 1.0, "Colour jitter strength.")
flags.DEFINE_float("supervised_learning_rate", 0.2, "Momentum SGD LR (x batch / 256).")
flags.DEFINE_enum("precision", "float32", ["float32", "bfloat16"],
                  "Compute precision of both trainers (Keras mixed policy, as --precision of "
                  "simclr_tf.run); evaluation models and the random encoder stay float32.")
flags.DEFINE_integer("eval_examples", 0,
                     "Smoke runs: evaluate on the first N test images with the first N training "
                     "images (bank, logistic regression); 0: the whole splits (the benchmark).")
LINES = ("raw_pixels", "random_encoder", "simclr", "supervised")
flags.DEFINE_list("lines", list(LINES), f"Lines to run, a subset of {','.join(LINES)}.")
flags.register_validator("lines", lambda names: bool(names) and set(names) <= set(LINES),
                         f"--lines takes a non-empty subset of {','.join(LINES)}")
FLAGS = flags.FLAGS

DATASET = "fashion_mnist"
NUM_CLASSES = 10
CURVE_BANK = 5000
TARGET_LINEAR = 0.90
TARGET_MARGIN = 0.05
TARGET_MINUTES = 60.0
TARGET_KNN = 0.88


class Clock:
    """Training time against a budget, excluding the pauses for evaluation."""

    def __init__(self, budget_seconds):
        self.budget = budget_seconds
        self.start = time.time()
        self.paused = 0.0

    def training_seconds(self):
        return time.time() - self.start - self.paused

    def over(self):
        return self.training_seconds() >= self.budget


@contextlib.contextmanager
def training_precision():
    """Layers built inside take --precision; those built later (evaluation) stay float32."""
    previous = keras.config.dtype_policy()
    if FLAGS.precision != "float32":
        keras.config.set_dtype_policy(f"mixed_{FLAGS.precision}")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def calibrate(loop, iterator, steps=4):
    """(seconds per step, seconds of the first call beyond that): trace, then time `steps`."""
    t0 = time.time()
    loop(iterator, tf.constant(1))["loss"].numpy()
    first = time.time() - t0
    t0 = time.time()
    loop(iterator, tf.constant(steps))["loss"].numpy()
    per_step = (time.time() - t0) / steps
    return per_step, max(first - per_step, 0.0)


def steps_for(budget_seconds, per_step, overhead):
    return max(int((budget_seconds - overhead) / per_step), 2)


def rounded(results):
    return {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in results.items()}


# --------------------------------------------------------------------------------------------
# The lines.

def raw_pixels():
    """Logistic regression and kNN on the native 28x28 pixels (one channel: they are gray)."""
    def pixels(split):
        batches = data_lib.eval_dataset(DATASET, split, 1000, 28, data_dir=FLAGS.data_dir,
                                        crop=False)
        return evaluate.extract(lambda x: tf.reshape(x[..., 0], [tf.shape(x)[0], -1]), batches,
                                FLAGS.eval_examples)

    train_x, train_y = pixels("train")
    test_x, test_y = pixels("test")
    results = linear_eval.linear_eval_fast(train_x, train_y, test_x, test_y, NUM_CLASSES,
                                        seed=FLAGS.seed)
    scores = knn.knn_predict_scores(test_x, train_x, train_y, NUM_CLASSES)
    results.update(linear_eval.accuracies(scores, test_y, "knn_"))
    return rounded(results)


def test_split():
    """The test split every line is evaluated on: all of it, or the first --eval_examples."""
    return f"test[:{FLAGS.eval_examples}]" if FLAGS.eval_examples else "test"


def simclr_config(model_dir, total_steps):
    return cfg.RunConfig(
        data=cfg.DataConfig(DATASET, FLAGS.data_dir, "train", test_split(), FLAGS.image_size,
                            cache_dataset=True),
        augment=cfg.AugmentConfig(FLAGS.color_jitter_strength, use_blur=False),
        encoder=cfg.EncoderConfig(resnet_depth=18, cifar_stem=FLAGS.cifar_stem, global_bn=False),
        head=cfg.HeadConfig("nonlinear", 2, 128),
        loss=cfg.LossConfig(temperature=FLAGS.temperature),
        optimizer=cfg.OptimizerConfig("lars", FLAGS.simclr_learning_rate, "sqrt", 0.9, 1e-6,
                                      warmup_epochs=0.1),
        train=cfg.TrainConfig(model_dir=model_dir, train_batch_size=FLAGS.batch,
                              train_steps=total_steps, steps_per_loop=5,
                              # Rounded up, so the last point is the end of training rather
                              # than a checkpoint a few steps before it.
                              checkpoint_steps=max(-(-total_steps // FLAGS.curve_points), 1),
                              keep_checkpoint_max=2, seed=FLAGS.seed, summary_images=0,
                              precision=FLAGS.precision),
        eval=cfg.EvalConfig(eval_batch_size=500, knn_bank_size=FLAGS.eval_examples,
                            eval_image_size=FLAGS.eval_image_size))


def supervised_config(model_dir, total_steps):
    base = simclr_config(model_dir, total_steps)
    return cfg.RunConfig(
        # Its own classifier is scored at the size it was trained at: its logits layer is fitted
        # to h of 16-px images, and at 28 px it scored 80.7% after 3.1 epochs (16 px: 84-86%).
        data=base.data, encoder=base.encoder,
        eval=dataclasses.replace(base.eval, eval_image_size=0),
        optimizer=cfg.OptimizerConfig("momentum", FLAGS.supervised_learning_rate, "linear", 0.9,
                                      5e-4, warmup_epochs=0.2),
        train=cfg.TrainConfig(**{**base.train.__dict__, "train_mode": "finetune"}),
        finetune=cfg.FinetuneConfig(fine_tune_after_block=-1))


def random_encoder(config):
    """f at random initialisation, its batch-norm statistics estimated on training images
    (`evaluate.random_encoder`)."""
    encoder = evaluate.random_encoder(config)
    return rounded(evaluate.evaluate_encoder(encoder, config, NUM_CLASSES, ("knn", "linear")))


def simclr():
    budget = FLAGS.budget_minutes * 60
    out = os.path.join(FLAGS.out_dir, "simclr")
    shutil.rmtree(out, ignore_errors=True)
    info = data_lib.dataset_info(DATASET, "train", FLAGS.data_dir)
    # Calibration: a throwaway trainer on the real pipeline.
    probe_config = simclr_config(out + "_calibration", 1000)
    schedule = make_schedule(probe_config.train, probe_config.optimizer, info.num_examples)
    with training_precision():
        trainer = pretrain_lib.Pretrainer(probe_config, tf.distribute.get_strategy(), schedule,
                                          NUM_CLASSES)
    dataset = pretrain_lib.make_dataset_fn(probe_config)(tf.distribute.InputContext(), FLAGS.seed)
    per_step, overhead = calibrate(trainer.make_train_loop(), iter(dataset))
    del trainer, dataset
    total = steps_for(budget, per_step, overhead)
    config = simclr_config(out, total)
    curve_config = dataclasses.replace(
        config, eval=dataclasses.replace(config.eval, knn_bank_size=min(
            CURVE_BANK, FLAGS.eval_examples or CURVE_BANK)))
    logging.info("SimCLR: %.2f s/step -> %d steps (%.2f epochs) in %.1f min", per_step, total,
                 total * FLAGS.batch / info.num_examples, FLAGS.budget_minutes)
    clock = Clock(budget)
    curve = []

    def on_checkpoint(trainer, path):
        t0 = time.time()
        minutes = round(clock.training_seconds() / 60, 2)
        step = int(trainer.step.numpy())
        r = evaluate.evaluate_encoder(trainer.encoder, curve_config, NUM_CLASSES,
                                      ("knn", "probe"), probe=trainer.probe)
        curve.append({"minutes": minutes, "step": step,
                      "epochs": round(step * FLAGS.batch / info.num_examples, 3),
                      "knn_top1": round(r["knn_top1"], 4), "probe_top1": round(r["probe_top1"], 4)})
        logging.info("SimCLR curve: %s", curve[-1])
        clock.paused += time.time() - t0

    cfg.save(config, out)
    try:
        with training_precision():
            trainer, metrics = pretrain_lib.run_pretraining(
                config, tf.distribute.get_strategy(), on_checkpoint=on_checkpoint,
                stop_requested=clock.over)
    except Preempted:  # the deadline: the last checkpoint holds the final weights
        with training_precision():
            trainer = pretrain_lib.Pretrainer(
                config, tf.distribute.get_strategy(),
                make_schedule(config.train, config.optimizer, info.num_examples), NUM_CLASSES)
        latest = checkpoints.latest(out)
        if latest:  # None when the deadline came before the first step: f at step 0
            checkpoints.restore(latest, trainer.checkpoint_items())
    train_minutes = clock.training_seconds() / 60
    steps = int(trainer.step.numpy())
    if not curve or curve[-1]["step"] != steps:
        on_checkpoint(trainer, None)
    results = evaluate.evaluate_encoder(trainer.encoder, config, NUM_CLASSES,
                                        ("knn", "linear", "probe"), probe=trainer.probe)
    results.update(steps=steps, planned_steps=total, seconds_per_step=round(per_step, 3),
                   epochs=round(steps * FLAGS.batch / info.num_examples, 3),
                   train_minutes=round(train_minutes, 2))
    return rounded(results), curve


def supervised():
    budget = FLAGS.budget_minutes * 60
    out = os.path.join(FLAGS.out_dir, "supervised")
    shutil.rmtree(out, ignore_errors=True)
    info = data_lib.dataset_info(DATASET, "train", FLAGS.data_dir)
    probe_config = supervised_config(out + "_calibration", 1000)
    schedule = tasks.task_for(probe_config).schedule(probe_config)
    with training_precision():
        trainer = finetune.Finetuner(probe_config, tf.distribute.get_strategy(), schedule,
                                     NUM_CLASSES)
    dataset = finetune.make_dataset_fn(probe_config, None)(tf.distribute.InputContext(),
                                                           FLAGS.seed)
    per_step, overhead = calibrate(trainer.make_train_loop(), iter(dataset))
    del trainer, dataset
    total = steps_for(budget, per_step, overhead)
    config = supervised_config(out, total)
    logging.info("Supervised: %.2f s/step -> %d steps (%.2f epochs)", per_step, total,
                 total * FLAGS.batch / info.num_examples)
    clock = Clock(budget)
    curve = []
    last = {}

    def on_checkpoint(trainer, path):
        t0 = time.time()
        minutes = round(clock.training_seconds() / 60, 2)
        step = int(trainer.step.numpy())
        r = last[step] = evaluate.evaluate_classifier(trainer.model, config)
        curve.append({"minutes": minutes, "step": step,
                      "epochs": round(step * FLAGS.batch / info.num_examples, 3),
                      "top1": round(r["top1"], 4)})
        logging.info("Supervised curve: %s", curve[-1])
        clock.paused += time.time() - t0

    cfg.save(config, out)
    schedule = tasks.task_for(config).schedule(config)
    with training_precision():
        trainer = finetune.Finetuner(config, tf.distribute.get_strategy(), schedule,
                                     NUM_CLASSES)
    try:
        loop.run(trainer, config, tf.distribute.get_strategy(),
                 finetune.make_dataset_fn(config, None), on_checkpoint=on_checkpoint,
                 stop_requested=clock.over)
    except Preempted:
        pass  # the deadline; the trainer holds the last weights
    train_minutes = clock.training_seconds() / 60
    steps = int(trainer.step.numpy())
    if not curve or curve[-1]["step"] != steps:
        on_checkpoint(trainer, None)
    results = dict(last[steps])  # the last curve point is the final model
    # Its f, frozen, under SimCLR's evaluation (size, bank, protocols): the like-for-like line.
    frozen = evaluate.evaluate_encoder(trainer.model.encoder, simclr_config(out + "_frozen", 1),
                                       NUM_CLASSES, ("knn", "linear"))
    results.update({f"frozen_f_{k}": v for k, v in frozen.items()
                    if k.startswith(("knn_", "linear_"))})
    results.update(steps=steps, planned_steps=total, seconds_per_step=round(per_step, 3),
                   epochs=round(steps * FLAGS.batch / info.num_examples, 3),
                   train_minutes=round(train_minutes, 2))
    return rounded(results), curve


# --------------------------------------------------------------------------------------------
# The plot: a small hand-written SVG (no plotting dependency).

def svg_plot(report):
    width, height, left, right, top, bottom = 640, 400, 60, 190, 20, 45
    values = [0.5]
    curves = report["curves"]
    simclr_curve = [(p["minutes"], p["knn_top1"]) for p in curves.get("simclr", [])]
    sup_curve = [(p["minutes"], p["top1"]) for p in curves.get("supervised", [])]
    # The baselines are not trained: dashed lines across the whole plot.
    budget = max([FLAGS.budget_minutes] + [x for x, _ in simclr_curve + sup_curve]
                 + ([report["simclr"]["train_minutes"]] if "simclr" in report else []))
    lines = []
    if simclr_curve:
        lines.append(("SimCLR kNN (5k bank)", "#1f77b4", simclr_curve, False))
    if sup_curve:
        lines.append(("supervised", "#d62728", sup_curve, False))
    if "simclr" in report:
        lines.append(("SimCLR linear (end)", "#1f77b4",
                      [(report["simclr"]["train_minutes"], report["simclr"]["linear_top1"])],
                      False))
    for key, name, colour in (("random_encoder", "random encoder linear", "#7f7f7f"),
                              ("raw_pixels", "raw pixels linear", "#2ca02c")):
        if key in report:
            accuracy = report[key]["linear_top1"]
            lines.append((name, colour, [(0, accuracy), (budget, accuracy)], True))
    for _, _, points, _ in lines:
        values += [y for _, y in points]
    y_min = max(0.0, min(values) - 0.02)
    y_max = 1.0
    x_max = budget

    def xy(x, y):
        px = left + (width - left - right) * x / x_max
        py = top + (height - top - bottom) * (1 - (y - y_min) / (y_max - y_min))
        return f"{px:.1f},{py:.1f}"

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             'font-family="sans-serif" font-size="11">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<polyline points="{xy(0, y_max)} {xy(0, y_min)} {xy(x_max, y_min)}" '
             'fill="none" stroke="black"/>']
    for i in range(6):
        y = y_min + (y_max - y_min) * i / 5
        parts.append(f'<text x="{left - 6}" y="{xy(0, y).split(",")[1]}" text-anchor="end">'
                     f'{100 * y:.0f}%</text>')
        x = x_max * i / 5
        px, py = xy(x, y_min).split(",")
        parts.append(f'<text x="{px}" y="{float(py) + 14}" text-anchor="middle">{x:.1f}</text>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 8}" '
                 'text-anchor="middle">training minutes (2 CPU cores)</text>')
    parts.append(f'<text x="{left}" y="12">Fashion-MNIST test top-1</text>')
    for i, (name, colour, points, dashed) in enumerate(lines):
        dash = ' stroke-dasharray="5,4"' if dashed else ""
        if len(points) > 1:
            parts.append(f'<polyline points="{" ".join(xy(x, y) for x, y in points)}" '
                         f'fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        for x, y in points[1:] if dashed else points:
            px, py = xy(x, y).split(",")
            marker = "rect" if "linear (end)" in name else "circle"
            parts.append(f'<rect x="{float(px) - 4}" y="{float(py) - 4}" width="8" height="8" '
                         f'fill="{colour}"/>' if marker == "rect" else
                         f'<circle cx="{px}" cy="{py}" r="3" fill="{colour}"/>')
        ly = top + 16 * i + 10
        lx = width - right + 12
        parts.append(f'<line x1="{lx}" y1="{ly}" x2="{lx + 18}" y2="{ly}" stroke="{colour}" '
                     f'stroke-width="2"{dash}/>')
        parts.append(f'<text x="{lx + 24}" y="{ly + 4}">{name}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def targets(report, total_minutes):
    """The issue's targets, each judged only when the lines it needs ran."""
    met = {}
    if "simclr" in report:
        met["simclr_linear_ge_90"] = report["simclr"]["linear_top1"] >= TARGET_LINEAR
    if "simclr_minus_random_linear" in report:
        met["simclr_5_points_above_random"] = (report["simclr_minus_random_linear"]
                                               >= TARGET_MARGIN)
    if "simclr" in report:
        met["simclr_knn_ge_88"] = report["simclr"]["knn_top1"] >= TARGET_KNN
    if "simclr" in report and "supervised" in report:
        simclr, supervised = report["simclr"], report["supervised"]
        met["simclr_linear_ge_supervised_frozen_f"] = (simclr["linear_top1"]
                                                       >= supervised["frozen_f_linear_top1"])
        met["simclr_knn_ge_supervised_frozen_f"] = (simclr["knn_top1"]
                                                    >= supervised["frozen_f_knn_top1"])
    if set(report["lines"]) == set(LINES):
        met["total_le_60_minutes"] = total_minutes <= TARGET_MINUTES
    return met


def main(_):
    t_start = time.time()
    load_start = os.getloadavg()
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    data_lib.dataset_info(DATASET, "train", FLAGS.data_dir)  # prepares it offline if needed
    base = simclr_config(os.path.join(FLAGS.out_dir, "unused"), 1)
    report = {"benchmark": "quality", "dataset": DATASET, "image_size": FLAGS.image_size,
              "eval_image_size": evaluate.eval_image_size(base),
              "encoder": "resnet18x1" + ("_cifar_stem" if FLAGS.cifar_stem else ""),
              "batch": FLAGS.batch,
              "temperature": FLAGS.temperature,
              "color_jitter_strength": FLAGS.color_jitter_strength, "precision": FLAGS.precision,
              "budget_minutes_per_model": FLAGS.budget_minutes,
              "eval_examples": FLAGS.eval_examples}
    timings = {}

    def timed(name, fn, *args):
        t0 = time.time()
        out = fn(*args)
        timings[name] = round((time.time() - t0) / 60, 2)
        logging.info("%s done in %.1f min", name, timings[name])
        return out

    report["lines"] = [name for name in LINES if name in FLAGS.lines]
    report["curves"] = {}
    if "raw_pixels" in FLAGS.lines:
        report["raw_pixels"] = timed("raw_pixels", raw_pixels)
    if "random_encoder" in FLAGS.lines:
        report["random_encoder"] = timed("random_encoder", random_encoder, base)
    if "simclr" in FLAGS.lines:
        report["simclr"], report["curves"]["simclr"] = timed("simclr", simclr)
    if "supervised" in FLAGS.lines:
        report["supervised"], report["curves"]["supervised"] = timed("supervised", supervised)
    total_minutes = (time.time() - t_start) / 60
    if "simclr" in report and "random_encoder" in report:
        report["simclr_minus_random_linear"] = round(
            report["simclr"]["linear_top1"] - report["random_encoder"]["linear_top1"], 4)
    report["targets"] = targets(report, total_minutes)
    report["minutes"] = {**timings, "total": round(total_minutes, 2)}
    report["machine"] = {"cpus": os.cpu_count(), "load_average_start": load_start[0],
                         "load_average_end": os.getloadavg()[0],
                         "tensorflow": tf.__version__}
    line = json.dumps(report, sort_keys=True)
    with open(os.path.join(FLAGS.out_dir, "quality.json"), "w") as f:
        f.write(line + "\n")
    with open(os.path.join(FLAGS.out_dir, "quality.svg"), "w") as f:
        f.write(svg_plot(report))
    print(line)


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)
    app.run(main)
