"""Every benchmark script in bench/ runs, at the smallest sizes its flags allow, and prints the
JSON its README / docs tables are made from: the expected keys, every number finite, and the
relations that must hold whatever the machine's speed (counts as asked, accuracies in [0, 1],
ratios that match the figures they divide). Each bench runs as the README runs it, in its own
process (`python bench/<name>.py ...` from the repository root); the figures themselves (speed,
accuracy after two steps) are not judged."""
import json
import math
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 600  # seconds; generous: another job may share the 2 cores


def run_bench(script, tmp_path, *args):
    """Runs bench/<script> with `args`; returns its stdout (fails on a non-zero exit)."""
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2", TMPDIR=str(tmp_path))
    done = subprocess.run([sys.executable, os.path.join("bench", script), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, f"bench/{script} failed:\n{done.stderr[-5000:]}"
    return done.stdout


def last_json(stdout):
    """The one JSON line a bench prints last."""
    lines = stdout.strip().splitlines()
    assert lines, "the bench printed nothing"
    return json.loads(lines[-1])


def json_lines(stdout):
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def non_finite(value, path="$"):
    """Paths of every number in `value` (recursively) that is NaN or infinite."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [] if math.isfinite(value) else [f"{path} = {value}"]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in non_finite(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in non_finite(v, f"{path}[{i}]")]
    return []


def assert_finite(value):
    bad = non_finite(value)
    assert not bad, f"non-finite numbers: {bad}"


def assert_fraction(value, name=""):
    assert isinstance(value, (int, float)) and 0.0 <= value <= 1.0, f"{name} = {value!r}"


def close(a, b, rel=0.02, abs_tol=0.011):
    """Equal up to the benches' rounding of both sides."""
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_tol)


# --------------------------------------------------------------------------------------------

ABLATION_ROW = {"study", "variant", "flags", "steps", "image_size", "batch_size", "loss",
                "contrast_acc", "linear_top1", "knn_top1", "seconds"}


def test_ablation(tmp_path):
    out = tmp_path / "ablation.json"
    stdout = run_bench("ablation.py", tmp_path, "--study=loss",
                       "--variants=nt_xent,nt_logistic_sh", "--steps=2", "--batch_size=8",
                       "--size=8", "--eval_train_examples=200", "--eval_test_examples=100",
                       f"--output_json={out}")
    # One JSON line per variant as it finishes, then the markdown table.
    rows = json_lines(stdout)
    assert [r["variant"] for r in rows] == ["nt_xent", "nt_logistic_sh"]
    assert [r["flags"] for r in rows] == [["--loss=nt_xent"],
                                          ["--loss=nt_logistic", "--semi_hard_negatives"]]
    for row in rows:
        assert set(row) == ABLATION_ROW
        assert_finite(row)
        assert (row["study"], row["steps"], row["image_size"], row["batch_size"]) == (
            "loss", 2, 8, 8)
        for key in ("contrast_acc", "linear_top1", "knn_top1"):
            assert_fraction(row[key], key)
        assert row["seconds"] > 0
    assert json.loads(out.read_text()) == rows
    assert "| nt_logistic_sh | `--loss=nt_logistic --semi_hard_negatives` |" in stdout


PROFILE_STAGES = {"uint8 to float", "crop + resize", "flip", "jitter: hue pass (HSV round trip)",
                  "jitter: one linear pass (of 6)",
                  "colour distortion (jitter p 0.8, grayscale p 0.2)", "whole view",
                  "whole view, the pipeline's way", "whole view, XLA", "XLA's largest difference"}
PIPELINE_STAGES = ("crop + resize", "flip", "colour distortion")


def test_augment_profile(tmp_path):
    result = last_json(run_bench("augment_profile.py", tmp_path, "--quick"))
    assert set(result) == {"ms_per_view", "threads", "quick"}
    assert_finite(result)
    assert result["threads"] == 1 and result["quick"] is True
    figures = result["ms_per_view"]
    assert set(figures) == {"32px", "224px"}
    # --quick: 16 images at 32 px (one chunk: the whole batch), 8 at 224 px (chunks of 4).
    for case, rows, blur in (("32px", 16, False), ("224px", 4, True)):
        stages = figures[case]
        expected = PROFILE_STAGES | {f"pipeline, chunk of {rows}: {s}" for s in PIPELINE_STAGES}
        if blur:
            expected.add("blur (p 0.5)")
            blurred = [k for k in stages if k.startswith(f"pipeline, chunk of {rows}: blur")]
            assert len(blurred) == 1, sorted(stages)
            drawn = re.fullmatch(rf"pipeline, chunk of {rows}: blur, per blurred image "
                                 rf"\((\d+) of {rows}\)", blurred[0])
            assert drawn and 0 <= int(drawn.group(1)) <= rows, blurred[0]
            expected.add(blurred[0])
        assert set(stages) == expected, case
        assert 0.0 <= stages.pop("XLA's largest difference") <= 1.0  # views are in [0, 1]
        assert all(ms > 0 for ms in stages.values()), stages


AUGMENT_PIPELINES = ("original", "graph", "xla_stages", "device", "xla")
AUGMENT_VARYING = ("original", "per_image", "pipeline")


def augment_throughput_keys():
    keys = {"benchmark", "threads", "repeats", "quick", "machine_matmul_peak_gflops_estimate",
            "cores", "step_max_views_per_sec_r18_32px", "step_max_views_per_sec_r50_224px"}
    ours = AUGMENT_PIPELINES[1:]
    for size in ("32px", "224px"):
        keys.add(f"batch_{size}")
        keys |= {f"views_per_sec_{size}_{p}" for p in AUGMENT_PIPELINES}
        keys |= {f"ratio_{size}_{p}_over_original" for p in ours}
        keys |= {f"ratio_{size}_{p}_over_step_max" for p in ours}
    keys |= {f"views_per_sec_224px_varying_{p}" for p in AUGMENT_VARYING}
    keys |= {f"ratio_224px_varying_{p}_over_original" for p in AUGMENT_VARYING[1:]}
    keys |= {f"cores_to_feed_one_gpu_224px_{p}" for p in AUGMENT_PIPELINES}
    return keys


def test_augment_throughput(tmp_path):
    r = last_json(run_bench("augment_throughput.py", tmp_path, "--quick", "--repeats=1"))
    assert set(r) == augment_throughput_keys()
    assert_finite(r)
    assert (r["benchmark"], r["threads"], r["repeats"], r["quick"]) == (
        "augment_throughput", 1, 1, True)
    assert (r["batch_32px"], r["batch_224px"]) == (8, 2)
    assert r["cores"] == os.cpu_count()
    rates = {k: v for k, v in r.items() if k.startswith("views_per_sec_")}
    assert all(v > 0 for v in rates.values()), rates
    for size, model in (("32px", "r18_32px"), ("224px", "r50_224px")):
        original = r[f"views_per_sec_{size}_original"]
        step_max = r[f"step_max_views_per_sec_{model}"]
        assert step_max > 0
        for p in AUGMENT_PIPELINES[1:]:
            rate = r[f"views_per_sec_{size}_{p}"]
            assert close(r[f"ratio_{size}_{p}_over_original"], rate / original), (size, p)
            assert close(r[f"ratio_{size}_{p}_over_step_max"], rate / step_max), (size, p)
    for p in AUGMENT_VARYING[1:]:
        assert close(r[f"ratio_224px_varying_{p}_over_original"],
                     r[f"views_per_sec_224px_varying_{p}"]
                     / r["views_per_sec_224px_varying_original"]), p
    for p in AUGMENT_PIPELINES:
        assert close(r[f"cores_to_feed_one_gpu_224px_{p}"],
                     2000 / r[f"views_per_sec_224px_{p}"], abs_tol=0.06), p


def test_data_studies(tmp_path):
    out_dir, work_dir = tmp_path / "out", tmp_path / "work"
    stdout = run_bench("data_studies.py", tmp_path, "--study=quality", "--corruptions=jpeg:10",
                       "--steps=2", "--batch_size=8", "--size=8", "--labelled=200",
                       "--test_examples=100", f"--out_dir={out_dir}", f"--work_dir={work_dir}")
    result = last_json(stdout)
    assert set(result) == {"study", "setting", "rows", "minutes"}
    assert_finite(result)
    assert result["study"] == "quality"
    assert "8 px, batch 8, 2 steps per run" in result["setting"]
    assert "200 labelled images, 100 test images" in result["setting"]
    assert result["minutes"] >= 0
    [row] = result["rows"]
    assert set(row) == {"corruption", "SimCLR linear", "SimCLR kNN", "supervised"}
    assert row["corruption"] == "jpeg:10"
    for key in ("SimCLR linear", "SimCLR kNN", "supervised"):
        assert_fraction(row[key], key)
    # One line per training run before the table: both trained here, none reused.
    runs = [line for line in json_lines(stdout) if "run" in line]
    assert [line["run"] for line in runs] == ["quality_simclr_jpeg_10",
                                              "quality_supervised_jpeg_10"]
    assert all(line["copied_from"] is None for line in runs)
    written = json.loads((out_dir / "quality.json").read_text())
    assert written["rows"] == result["rows"] and written["setting"] == result["setting"]
    assert "| jpeg:10 |" in (out_dir / "quality.md").read_text()
    assert (out_dir / "quality.svg").read_text().startswith("<svg")


def test_loss_memory(tmp_path):
    batch, dim = 64, 8
    r = last_json(run_bench("loss_memory.py", tmp_path, f"--batch={batch}", f"--dim={dim}"))
    assert set(r) == {"benchmark", "global_batch", "dim", "runs"}
    assert_finite(r)
    assert (r["benchmark"], r["global_batch"], r["dim"]) == ("loss_memory", batch, dim)
    assert [run["replicas"] for run in r["runs"]] == [1, 4, 8]
    for run in r["runs"]:
        assert set(run) == {"replicas", "peak_growth_mib", "per_replica_logits_shape",
                            "traced_concat_shapes", "per_replica_logits_mib"}
        n = batch // run["replicas"]
        assert run["per_replica_logits_shape"] == [2 * n, 2 * batch]
        assert run["per_replica_logits_mib"] == round(2 * n * 2 * batch * 4 / 2 ** 20, 1)
        assert run["peak_growth_mib"] >= 0
        # The traced logits: against all 2N views, never more rows than the replica's 2n.
        assert run["traced_concat_shapes"], run
        for rows, columns in run["traced_concat_shapes"]:
            assert columns == 2 * batch and rows <= 2 * n, run


QUALITY_KEYS = {"benchmark", "dataset", "image_size", "eval_image_size", "encoder", "batch",
                "temperature", "color_jitter_strength", "precision", "budget_minutes_per_model",
                "eval_examples", "lines", "curves", "raw_pixels", "random_encoder", "simclr",
                "supervised", "simclr_minus_random_linear", "targets", "minutes", "machine"}
LINEAR = {"linear_top1", "linear_top5", "linear_heldout_top1", "linear_train_top1", "linear_l2"}
TRAINED = {"steps", "planned_steps", "seconds_per_step", "epochs", "train_minutes"}


def test_quality(tmp_path):
    out_dir = tmp_path / "quality"
    stdout = run_bench("quality.py", tmp_path, "--budget_minutes=0.2", "--image_size=8",
                       "--eval_image_size=0", "--batch=8", "--eval_examples=200",
                       "--curve_points=1", f"--out_dir={out_dir}")
    r = last_json(stdout)
    assert set(r) == QUALITY_KEYS
    assert_finite(r)
    assert r["lines"] == ["raw_pixels", "random_encoder", "simclr", "supervised"]
    assert (r["image_size"], r["eval_image_size"], r["batch"], r["eval_examples"]) == (
        8, 8, 8, 200)
    assert set(r["raw_pixels"]) == LINEAR | {"knn_top1", "knn_top5"}
    assert set(r["random_encoder"]) == LINEAR | {"knn_top1", "knn_top5", "num_examples"}
    assert set(r["simclr"]) == (LINEAR | TRAINED | {"knn_top1", "knn_top5", "probe_top1",
                                                    "probe_top5", "num_examples"})
    assert set(r["supervised"]) == TRAINED | {"top1", "top5", "num_examples"} | {
        f"frozen_f_{k}" for k in LINEAR | {"knn_top1", "knn_top5"}}
    for line in ("raw_pixels", "random_encoder", "simclr", "supervised"):
        for key, value in r[line].items():
            if key.endswith(("top1", "top5")):
                assert_fraction(value, f"{line}.{key}")
    for line in ("random_encoder", "simclr", "supervised"):  # the first 200 test images
        assert r[line]["num_examples"] == 200, line
    for line in ("simclr", "supervised"):  # the budget trains at least one loop call
        assert 1 <= r[line]["steps"] <= r[line]["planned_steps"], r[line]
        assert r["curves"][line] and r["curves"][line][-1]["step"] == r[line]["steps"]
    assert set(r["curves"]) == {"simclr", "supervised"}
    assert close(r["simclr_minus_random_linear"],
                 r["simclr"]["linear_top1"] - r["random_encoder"]["linear_top1"], abs_tol=2e-3)
    assert set(r["targets"]) == {"simclr_linear_ge_90", "simclr_5_points_above_random",
                                 "simclr_knn_ge_88", "simclr_linear_ge_supervised_frozen_f",
                                 "simclr_knn_ge_supervised_frozen_f", "total_le_60_minutes"}
    assert r["targets"]["simclr_knn_ge_supervised_frozen_f"] == (
        r["simclr"]["knn_top1"] >= r["supervised"]["frozen_f_knn_top1"])
    assert all(isinstance(v, bool) for v in r["targets"].values())
    assert set(r["minutes"]) == {"raw_pixels", "random_encoder", "simclr", "supervised", "total"}
    assert json.loads((out_dir / "quality.json").read_text()) == r
    assert (out_dir / "quality.svg").read_text().startswith("<svg")


def test_serving(tmp_path):
    r = last_json(run_bench("serving.py", tmp_path, "--depth=18", "--image_size=32",
                            "--requests=2", "--threads=2", "--batches=1,2"))
    assert set(r) == {"benchmark", "depth", "image_size", "jpeg_side", "threads", "requests",
                      "cores", "results"}
    assert_finite(r)
    assert (r["benchmark"], r["depth"], r["image_size"], r["threads"], r["requests"]) == (
        "serving", 18, 32, 2, 2)
    assert r["cores"] == os.cpu_count()
    assert [row["batch"] for row in r["results"]] == [1, 2]
    for row in r["results"]:
        assert set(row) == {"batch", "serving_bytes", "serving_default", "hostile_png_refused",
                            "hostile_png_ms", "rss_after_load_mb", "peak_rss_mb"}
        assert row["hostile_png_refused"] is True
        assert row["hostile_png_ms"] >= 0
        assert row["peak_rss_mb"] >= row["rss_after_load_mb"] > 0
        for name in ("serving_bytes", "serving_default"):
            load = row[name]
            assert set(load) == {"requests_per_sec", "images_per_sec"}
            assert load["requests_per_sec"] > 0
            assert close(load["images_per_sec"], load["requests_per_sec"] * row["batch"],
                         abs_tol=0.06), (name, load)


TRAIN_KEYS = {"benchmark", "model", "image_size", "global_batch", "replicas", "jit_compile",
              "augment_on_device", "precision", "onednn", "matmul_dtype", "matmul_peak_gflops",
              "matmul_peak_samples", "gflop_per_example", "limit_examples_per_sec",
              "bare_encoder_examples_per_sec", "bare_over_peak", "bare_examples_per_sec_rounds",
              "bare_over_peak_median_of_rounds", "full_step_examples_per_sec", "full_over_bare",
              "full_step_examples_per_sec_rounds", "full_over_bare_median_of_rounds"}


def test_train_throughput(tmp_path):
    r = last_json(run_bench("train_throughput.py", tmp_path, "--image_size=8", "--batch=8",
                            "--steps=1", "--repeats=2"))
    assert set(r) == TRAIN_KEYS
    assert_finite(r)
    assert (r["benchmark"], r["model"], r["image_size"], r["global_batch"], r["replicas"]) == (
        "train_throughput", "resnet18x1_cifar_stem", 8, 8, 1)
    assert (r["jit_compile"], r["augment_on_device"], r["precision"], r["onednn"],
            r["matmul_dtype"]) == (False, False, "float32", True, "float32")
    # One peak before the loops and one before each of the 2 rounds; the best counts.
    assert len(r["matmul_peak_samples"]) == 3
    assert r["matmul_peak_gflops"] == max(r["matmul_peak_samples"]) > 0
    assert len(r["bare_examples_per_sec_rounds"]) == 2
    assert len(r["full_step_examples_per_sec_rounds"]) == 2
    assert r["bare_encoder_examples_per_sec"] == max(r["bare_examples_per_sec_rounds"]) > 0
    assert r["full_step_examples_per_sec"] == max(r["full_step_examples_per_sec_rounds"]) > 0
    assert r["gflop_per_example"] > 0
    assert close(r["limit_examples_per_sec"], r["matmul_peak_gflops"] / r["gflop_per_example"])
    assert close(r["bare_over_peak"], r["bare_encoder_examples_per_sec"]
                 * r["gflop_per_example"] / r["matmul_peak_gflops"], abs_tol=2e-3)
    assert close(r["full_over_bare"],
                 r["full_step_examples_per_sec"] / r["bare_encoder_examples_per_sec"],
                 abs_tol=2e-3)
    assert r["bare_over_peak_median_of_rounds"] > 0 and r["full_over_bare_median_of_rounds"] > 0


def test_train_throughput_under_bfloat16_is_judged_against_the_bfloat16_peak(tmp_path):
    r = last_json(run_bench("train_throughput.py", tmp_path, "--image_size=8", "--batch=8",
                            "--steps=1", "--repeats=1", "--precision=bfloat16",
                            "--nofull_step"))
    assert set(r) == (TRAIN_KEYS | {"float32_matmul_peak_gflops"}) - {
        "full_step_examples_per_sec", "full_over_bare", "full_step_examples_per_sec_rounds",
        "full_over_bare_median_of_rounds"}
    assert_finite(r)
    assert (r["precision"], r["matmul_dtype"]) == ("bfloat16", "bfloat16")
    assert r["float32_matmul_peak_gflops"] > 0
    assert r["matmul_peak_gflops"] == max(r["matmul_peak_samples"]) > 0
    assert close(r["limit_examples_per_sec"], r["matmul_peak_gflops"] / r["gflop_per_example"])


def test_step_profile(tmp_path):
    r = last_json(run_bench("step_profile.py", tmp_path, "--image_size=8", "--batch=8",
                            "--steps=1", "--top=5"))
    assert (r["benchmark"], r["image_size"], r["global_batch"], r["precision"]) == (
        "step_profile", 8, 8, "float32")
    for loop in ("bare", "full"):
        p = r[loop]
        assert p["wall_seconds_per_step"] > 0 and p["op_seconds_per_step"] > 0
        # Every op's time lands in one kind; the kinds' shares add up to the whole.
        assert abs(sum(p["share_by_kind"].values()) - 1) < 1e-3
        assert len(p["top_op_types"]) == 5
        assert all(share > 0 for _, _, share in p["top_op_types"])
        # A ResNet step is mostly its convolutions: forward ones are always traced.
        assert p["share_by_kind"]["conv_forward"] > 0
