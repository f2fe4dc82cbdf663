"""MultiWorkerMirroredStrategy with two local worker processes: same step as one worker, a CLI
run where only the chief writes, and a SIGTERM to one worker, after which the run resumes."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import config as cfg
from simclr_tf import pretrain
from simclr_tf.schedules import Schedule

import updates

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
pytestmark = pytest.mark.slow


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _cli_command(dataset, model_dir, steps, steps_per_loop, checkpoint_steps):
    """args_for(worker index) of a tiny multi-worker CLI run (the same on every worker)."""
    return lambda index: [
        sys.executable, "-m", "simclr_tf.run", "--strategy=multi_worker",
        f"--dataset={dataset}", f"--model_dir={model_dir}", "--resnet_depth=18",
        "--image_size=16", "--train_batch_size=8", f"--train_steps={steps}",
        f"--steps_per_loop={steps_per_loop}", f"--checkpoint_steps={checkpoint_steps}",
        "--proj_out_dim=16", "--warmup_epochs=0"]


def _run_workers(args_for, timeout=600):
    """Runs two workers to the end; asserts both exit 0 and returns their outputs."""
    lines = [[], []]
    procs = _start_workers(args_for, lambda index, line: lines[index].append(line))
    _wait(procs, lines, timeout)
    return ["".join(ls) for ls in lines]


def _start_workers(args_for, on_line):
    """Two workers on free local ports; each output line goes to on_line(index, line) from a
    reader thread. Returns [(process, reader thread)]."""
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for index in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}}),
            TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
        p = subprocess.Popen(args_for(index), env=env, cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        reader = threading.Thread(
            target=lambda p=p, i=index: [on_line(i, line) for line in p.stdout], daemon=True)
        reader.start()
        procs.append((p, reader))
    return procs


def _wait(procs, lines, timeout=600):
    """Waits for both workers (killing them on failure); asserts both exited 0."""
    try:
        for p, reader in procs:
            p.wait(timeout=timeout)
            reader.join(timeout=60)
    finally:
        for p, _ in procs:
            p.kill()
    for (p, _), ls in zip(procs, lines):
        assert p.returncode == 0, "".join(ls)[-3000:]


@pytest.mark.fidelity
def test_two_workers_give_the_same_step_as_one_worker(tmp_path, pretrain_config, views_batch):
    """Every variable's update on 2 workers equals 1 worker's, within a multiple of the
    float-order noise floor (tests/updates.py)."""
    config = pretrain_config()
    cfg.save(config, str(tmp_path))
    schedule = Schedule(total_steps=10, warmup_steps=0, steps_per_epoch=10)
    reference = pretrain.Pretrainer(config, tf.distribute.get_strategy(), schedule, num_classes=10)
    parts = (reference.encoder, reference.head, reference.probe)
    weights = [part.get_weights() for part in parts]
    before = updates.values(parts)
    np.savez(tmp_path / "weights.npz", **{f"{p}_{i}": w for p, part_weights in enumerate(weights)
                                          for i, w in enumerate(part_weights)})
    batch = views_batch()
    np.savez(tmp_path / "batch.npz", **batch)

    _run_workers(lambda i: [sys.executable, os.path.join(HERE, "multi_worker_step.py"),
                            str(tmp_path), str(tmp_path / "weights.npz"),
                            str(tmp_path / "batch.npz"), str(tmp_path / "out.json")])
    with open(tmp_path / "out.json") as f:
        two_workers = json.load(f)
    after = {k: np.array(v, np.float64) for k, v in np.load(tmp_path / "out.npz").items()}

    one_worker, _, _ = updates.pretrain_step(tf.distribute.get_strategy(), weights, batch, config)
    for key in ("contrast_loss", "probe_loss", "contrast_acc"):
        assert two_workers[key] == pytest.approx(one_worker[key], rel=1e-4, abs=1e-6), key
    update, tolerances = updates.update_tolerances(config, weights, batch)
    differences = updates.worst_relative_differences(update, updates.updates(before, after))
    assert differences.keys() == tolerances.keys()
    for group, difference in differences.items():
        assert difference <= tolerances[group], (group, difference, tolerances)


def test_cli_run_on_two_workers_writes_from_the_chief(tmp_path, image_folder):
    """(Resuming on two workers: the SIGTERM test below.)"""
    dataset = image_folder(tmp_path / "images")
    model_dir = tmp_path / "run"
    _run_workers(_cli_command(dataset, model_dir, 2, steps_per_loop=2, checkpoint_steps=2))
    assert tf.train.latest_checkpoint(str(model_dir)).endswith("ckpt-2")
    assert os.listdir(model_dir / "export") == ["2"]
    assert not os.path.exists(model_dir / ".workers") or not os.listdir(model_dir / ".workers")


def test_sigterm_to_one_worker_stops_both_at_the_same_step_and_the_run_resumes(tmp_path,
                                                                              image_folder):
    """A preemption notice reaches one machine of a cluster: every worker must stop at the same
    step (the chief saving the checkpoint), exit 0, and the same command must resume there."""
    dataset = image_folder(tmp_path / "images")
    model_dir = tmp_path / "run"

    def command(steps):
        return _cli_command(dataset, model_dir, steps, steps_per_loop=1, checkpoint_steps=1000)

    lines = [[], []]
    step_two = threading.Event()

    def on_line(index, line):
        lines[index].append(line)
        if index == 1 and re.search(r"step 2/1000 ", line):
            step_two.set()

    procs = _start_workers(command(1000), on_line)
    if not step_two.wait(timeout=600):
        for p, _ in procs:
            p.kill()
        pytest.fail("worker 1 never logged step 2:\n" + "".join(lines[1])[-3000:])
    procs[1][0].send_signal(signal.SIGTERM)
    _wait(procs, lines)
    # the line each worker printed on stopping (TensorFlow may log more while shutting down)
    last = [next((line.strip() for line in reversed(ls) if line.startswith("preempted")), "")
            for ls in lines]
    pattern = (r"preempted \({}\): stopped at step (\d+) of 1000; saved (\S+); to resume, run "
               r"the same command again: python -m simclr_tf\.run .*")
    chief = re.fullmatch(pattern.format("another worker was stopped"), last[0])
    other = re.fullmatch(pattern.format("SIGTERM"), last[1])
    assert chief and other, ["".join(ls)[-2000:] for ls in lines]
    step = int(chief.group(1))
    assert step >= 2 and int(other.group(1)) == step
    assert chief.group(2) == other.group(2) == os.path.join(model_dir, f"ckpt-{step}")
    assert tf.train.latest_checkpoint(str(model_dir)) == chief.group(2)
    assert not os.path.exists(model_dir / ".workers") or not os.listdir(model_dir / ".workers")
    outputs = _run_workers(command(step + 1))
    assert f"at step {step}" in outputs[0] and "Resumed from" in outputs[0]
    assert tf.train.latest_checkpoint(str(model_dir)).endswith(f"ckpt-{step + 1}")
    assert os.listdir(model_dir / "export") == [str(step + 1)]  # the chief's, at the end
