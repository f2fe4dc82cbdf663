"""bench/accelerator.py --smoke runs every part at tiny sizes on the CPU and keeps its promise: exit
0, one JSON line last on stdout, every part either ran (its rates finite and positive) or was
skipped with a reason (a loaded machine may skip runs that do not fit their budgets), and the log
file ends with the same JSON. The figures themselves are not judged."""
import json
import math
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 600  # seconds; the bench's own deadline (smoke: 240 s + 30 s watchdog) comes first
PARTS = ("device", "matmul", "resnet", "pipeline", "serving")
TOP_KEYS = {"benchmark", "smoke", "command", "log_file", "deadline_s", "parts", "budgets_s",
            "on_gpu", "elapsed_s"}
RATE_SUFFIXES = ("_per_sec", "_per_sec_per_core")


def leaves(value, path="$"):
    """(path, key, value) of every leaf under `value`."""
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, (dict, list)):
                yield from leaves(v, f"{path}.{k}")
            else:
                yield f"{path}.{k}", k, v
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from leaves(v, f"{path}[{i}]")


def rates(part):
    """The measured rates of a part: *_per_sec figures, matmul GFLOP/s, host cores needed."""
    found = [(p, v) for p, k, v in leaves(part) if k.endswith(RATE_SUFFIXES)
             or k == "host_cores_needed"]
    found += [(f"gflops.{k}", v) for k, v in part.get("gflops", {}).items()]
    return found


def test_accelerator_smoke(tmp_path):
    log_file = tmp_path / "accelerator.log"
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2", TMPDIR=str(tmp_path))
    done = subprocess.run(
        [sys.executable, os.path.join("bench", "accelerator.py"), "--smoke",
         f"--log_file={log_file}"], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-5000:]
    line = done.stdout.strip().splitlines()[-1]
    result = json.loads(line)
    assert TOP_KEYS <= set(result), sorted(result)
    assert result["benchmark"] == "accelerator" and result["smoke"] is True
    assert set(result["parts"]) == set(PARTS)

    errors = [(p, v) for p, k, v in leaves(result) if k == "error" or k.endswith("_error")]
    assert not errors, errors
    for name in PARTS:
        part = result["parts"][name]
        status = part["status"]
        assert status in ("ok", "partial", "skipped", "aborted"), (name, part)
        if status in ("skipped", "aborted"):
            assert isinstance(part.get("reason"), str) and part["reason"], (name, part)
            continue
        for key, reason in part.get("skipped_runs", {}).items():
            assert isinstance(reason, str) and reason, (name, key)
        measured = rates(part)
        if name == "device":
            assert part["device"] in ("CPU", "GPU") and part["tensorflow_version"]
            assert isinstance(part["build_info"], dict)
        elif name == "serving":
            # Its runs may all have been skipped for time (each with its reason).
            assert part["results"] and all(
                isinstance(sig.get("skipped"), str) or sig.get("requests_per_sec")
                for row in part["results"] for key, sig in row.items() if key != "batch")
        else:
            assert measured, (name, part)
        bad = [(p, v) for p, v in measured
               if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0)]
        assert not bad, (name, bad)

    assert log_file.exists()
    log_lines = log_file.read_text().strip().splitlines()
    assert log_lines[-1] == line
    assert any("part resnet: start" in entry for entry in log_lines)
