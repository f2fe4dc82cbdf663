"""Faults a days-long run meets, each really done to a `python -m simclr_tf.run` process, in
every train mode (pretraining, fine-tuning from the pretraining run, distillation from the
fine-tuned run):
kill -9 at a random moment then the same command; SIGTERM; a non-finite loss; a disk that is full
before and during the run; a read-only model_dir; model flags changed on a reused model_dir; and
--seed reproducibility. One killed-and-resumed run per mode (a module fixture) is copied for the
faults that continue it. The disk tests mount small tmpfs file systems in a user + mount namespace
(`unshare -rm`): real ENOSPC / EROFS, which chmod cannot give root.
"""

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import checkpoints, data, pretrain
from simclr_tf import config as cfg
from simclr_tf.schedules import WarmupCosine, make_schedule, scaled_learning_rate

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("pretrain", "finetune", "distill")
TOTAL = 10
BATCH = 8
BASE_LR = 0.3          # the flag's default
WARMUP_STEPS = 2       # --warmup_epochs=1 with 16 images (labelled or not) at batch 8
TIMEOUT = 600
# A change of the model on a reused model_dir, per mode. Fine-tuning takes its architecture from
# --checkpoint, so there the flag that changes its checkpoint is which blocks are frozen.
CHANGED_MODEL = {"pretrain": ("resnet_depth", 34, "resnet_depth=18 there, 34 in these flags"),
                 "finetune": ("fine_tune_after_block", 2,
                              "fine_tune_after_block=-1 there, 2 in these flags"),
                 "distill": ("resnet_depth", 34, "resnet_depth=18 there, 34 in these flags")}


def _flags(mode, dataset, model_dir, sources, **overrides):
    """A tiny run of `mode`; `sources` holds the pretraining and fine-tuning runs it starts from."""
    values = dict(dataset=dataset, image_size=16, resnet_depth=18, train_batch_size=BATCH,
                  steps_per_loop=1, checkpoint_steps=2, keep_checkpoint_max=2, proj_out_dim=16,
                  warmup_epochs=1, train_steps=TOTAL, model_dir=model_dir)
    if mode == "finetune":
        values.update(train_mode="finetune", checkpoint=sources["pretrain"])
    elif mode == "distill":
        values.update(train_mode="distill", teacher=sources["finetune"])
    values.update(overrides)
    return [f"--{name}={value}" for name, value in values.items()]


class _Run:
    """A `python -m simclr_tf.run` subprocess whose stderr is collected line by line; with
    `held`, each compiled loop call is held that many seconds longer (tests/slowed_run.py)."""

    def __init__(self, flags, held=0.0):
        command = ([os.path.join(REPO, "tests", "slowed_run.py"), str(held)] if held
                   else ["-m", "simclr_tf.run"])
        self.proc = subprocess.Popen(
            [sys.executable, *command, *flags], cwd=REPO, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO))
        self.lines = []
        self._out = []
        self._readers = [threading.Thread(target=self._read, args=(self.proc.stderr, self.lines)),
                         threading.Thread(target=self._read, args=(self.proc.stdout, self._out))]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream, lines):
        for line in stream:
            lines.append(line.rstrip("\n"))

    def wait_for(self, pattern, timeout=TIMEOUT):
        """The first stderr line matching `pattern` (re.search); fails if the run ends first."""
        deadline = time.time() + timeout
        while True:
            ended = self.proc.poll() is not None and not any(r.is_alive() for r in self._readers)
            for line in list(self.lines):
                if re.search(pattern, line):
                    return line
            if ended or time.time() > deadline:
                break
            time.sleep(0.05)
        pytest.fail(f"no line matching {pattern!r}; stderr:\n" + "\n".join(self.lines[-30:]))

    def finish(self, timeout=TIMEOUT):
        rc = self.proc.wait(timeout)
        for reader in self._readers:
            reader.join()
        return rc

    @property
    def stderr(self):
        return "\n".join(self.lines)

    @property
    def last_line(self):
        return self.lines[-1] if self.lines else ""


def _run(flags):
    run = _Run(flags)
    rc = run.finish()
    return rc, run


def _checkpoint_values(path):
    reader = tf.train.load_checkpoint(path)
    return {key: reader.get_tensor(key) for key in reader.get_variable_to_shape_map()
            if key != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def _listed_checkpoints(model_dir):
    state = tf.train.get_checkpoint_state(str(model_dir))
    return list(state.all_model_checkpoint_paths) if state else []


def _assert_complete_and_finite(path):
    """Every tensor of the checkpoint reads back (no half-written file) and is finite."""
    values = _checkpoint_values(path)
    assert values, path
    for key, value in values.items():
        if np.issubdtype(np.asarray(value).dtype, np.floating):
            assert np.all(np.isfinite(value)), f"{path}: {key} is not finite"
    return values


def _leftovers(model_dir):
    found = []
    for directory, subdirs, files in os.walk(model_dir):
        found += [os.path.join(directory, n) for n in subdirs + files
                  if n.endswith("_temp") or n.startswith(".tmp-") or ".tmp" in n]
    return found


def _exports(model_dir):
    directory = os.path.join(model_dir, "export")
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, image_folder):
    return image_folder(tmp_path_factory.mktemp("faults") / "images")


# The killed run's loop calls are held this long, so that the TOTAL - 2 steps after ckpt-2 last
# at least (TOTAL - 2) * HELD = 4 s, longer than the latest kill (KILL_WITHIN): on any machine the
# kill lands inside the run, in a step, between steps or in a save.
HELD = 0.5
KILL_WITHIN = 3.0


def _killed_and_resumed(mode, dataset, sources, tmp_path_factory):
    """A run of `mode` killed with SIGKILL at a seeded random moment after its first checkpoint,
    then run again with the same command (unheld)."""
    model_dir = str(tmp_path_factory.mktemp(f"killed_{mode}") / "run")
    flags = _flags(mode, dataset, model_dir, sources)
    seed = MODES.index(mode)
    delay = random.Random(seed).uniform(0.0, KILL_WITHIN)
    first = _Run(flags, held=HELD)
    first.wait_for(r"Saved checkpoint .*/ckpt-2$")
    time.sleep(delay)
    assert first.proc.poll() is None, "the run ended before it could be killed"
    first.proc.kill()  # SIGKILL
    assert first.finish() == -signal.SIGKILL
    # What a kill leaves: the checkpoint the state file names as latest is complete. (Older ones
    # it still lists may be half-deleted: CheckpointManager records the new state before it
    # sweeps old checkpoints, and sweeps them again after the next save.)
    latest = tf.train.latest_checkpoint(model_dir)
    latest_values = _assert_complete_and_finite(latest)
    for path in _listed_checkpoints(model_dir):
        assert int(path.rsplit("-", 1)[1]) <= int(latest.rsplit("-", 1)[1])
    rc, second = _run(flags)
    return dict(mode=mode, model_dir=model_dir, sources=sources, latest=latest,
                latest_values=latest_values, rc=rc, run=second,
                note=f"{mode}: kill after {delay:.2f} s (seed {seed})")


@pytest.fixture(scope="module")
def resumed_pretrain(dataset, tmp_path_factory):
    return _killed_and_resumed("pretrain", dataset, {}, tmp_path_factory)


@pytest.fixture(scope="module")
def resumed_finetune(dataset, resumed_pretrain, tmp_path_factory):
    return _killed_and_resumed("finetune", dataset,
                               {"pretrain": resumed_pretrain["model_dir"]}, tmp_path_factory)


@pytest.fixture(scope="module")
def resumed_distill(dataset, resumed_pretrain, resumed_finetune, tmp_path_factory):
    sources = {"pretrain": resumed_pretrain["model_dir"],
               "finetune": resumed_finetune["model_dir"]}
    return _killed_and_resumed("distill", dataset, sources, tmp_path_factory)


@pytest.fixture(params=MODES)
def resumed(request):
    return request.getfixturevalue(f"resumed_{request.param}")


def test_kill_9_then_the_same_command_resumes_and_finishes(resumed):
    mode, model_dir, run, note = (resumed["mode"], resumed["model_dir"], resumed["run"],
                                  resumed["note"])
    assert resumed["rc"] == 0, f"{note}\n{run.stderr}"
    latest = resumed["latest"]
    resumed_at = int(re.search(r"ckpt-(\d+)$", latest).group(1))
    assert 2 <= resumed_at <= TOTAL, note
    # The same step, the optimiser state (its slots were non-zero) and the schedule position.
    values = resumed["latest_values"]
    assert values["optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"] == resumed_at
    assert any(np.any(v != 0) for k, v in values.items()
               if k.startswith("optimizer/_variables/") and np.ndim(v) > 0), note
    run.wait_for(rf"Resumed from {re.escape(latest)} at step {resumed_at}$", timeout=0)
    if resumed_at < TOTAL:
        line = run.wait_for(rf"step {resumed_at + 1}/{TOTAL} ", timeout=0)
        schedule = WarmupCosine(scaled_learning_rate(BASE_LR, BATCH, "linear"), WARMUP_STEPS,
                                TOTAL)
        logged_lr = float(re.search(r" lr (\S+) ", line).group(1))
        assert logged_lr == pytest.approx(float(schedule(resumed_at + 1)), rel=1e-3), note
        assert re.search(r" images/s  ETA \d+h\d\dm\d\ds$", line), line
    # Ends at the same total step with a valid final checkpoint (and, pretraining, an export).
    final = tf.train.latest_checkpoint(model_dir)
    assert final.endswith(f"ckpt-{TOTAL}")
    _assert_complete_and_finite(final)
    assert checkpoints.step_of(final) == TOTAL
    assert _leftovers(model_dir) == [], note
    if mode != "pretrain":
        assert _exports(model_dir) == []
        return
    assert _exports(model_dir) == [str(TOTAL)]
    version = os.path.join(model_dir, "export", str(TOTAL))
    embedding = tf.saved_model.load(version).signatures["serving_default"](
        images=tf.zeros([2, 16, 16, 3]))["embedding"]
    assert embedding.shape == (2, 512) and np.all(np.isfinite(embedding.numpy()))


def _copy(resumed, tmp_path):
    target = str(tmp_path / "run")
    shutil.copytree(resumed["model_dir"], target)
    return target


def test_sigterm_saves_a_checkpoint_and_exits_0_saying_how_to_resume(resumed, dataset, tmp_path):
    mode = resumed["mode"]
    model_dir = _copy(resumed, tmp_path)
    exports = _exports(model_dir)
    run = _Run(_flags(mode, dataset, model_dir, resumed["sources"], train_steps=40,
                      checkpoint_steps=100))
    run.wait_for(rf"step {TOTAL + 1}/40 ")
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 0, run.stderr
    message = run.last_line
    match = re.fullmatch(
        r"preempted \(SIGTERM\): stopped at step (\d+) of 40; saved (\S+); to resume, run the "
        r"same command again: python -m simclr_tf\.run (.*)", message)
    assert match, message
    step, saved, command = int(match.group(1)), match.group(2), match.group(3)
    assert step > TOTAL and saved == os.path.join(model_dir, f"ckpt-{step}")
    assert f"--model_dir={model_dir}" in command and "--train_steps=40" in command
    assert tf.train.latest_checkpoint(model_dir) == saved
    assert checkpoints.step_of(saved) == step
    _assert_complete_and_finite(saved)
    assert _exports(model_dir) == exports  # no export
    assert "Traceback" not in run.stderr


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
        resumed, dataset, tmp_path):
    mode = resumed["mode"]
    model_dir = _copy(resumed, tmp_path)
    exports = _exports(model_dir)
    # A learning rate of 1e30 is a real way to blow a run up: weights overflow within two steps.
    rc, run = _run(_flags(mode, dataset, model_dir, resumed["sources"], train_steps=TOTAL + 6,
                          checkpoint_steps=1, learning_rate=1e30))
    assert rc == 2, run.stderr
    assert "Traceback" not in run.stderr
    match = re.fullmatch(r"error: (loss is (nan|inf|-inf) at step|\S+ is not finite after step) "
                         r"(\d+): stopping without saving; the last good checkpoint is (\S+)",
                         run.last_line)
    assert match, run.last_line
    step, last_good = int(match.group(3)), match.group(4)
    assert TOTAL < step <= TOTAL + 6
    assert tf.train.latest_checkpoint(model_dir) == last_good
    for path in _listed_checkpoints(model_dir):  # absolute paths
        assert checkpoints.step_of(path) < step
        _assert_complete_and_finite(path)
    assert _exports(model_dir) == exports


def test_changed_model_flags_on_a_reused_model_dir_are_a_one_line_error(resumed, dataset):
    mode, model_dir = resumed["mode"], resumed["model_dir"]
    config_path = os.path.join(model_dir, cfg.CONFIG_FILENAME)
    with open(config_path) as f:
        saved_config = f.read()
    flag, value, difference = CHANGED_MODEL[mode]
    rc, run = _run(_flags(mode, dataset, model_dir, resumed["sources"], **{flag: value}))
    assert rc == 2 and "Traceback" not in run.stderr
    assert run.last_line == (
        f"error: --model_dir={model_dir} holds checkpoints of another model ({difference}): "
        "use a new --model_dir, or the model flags of the run that wrote it")
    with open(config_path) as f:
        assert f.read() == saved_config  # not overwritten with the new flags


def test_switching_train_mode_or_frozen_blocks_on_a_model_dir_is_a_model_difference():
    def run(mode, after_block=-1, selector=0):
        return cfg.RunConfig(train=cfg.TrainConfig(train_mode=mode),
                             finetune=cfg.FinetuneConfig(fine_tune_after_block=after_block,
                                                         ft_proj_selector=selector))

    assert cfg.model_differences(run("pretrain"), run("finetune")) == [
        "train_mode=pretrain there, finetune in these flags"]
    assert cfg.model_differences(run("finetune", 4), run("finetune", -1, 2)) == [
        "fine_tune_after_block=4 there, -1 in these flags",
        "ft_proj_selector=0 there, 2 in these flags"]
    assert cfg.model_differences(run("distill", 2), run("distill", 2)) == []
    # Pretraining does not use the fine-tuning flags: changing them there is no difference.
    assert cfg.model_differences(run("pretrain", 4, 1), run("pretrain", -1, 0)) == []


def _unshare_works():
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0
    except OSError:
        return False


@pytest.mark.skipif(not _unshare_works(), reason="needs user + mount namespaces (unshare -rm)")
@pytest.mark.parametrize("mode", MODES)
def test_full_disk_and_read_only_model_dir(mode, request, dataset, tmp_path):
    """Small tmpfs mounts: too small from the start; full in mid-run; mounted read-only."""
    sources = {}
    if mode != "pretrain":
        sources["pretrain"] = request.getfixturevalue("resumed_pretrain")["model_dir"]
    if mode == "distill":
        sources["finetune"] = request.getfixturevalue("resumed_finetune")["model_dir"]
    for name in ("small", "mid", "ro", "out"):
        (tmp_path / name).mkdir()
    flags = " ".join(_flags(mode, dataset, "MODEL_DIR", sources, keep_checkpoint_max=1,
                            train_steps=8))
    script = f"""
set -u
cd {REPO}
export PYTHONPATH={REPO} TF_CPP_MIN_LOG_LEVEL=2
run() {{ {sys.executable} -m simclr_tf.run $(echo '{flags}' | sed "s|MODEL_DIR|$1|"); }}
mount -t tmpfs -o size=8m tmpfs {tmp_path}/small
run {tmp_path}/small/run 2> {tmp_path}/out/small.err; echo $? > {tmp_path}/out/small.rc
mount -t tmpfs -o ro,size=1m tmpfs {tmp_path}/ro
run {tmp_path}/ro/run 2> {tmp_path}/out/ro.err; echo $? > {tmp_path}/out/ro.rc
mount -t tmpfs -o size=260m tmpfs {tmp_path}/mid
# Held 0.3 s a step, the run cannot end before it is paused below, however fast the machine.
{sys.executable} tests/slowed_run.py 0.3 $(echo '{flags}' | sed "s|MODEL_DIR|{tmp_path}/mid/run|") \
  2> {tmp_path}/out/mid.err &
pid=$!
for i in $(seq 1 6000); do
  grep -q ckpt-2 {tmp_path}/mid/run/checkpoint 2>/dev/null && break; sleep 0.1
done
# Another process fills the disk, leaving 2 MB: enough for the logs, not for a checkpoint. The run
# is paused meanwhile, else a fast machine writes another checkpoint or two while dd runs.
kill -STOP $pid
avail=$(df --output=avail -k {tmp_path}/mid | tail -1)
dd if=/dev/zero of={tmp_path}/mid/filler bs=1k count=$((avail - 2048)) 2>/dev/null
kill -CONT $pid
wait $pid; echo $? > {tmp_path}/out/mid.rc
rm {tmp_path}/mid/filler
cp -a {tmp_path}/mid/run {tmp_path}/out/mid_run
"""
    subprocess.run(["unshare", "-rm", "bash", "-c", script], check=True, timeout=TIMEOUT)
    out = tmp_path / "out"

    def result(name):
        lines = (out / f"{name}.err").read_text().strip().splitlines()
        assert not any("Traceback" in line for line in lines), "\n".join(lines)
        return int((out / f"{name}.rc").read_text()), lines[-1]

    rc, line = result("small")
    assert rc == 2
    export = r", and an export of \d+ MB" if mode == "pretrain" else ""
    assert re.fullmatch(
        rf"error: --model_dir={tmp_path}/small/run has \d+ MB free but this run needs about "
        rf"\d+ MB \(2 more checkpoint\(s\) of \d+ MB with keep_checkpoint_max=1{export}\): free "
        r"space, lower --keep_checkpoint_max or use another --model_dir", line), line
    assert " from step " not in (out / "small.err").read_text()  # before training starts

    rc, line = result("ro")
    assert (rc, line) == (2, f"error: --model_dir={tmp_path}/ro/run is not writable (Read-only "
                             "file system): choose a directory this user can write to")

    rc, line = result("mid")
    assert rc == 2
    mid = f"{tmp_path}/mid/run"
    # Normally ckpt-4 fails; the run may have been a checkpoint further when it was paused.
    match = re.fullmatch(
        rf"error: writing checkpoint {mid}/ckpt-(\d+) failed \(.*No space left on device.*\): the "
        rf"last complete checkpoint is {mid}/ckpt-(\d+); free space and run the same command "
        r"again to resume from it", line)
    assert match, line
    failed, last = int(match[1]), int(match[2])
    assert failed >= 4 and last == failed - 2, line
    copy = str(out / "mid_run")
    assert tf.train.latest_checkpoint(copy) == os.path.join(copy, f"ckpt-{last}")
    _assert_complete_and_finite(os.path.join(copy, f"ckpt-{last}"))
    assert not [n for n in os.listdir(copy) if n.startswith(f"ckpt-{failed}")]  # partial files


def _first_losses(config, steps):
    """Losses of the first `steps` steps of a fresh run, seeded as run.py seeds it."""
    keras.utils.set_random_seed(config.train.seed)
    info = data.dataset_info(config.data.dataset, config.data.train_split)
    schedule = make_schedule(config.train, config.optimizer, info.num_examples)
    strategy = tf.distribute.get_strategy()
    trainer = pretrain.Pretrainer(config, strategy, schedule, num_classes=info.num_classes)
    dataset_fn = pretrain.make_dataset_fn(config)
    batches = strategy.distribute_datasets_from_function(
        lambda context: dataset_fn(context, config.train.seed * 1_000_003))
    iterator, loop = iter(batches), trainer.make_train_loop()
    return [loop(iterator, tf.constant(1))["loss"].numpy().tobytes() for _ in range(steps)]


def test_seed_makes_a_single_replica_cpu_run_bit_reproducible(dataset):
    def config(seed):
        return cfg.RunConfig(
            data=cfg.DataConfig(dataset=dataset, image_size=16),
            encoder=cfg.EncoderConfig(resnet_depth=18, cifar_stem=True),
            head=cfg.HeadConfig(proj_out_dim=16),
            optimizer=cfg.OptimizerConfig(warmup_epochs=0),
            train=cfg.TrainConfig(train_batch_size=BATCH, train_steps=3, seed=seed))

    first = _first_losses(config(7), 3)
    assert _first_losses(config(7), 3) == first  # the same float32 bits, step after step
    assert _first_losses(config(8), 1) != first[:1]
