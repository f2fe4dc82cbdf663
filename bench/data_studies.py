"""Small versions of Cole et al.'s four data studies on Fashion-MNIST, offline: SimCLR against the
supervised baseline of the same budget, a table and a plot per study.

    python bench/data_studies.py --study=quantity [--steps=500 --batch_size=64 --size=16]
    python bench/data_studies.py --study=quality --out_dir=docs/data_studies

Cole, Yang, Wilber, Mac Aodha, Belongie, "When Does Contrastive Visual Representation Learning
Work?" (CVPR 2022). Every run is `python -m simclr_tf.run` with the project's flags, so a study is
also a recipe for asking the same question of your own data:

* quantity: pretrain on `--train_examples` N (nested subsets); SimCLR is scored by the linear
  evaluation (logistic regression on frozen h of the first `--labelled` training images); the
  supervised baseline trains f from scratch on the same N images with their labels;
* quality: pretrain on corrupted images (`--corrupt`: none, downsample:4, jpeg:10,
  salt_pepper:0.2, blur:1.5), evaluate on clean ones; the baseline trains on the corrupted images;
* domain: Fashion-MNIST's classes split into two domains, clothing (T-shirt, trouser, pullover,
  dress, coat, shirt) and footwear + bags (sandal, sneaker, bag, ankle boot), written once as image
  folders; SimCLR pretrains on footwear + bags, on clothing, or on both pooled (the union
  `--dataset=footwear_bags+clothing`), and is evaluated on footwear + bags (`--eval_dataset`);
  the baseline trains on footwear + bags;
* granularity: one SimCLR and one supervised run, both scored at the 10 fine classes and at the
  6 coarse ones of `--label_map=fashion_mnist_coarse`.

Every run has the same steps, batch and image size (`--steps`, `--batch_size`, `--size`; the
supervised baseline's batch is the same number of images, without the second view). Writes
`<out_dir>/<study>.json`, `<study>.md` (the table) and `<study>.svg` (the plot), and prints one
JSON line at the end. Single seed and minutes of training: a difference of a point or two is
within the noise; report what shows, and what does not. At the defaults (500 steps of 64 images
at 16 px) a study takes about an hour on 2 cores. Finished runs are kept in `--work_dir` and
reused when a run's flags match (granularity reuses quality's uncorrupted runs; two processes
can share the quality study with `--corruptions`); delete it to train afresh.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the domain study writes its folders with simclr_tf in this process
CLOTHING = (0, 1, 2, 3, 4, 6)
FOOTWEAR_AND_BAGS = (5, 7, 8, 9)
CORRUPTIONS = ("none", "downsample:4", "jpeg:10", "salt_pepper:0.2", "blur:1.5")
STUDIES = ("quantity", "quality", "domain", "granularity")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", required=True, choices=STUDIES)
    parser.add_argument("--steps", type=int, default=500,
                        help="training steps of every run (500: about an hour a study here)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--size", type=int, default=16, help="image side in pixels")
    parser.add_argument("--labelled", type=int, default=5000,
                        help="training images the linear evaluation fits (and kNN's bank)")
    parser.add_argument("--test_examples", type=int, default=2000)
    parser.add_argument("--quantities", default="1000,5000,20000,60000")
    parser.add_argument("--corruptions", default=",".join(CORRUPTIONS),
                        help="the quality study's rows (a subset lets two processes share it: "
                             "finished runs are kept, so a last full run only reads them)")
    parser.add_argument("--out_dir", default=os.path.join(ROOT, "docs", "data_studies"))
    parser.add_argument("--work_dir", default="/tmp/simclr_tf/data_studies")
    return parser.parse_args(argv)


def run_cli(args, name, *flags):
    """One `python -m simclr_tf.run --mode=train_then_eval` in `<work_dir>/<name>`; its
    results.json. A finished run with the same flags already in `work_dir` is kept, or copied
    from another name (the granularity study's two runs are the quality study's uncorrupted ones),
    instead of trained again: delete `work_dir` to train everything afresh."""
    model_dir = os.path.join(args.work_dir, name)
    common = [
        "--mode=train_then_eval", "--dataset=fashion_mnist", f"--image_size={args.size}",
        "--resnet_depth=18", "--cifar_stem=true", f"--train_batch_size={args.batch_size}",
        f"--train_steps={args.steps}", "--steps_per_loop=10",
        f"--checkpoint_steps={args.steps}", "--warmup_epochs=0.02", "--seed=0",
        f"--eval_split=test[:{args.test_examples}]", f"--knn_bank_size={args.labelled}",
        "--eval_batch_size=500", "--projector_examples=0", "--neighbour_queries=0"]
    all_flags = [*common, *flags]
    t0 = time.time()
    earlier = _same_run(args.work_dir, all_flags)
    if earlier != model_dir:
        shutil.rmtree(model_dir, ignore_errors=True)
    if earlier:
        if earlier != model_dir:
            shutil.copytree(earlier, model_dir)
        with open(os.path.join(model_dir, "bench_run.json")) as f:
            results = json.load(f)["results"]
    else:
        done = subprocess.run([sys.executable, "-m", "simclr_tf.run", *all_flags,
                               f"--model_dir={model_dir}"], cwd=ROOT, capture_output=True,
                              text=True,
                              env=dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2"))
        if done.returncode != 0:
            raise SystemExit(f"run {name} failed:\n{done.stderr[-3000:]}")
        with open(os.path.join(model_dir, "results.json")) as f:
            results = json.load(f)
        results["seconds"] = round(time.time() - t0)
        with open(os.path.join(model_dir, "bench_run.json"), "w") as f:
            json.dump({"flags": all_flags, "results": results}, f)
    print(json.dumps({"run": name, "copied_from": earlier and os.path.basename(earlier),
                      **{k: results.get(k) for k in ("linear_top1", "knn_top1", "top1",
                                                     "seconds")}}), flush=True)
    return results


def _same_run(work_dir, flags):
    """The directory of a finished run in `work_dir` with exactly these flags, or None."""
    for entry in sorted(os.listdir(work_dir)) if os.path.isdir(work_dir) else ():
        record = os.path.join(work_dir, entry, "bench_run.json")
        if os.path.exists(record):
            with open(record) as f:
                if json.load(f)["flags"] == flags:
                    return os.path.join(work_dir, entry)
    return None


def simclr(args, name, *flags):
    """SimCLR pretraining, scored by the linear evaluation (and kNN) of frozen h."""
    return run_cli(args, name, "--eval_protocols=knn,linear", "--lineareval_while_pretraining=false",
                   *flags)


def supervised(args, name, *flags):
    """f trained from scratch with labels (train_mode=finetune without --checkpoint)."""
    return run_cli(args, name, "--train_mode=finetune", "--optimizer=momentum",
                   "--learning_rate=0.1", "--weight_decay=1e-4", *flags)


def quantity(args):
    rows = []
    for n in [int(q) for q in args.quantities.split(",")]:
        ours = simclr(args, f"quantity_simclr_{n}", f"--train_examples={n}")
        theirs = supervised(args, f"quantity_supervised_{n}", f"--train_examples={n}")
        rows.append({"pretraining images": n, "SimCLR linear": ours["linear_top1"],
                     "SimCLR kNN": ours["knn_top1"], "supervised": theirs["top1"]})
    return rows


def quality(args):
    rows = []
    for corruption in args.corruptions.split(","):
        flags = [] if corruption == "none" else [f"--corrupt={corruption}"]
        tag = corruption.replace(":", "_")
        ours = simclr(args, f"quality_simclr_{tag}", *flags)
        theirs = supervised(args, f"quality_supervised_{tag}", *flags)
        rows.append({"corruption": corruption, "SimCLR linear": ours["linear_top1"],
                     "SimCLR kNN": ours["knn_top1"], "supervised": theirs["top1"]})
    return rows


def domain_folders(args):
    """Fashion-MNIST's two domains as image folders with train/ and test/ splits."""
    from simclr_tf import data as data_lib  # first: it turns on oneDNN before TensorFlow loads
    import numpy as np
    import tensorflow as tf

    root = os.path.join(args.work_dir, "domains")
    folders = {"clothing": CLOTHING, "footwear_bags": FOOTWEAR_AND_BAGS}
    if os.path.exists(os.path.join(root, "done")):
        return {name: f"folder:{os.path.join(root, name)}" for name in folders}
    info = data_lib.dataset_info("fashion_mnist", "train")
    for split in ("train", "test"):
        images, _ = data_lib.load_images("fashion_mnist", split)
        counts = {}
        for image, label in images.as_numpy_iterator():
            for name, classes in folders.items():
                if int(label) in classes:
                    directory = os.path.join(root, name, split, info.class_names[label]
                                             .replace("/", "_"))
                    os.makedirs(directory, exist_ok=True)
                    index = counts.setdefault((name, int(label)), 0)
                    counts[(name, int(label))] += 1
                    tf.io.write_file(os.path.join(directory, f"{index:05d}.png"),
                                     tf.io.encode_png(np.asarray(image)))
    open(os.path.join(root, "done"), "w").close()
    return {name: f"folder:{os.path.join(root, name)}" for name in folders}


def domain(args):
    folders = domain_folders(args)
    target = folders["footwear_bags"]
    # The whole of footwear + bags' train split as the bank: a folder is read class by class,
    # so its first --labelled images would all be ankle boots.
    on_target = [f"--eval_dataset={target}", "--eval_dataset_train_split=train",
                 "--eval_dataset_split=test", "--knn_bank_size=0"]
    rows = []
    for tag, pretraining, dataset in (
            ("footwear", "footwear + bags (same domain)", target),
            ("clothing", "clothing (other domain)", folders["clothing"]),
            ("both", "both, pooled (--dataset=a+b)", f"{target}+{folders['clothing']}")):
        ours = simclr(args, f"domain_simclr_{tag}", f"--dataset={dataset}",
                      "--train_split=train", *on_target)
        rows.append({"pretrained on": pretraining, "SimCLR linear": ours["linear_top1"],
                     "SimCLR kNN": ours["knn_top1"]})
    theirs = supervised(args, "domain_supervised", f"--dataset={target}", "--train_split=train",
                        "--eval_split=test")
    rows.append({"pretrained on": "supervised on footwear + bags", "supervised": theirs["top1"]})
    return rows


def granularity(args):
    ours = simclr(args, "granularity_simclr")
    theirs = supervised(args, "granularity_supervised")
    coarse = "--label_map=fashion_mnist_coarse"
    rows = [{"labels": "fine (10 classes)", "SimCLR linear": ours["linear_top1"],
             "SimCLR kNN": ours["knn_top1"], "supervised": theirs["top1"]}]
    ours_coarse = evaluate_again(args, "granularity_simclr", coarse,
                                 "--eval_protocols=knn,linear")
    theirs_coarse = evaluate_again(args, "granularity_supervised", coarse)
    rows.append({"labels": "coarse (6 kinds)", "SimCLR linear": ours_coarse["linear_top1"],
                 "SimCLR kNN": ours_coarse["knn_top1"], "supervised": theirs_coarse["top1"]})
    return rows


def evaluate_again(args, name, *flags):
    """`--mode=eval` of a finished run with other evaluation flags."""
    model_dir = os.path.join(args.work_dir, name)
    done = subprocess.run(
        [sys.executable, "-m", "simclr_tf.run", "--mode=eval", f"--model_dir={model_dir}",
         f"--eval_split=test[:{args.test_examples}]", f"--knn_bank_size={args.labelled}",
         "--eval_batch_size=500", "--projector_examples=0", "--neighbour_queries=0", *flags],
        cwd=ROOT, capture_output=True, text=True,
        env=dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2"))
    if done.returncode != 0:
        raise SystemExit(f"evaluating {name} failed:\n{done.stderr[-3000:]}")
    with open(os.path.join(model_dir, "results.json")) as f:
        return json.load(f)


def table(rows):
    """A markdown table of the rows, accuracies in %."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [row.get(c) for c in columns]
        lines.append("| " + " | ".join(
            "" if v is None else f"{100 * v:.1f}" if isinstance(v, float) else str(v)
            for v in cells) + " |")
    return "\n".join(lines)


def svg_bars(rows, title):
    """Grouped bars of every accuracy column per row, as a small SVG (no plotting library)."""
    label = next(iter(rows[0]))
    series = [k for k in dict.fromkeys(k for row in rows for k in row) if k != label]
    colours = ("#4c72b0", "#55a868", "#c44e52", "#8172b2")
    width, height, left, bottom = 120 * len(rows) + 80, 300, 50, 250
    bar = 90 / max(len(series), 1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 40}" '
             'font-family="sans-serif" font-size="11">',
             f'<text x="{left}" y="15" font-size="13">{title}</text>']
    for tick in range(0, 101, 20):
        y = bottom - 2 * tick
        parts.append(f'<line x1="{left}" x2="{width - 10}" y1="{y}" y2="{y}" stroke="#ddd"/>'
                     f'<text x="{left - 30}" y="{y + 4}">{tick}%</text>')
    for i, row in enumerate(rows):
        x0 = left + 10 + 120 * i
        for j, name in enumerate(series):
            value = row.get(name)
            if value is not None:
                h = 200 * value
                parts.append(f'<rect x="{x0 + j * bar:.1f}" y="{bottom - h:.1f}" '
                             f'width="{bar - 2:.1f}" height="{h:.1f}" fill="{colours[j % 4]}"/>')
        parts.append(f'<text x="{x0}" y="{bottom + 15}">{str(row[label])[:18]}</text>')
    for j, name in enumerate(series):
        parts.append(f'<rect x="{left + 150 * j}" y="{height + 5}" width="10" height="10" '
                     f'fill="{colours[j % 4]}"/><text x="{left + 150 * j + 14}" '
                     f'y="{height + 14}">{name}</text>')
    return "\n".join(parts + ["</svg>"])


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    t0 = time.time()
    rows = {"quantity": quantity, "quality": quality, "domain": domain,
            "granularity": granularity}[args.study](args)
    evaluation = (f"linear evaluation on {args.labelled} labelled images, {args.test_examples} "
                  "test images")
    if args.study == "domain":
        evaluation = ("evaluated on footwear + bags: linear evaluation on its 24,000 training "
                      "images, its 4,000 test images")
    setting = (f"Fashion-MNIST, ResNet-18 (CIFAR stem), {args.size} px, batch {args.batch_size}, "
               f"{args.steps} steps per run, {evaluation}")
    out = os.path.join(args.out_dir, args.study)
    with open(f"{out}.json", "w") as f:
        json.dump({"study": args.study, "setting": setting, "rows": rows}, f, indent=2)
    with open(f"{out}.md", "w") as f:
        f.write(f"{args.study} study: {setting}\n\n{table(rows)}\n")
    with open(f"{out}.svg", "w") as f:
        f.write(svg_bars(rows, f"{args.study}: top-1 on Fashion-MNIST test"))
    print(table(rows))
    print(json.dumps({"study": args.study, "setting": setting, "rows": rows,
                      "minutes": round((time.time() - t0) / 60, 1)}))


if __name__ == "__main__":
    main()
