"""A small version of one of the paper's ablation studies, with a table of linear-eval accuracy.

    python bench/ablation.py --study=loss --budget_minutes=30
    python bench/ablation.py --study=augmentation --variants=crop,crop+color,color+crop
    python bench/ablation.py --study=temperature --steps=200 --size=24

Each study is `flags/ablations/<study>.flags` (the same flagfile `python -m simclr_tf.run` takes)
plus one list of flag overrides per variant (the rows of the paper's table; see STUDIES). Every
variant pretrains from the same seed on Fashion-MNIST with the small-scale overrides below
(ResNet-18, CIFAR stem, `--size`, `--batch_size`, no online probe, no checkpoints), then f is
frozen and evaluated on h (not z, as in the paper): the fast linear evaluation of
`simclr_tf.linear_eval` (logistic regression on h of `--eval_train_examples` training images,
L2 strength picked on a held-out 10%) and kNN, both on `--eval_test_examples` test images.

Steps: `--steps`, or, when 0, as many as fit in `--budget_minutes` for the whole study: the
first variant is timed for a few steps first, and every variant gets the same number of steps.
Trends at this scale are noisy (a single seed, minutes of training): a difference of a point or
two is within the noise; the paper's large gaps (no head vs a head, NT-Xent vs the margin loss,
crop+colour vs single transforms) should show.

Prints one JSON line per variant as it finishes and the table at the end.
"""

import gc
import json
import math
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402

from simclr_tf import run  # noqa: E402  (defines the training flags the flagfiles set)

flags.DEFINE_string("study", "loss", "loss, temperature, head, augmentation or supcon.")
flags.DEFINE_string("variants", None,
                    "Comma-separated variant names of the study, or 'all'; default: the study's "
                    "default list (all rows, except the augmentation grid: diagonal + crop row).")
flags.DEFINE_float("budget_minutes", 30.0, "Wall-clock budget of the whole study.")
flags.DEFINE_integer("steps", 0, "Pretraining steps per variant; 0: from the budget.")
flags.DEFINE_integer("batch_size", 64, "Global pretraining batch (images).")
flags.DEFINE_integer("size", 16, "View side in pixels (16-28 on Fashion-MNIST's 28 px).")
flags.DEFINE_integer("eval_train_examples", 5000, "Training images the linear classifier sees.")
flags.DEFINE_integer("eval_test_examples", 2000, "Test images evaluated.")
flags.DEFINE_string("output_json", None, "Also write the results to this file.")
FLAGS = flags.FLAGS

# The bench's own flags, kept when the training flags are re-parsed for each variant.
BENCH_FLAGS = ("study", "variants", "budget_minutes", "steps", "batch_size", "size",
               "eval_train_examples", "eval_test_examples", "output_json")

AUGMENTATIONS = ("crop", "cutout", "color", "sobel", "noise", "blur", "rotate")


def _augmentation_variants():
    """Figure 5's grid: one transform (diagonal) or two in sequence (row first, then column)."""
    variants = {}
    for first in AUGMENTATIONS:
        for second in AUGMENTATIONS:
            names = (first,) if first == second else (first, second)
            variants["+".join(names)] = [f"--augmentations={','.join(names)}"]
    return variants


# study -> {variant name: flag overrides on top of flags/ablations/<study>.flags}
STUDIES = {
    "loss": {
        "nt_xent": ["--loss=nt_xent"],
        "nt_logistic": ["--loss=nt_logistic"],
        "nt_logistic_sh": ["--loss=nt_logistic", "--semi_hard_negatives"],
        "margin_triplet": ["--loss=margin_triplet"],
        "margin_triplet_sh": ["--loss=margin_triplet", "--semi_hard_negatives"],
    },
    "temperature": {
        **{f"norm_{t}": ["--hidden_norm=true", f"--temperature={t}"]
           for t in ("0.05", "0.1", "0.5", "1")},
        **{f"no_norm_{t}": ["--hidden_norm=false", f"--temperature={t}"] for t in ("10", "100")},
    },
    "head": {
        "none": ["--proj_head_mode=none"],
        **{f"{mode}_{dim}": [f"--proj_head_mode={mode}", f"--proj_out_dim={dim}"]
           for mode in ("linear", "nonlinear") for dim in (32, 128, 512)},
    },
    "augmentation": _augmentation_variants(),
    "supcon": {
        "nt_xent": ["--loss=nt_xent"],
        "supcon": ["--loss=supcon"],
    },
}
DEFAULT_VARIANTS = {
    "augmentation": [a for a in AUGMENTATIONS] + [f"crop+{a}" for a in AUGMENTATIONS[1:]],
}

TIMING_STEPS = 4
EVAL_BATCH = 256
LINEAR_FIT_SECONDS = 10.0  # the 5 logistic-regression fits of linear_eval.linear_eval_fast, about


def small_overrides(steps):
    """Applied after the flagfile and before the variant's own flags."""
    return [f"--image_size={FLAGS.size}", "--resnet_depth=18", "--width_multiplier=1",
            "--cifar_stem=true", f"--train_batch_size={FLAGS.batch_size}",
            f"--train_steps={steps}", "--steps_per_loop=5", "--warmup_epochs=0.02",
            "--lineareval_while_pretraining=false", "--seed=0",
            "--model_dir=/tmp/simclr_tf/bench_ablation"]  # nothing is written there


def variant_config(study, overrides, steps):
    """The RunConfig of one variant: flagfile, small-scale overrides, then the variant's flags."""
    from simclr_tf import config as cfg
    bench = {name: getattr(FLAGS, name) for name in BENCH_FLAGS}
    flagfile = os.path.join("flags", "ablations", f"{study}.flags")
    argv = [sys.argv[0], f"--flagfile={flagfile}", *small_overrides(steps), *overrides]
    FLAGS.unparse_flags()
    FLAGS(argv)
    for name, value in bench.items():
        setattr(FLAGS, name, value)
    config = run.config_from_flags()
    cfg.validate(config)
    return config


def build(config, tf, keras):
    """A fresh f and g from the config's seed, their compiled loop and the input iterator."""
    from simclr_tf import data as data_lib
    from simclr_tf import pretrain as pretrain_lib
    from simclr_tf.schedules import make_schedule

    keras.utils.set_random_seed(config.train.seed)
    strategy = tf.distribute.get_strategy()
    info = data_lib.dataset_info(config.data.dataset, config.data.train_split,
                                 config.data.data_dir)
    schedule = make_schedule(config.train, config.optimizer, info.num_examples)
    trainer = pretrain_lib.Pretrainer(config, strategy, schedule, num_classes=0)
    dataset_fn = pretrain_lib.make_dataset_fn(config)
    dataset = strategy.distribute_datasets_from_function(
        lambda context: dataset_fn(context, config.train.seed))
    return trainer, trainer.make_train_loop(), iter(dataset)


def pretrain(config, steps, tf, keras):
    """Pretrains a fresh f and g for `steps` steps; returns (trainer, last metrics, seconds)."""
    t0 = time.perf_counter()
    trainer, loop, iterator = build(config, tf, keras)
    done, metrics = 0, {}
    while done < steps:
        chunk = min(config.train.steps_per_loop, steps - done)
        metrics = {k: float(v) for k, v in loop(iterator, tf.constant(chunk)).items()}
        done += chunk
    return trainer, metrics, time.perf_counter() - t0


def eval_batches(config, split):
    from simclr_tf import augment
    from simclr_tf import data as data_lib
    return data_lib.eval_dataset(config.data.dataset, split, EVAL_BATCH, config.data.image_size,
                                 data_dir=config.data.data_dir,
                                 crop=augment.eval_crop(config.data.image_size))


def features_fn(trainer):
    return lambda images: trainer.encoder(images, training=False)


def evaluate(trainer, config, num_classes):
    """Linear-eval and kNN top-1 of frozen h on the test split."""
    from simclr_tf import evaluate as evaluate_lib
    from simclr_tf import knn as knn_lib
    from simclr_tf import linear_eval

    features = features_fn(trainer)
    train_h, train_y = evaluate_lib.extract(features, eval_batches(config, config.data.train_split),
                                            FLAGS.eval_train_examples)
    test_h, test_y = evaluate_lib.extract(features, eval_batches(config, config.data.eval_split),
                                          FLAGS.eval_test_examples)
    linear = linear_eval.linear_eval_fast(train_h, train_y, test_h, test_y, num_classes,
                                           seed=config.train.seed)
    knn = knn_lib.knn_predict_scores(test_h, train_h, train_y, num_classes)
    return {"linear_top1": linear["linear_top1"],
            "knn_top1": linear_eval.topk_accuracy(knn, test_y, 1)}


def steps_from_budget(study, names, tf, keras):
    """Steps per variant that fit the budget, from timing the first variant."""
    t0 = time.perf_counter()
    config = variant_config(study, STUDIES[study][names[0]], 1000)
    trainer, loop, iterator = build(config, tf, keras)
    float(loop(iterator, tf.constant(1))["loss"])  # trace and compile
    overhead = time.perf_counter() - t0
    t1 = time.perf_counter()
    float(loop(iterator, tf.constant(TIMING_STEPS))["loss"])
    step_seconds = (time.perf_counter() - t1) / TIMING_STEPS
    # Evaluation: every `extract` call traces anew, so one and two batches give the per-call
    # start-up and the per-image time; the evaluation makes two calls (train and test split).
    from simclr_tf import evaluate as evaluate_lib

    def extract_seconds(batches):
        start = time.perf_counter()
        evaluate_lib.extract(features_fn(trainer), eval_batches(config, config.data.eval_split),
                             batches * EVAL_BATCH)
        return time.perf_counter() - start

    one, two = extract_seconds(1), extract_seconds(2)
    per_image = max(two - one, 0.0) / EVAL_BATCH
    start_up = max(one - EVAL_BATCH * per_image, 0.0)
    eval_images = FLAGS.eval_train_examples + FLAGS.eval_test_examples
    eval_seconds = 2 * start_up + per_image * eval_images + LINEAR_FIT_SECONDS
    per_variant = (FLAGS.budget_minutes * 60.0 - (time.perf_counter() - t0)) / len(names)
    steps = int((per_variant - overhead - eval_seconds) / step_seconds)
    print(json.dumps({"timing": {"step_seconds": round(step_seconds, 3),
                                 "overhead_seconds": round(overhead, 1),
                                 "eval_seconds_estimate": round(eval_seconds, 1),
                                 "steps_per_variant": steps}}), flush=True)
    if steps < 10:
        raise SystemExit(f"--budget_minutes={FLAGS.budget_minutes} leaves {steps} steps per "
                         f"variant for {len(names)} variants: raise it, or pick fewer --variants")
    return steps


def print_table(study, rows):
    print(f"\n{study} study (Fashion-MNIST, ResNet-18, {rows[0]['image_size']} px, batch "
          f"{FLAGS.batch_size}, {rows[0]['steps']} steps per variant)\n")
    print("| variant | flags | final loss | contrast acc | linear top-1 | kNN top-1 | seconds |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | `{' '.join(r['flags'])}` | {r['loss']:.3f} | "
              f"{r['contrast_acc']:.3f} | {100 * r['linear_top1']:.1f} | "
              f"{100 * r['knn_top1']:.1f} | {r['seconds']:.0f} |")
    if study == "augmentation":
        cells = {r["variant"]: r["linear_top1"] for r in rows}
        print("\nlinear top-1 by 1st transformation (rows) and 2nd (columns); diagonal: alone\n")
        print("| 1st \\ 2nd | " + " | ".join(AUGMENTATIONS) + " |")
        print("|---" * (len(AUGMENTATIONS) + 1) + "|")
        for first in AUGMENTATIONS:
            values = []
            for second in AUGMENTATIONS:
                key = first if first == second else f"{first}+{second}"
                values.append(f"{100 * cells[key]:.1f}" if key in cells else "")
            print(f"| {first} | " + " | ".join(values) + " |")


def main(argv):
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments {argv[1:]}")
    if FLAGS.study not in STUDIES:
        raise SystemExit(f"--study must be one of {sorted(STUDIES)}, got {FLAGS.study!r}")
    os.chdir(ROOT)  # the flagfiles name flags/fashion_mnist.flags relative to the repository
    study = FLAGS.study
    if FLAGS.variants == "all":
        names = list(STUDIES[study])
    elif FLAGS.variants:
        names = [name.strip() for name in FLAGS.variants.split(",")]
    else:
        names = DEFAULT_VARIANTS.get(study, list(STUDIES[study]))
    unknown = [name for name in names if name not in STUDIES[study]]
    if unknown:
        raise SystemExit(f"unknown variants {unknown} of --study={study}: choose from "
                         f"{', '.join(STUDIES[study])}")
    bench_batch_size = FLAGS.batch_size
    import keras
    import tensorflow as tf
    from simclr_tf import data as data_lib

    steps = FLAGS.steps or steps_from_budget(study, names, tf, keras)
    rows = []
    for name in names:
        overrides = STUDIES[study][name]
        config = variant_config(study, overrides, steps)
        info = data_lib.dataset_info(config.data.dataset, config.data.train_split,
                                     config.data.data_dir)
        trainer, metrics, seconds = pretrain(config, steps, tf, keras)
        t0 = time.perf_counter()
        if math.isfinite(metrics["loss"]):
            results = evaluate(trainer, config, info.num_classes)
        else:  # diverged: nothing to evaluate
            results = {"linear_top1": math.nan, "knn_top1": math.nan}
        row = {"study": study, "variant": name, "flags": overrides, "steps": steps,
               "image_size": config.data.image_size, "batch_size": bench_batch_size,
               "loss": metrics["contrast_loss"], "contrast_acc": metrics["contrast_acc"],
               **results, "seconds": seconds + time.perf_counter() - t0}
        print(json.dumps(row), flush=True)
        rows.append(row)
        del trainer
        keras.backend.clear_session()
        gc.collect()
    print_table(study, rows)
    if FLAGS.output_json:
        with open(FLAGS.output_json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    app.run(main)
