"""Bad input, as a user meets it: each row runs the real command and asserts its message.

`python -m simclr_tf.run` and `python -m export` run as subprocesses (a small thread pool; each
costs a TensorFlow import), every one must exit non-zero with its one-line message and no Python
traceback, except the folder of mixed images, which trains (skipping the files that cannot be
decoded, named in one warning) and whose export then serves the serving rows in-process.

Policy for files in an image folder that cannot be decoded: skipped and counted, with one warning
line naming them (see `simclr_tf.image_files`); a folder with none left is an error.
"""

import concurrent.futures
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import data

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 16
TINY = ["--image_size=16", "--resnet_depth=18", "--train_batch_size=8", "--steps_per_loop=1",
        "--proj_out_dim=16", "--warmup_epochs=0"]
TWO_WORKERS = {"worker": ["127.0.0.1:23456", "127.0.0.1:23457"]}

# (id, command, arguments, environment, exit code, message). Arguments and messages may name
# {tmp} (the workspace). The message is the last stderr line (rc != 0) or a line to find (rc 0).
CLI_CASES = [
    ("unknown_flag_value", "run", ["--optimizer=sgdw"], {}, 2,
     "error: optimizer must be one of ('lars', 'momentum', 'adam'), got 'sgdw'"),
    ("enum_flag_value", "run", ["--proj_head_mode=mlp"], {}, 1,
     "FATAL Flags parsing error: flag --proj_head_mode=mlp: value should be one of "
     "<none|linear|nonlinear>"),
    ("non_integer_flag", "run", ["--train_batch_size=eight"], {}, 1,
     "FATAL Flags parsing error: flag --train_batch_size=eight: invalid literal for int() with "
     "base 10: 'eight'"),
    ("misspelt_flag", "run", ["--resnet_dpeth=18"], {}, 1,
     "FATAL Flags parsing error: Unknown command line flag 'resnet_dpeth'. Did you mean: "
     "resnet_depth ?"),
    ("positional_argument", "run", ["train"], {}, 2,
     "error: unexpected arguments ['train']: flags are written --name=value"),
    ("unknown_strategy", "run", ["--strategy=gpu"], {}, 2,
     "error: strategy must be one of ('default', 'mirrored', 'multi_worker', 'tpu'), got 'gpu'"),
    ("batch_not_divisible_by_replicas", "run",
     ["--strategy=mirrored", "--num_cpu_replicas=3", "--train_batch_size=8"], {}, 2,
     "error: train_batch_size=8 is not divisible by the 3 replicas: use a multiple of 3"),
    ("jit_compile_on_two_replicas", "run",
     ["--strategy=mirrored", "--num_cpu_replicas=2", "--jit_compile"], {}, 2,
     "error: jit_compile=True runs one replica (or --strategy=tpu), not 2 replicas of "
     "--strategy=mirrored: XLA cannot compile that step's cross-replica ops; drop --jit_compile "
     "or use one replica"),
    ("augment_on_device_when_fine_tuning", "run",
     ["--train_mode=finetune", "--augment_on_device"], {}, 2,
     "error: augment_on_device applies to --train_mode=pretrain, not --train_mode=finetune: "
     "drop --augment_on_device"),
    ("contrastive_batch_without_negatives", "run", ["--train_batch_size=1"], {}, 2,
     "error: train_batch_size=1 leaves the contrastive loss without negatives (an image's only "
     "other view is its positive): use at least 2"),
    ("image_size_below_stem", "run", ["--image_size=4"], {}, 2,
     "error: image_size=4 is too small for the CIFAR stem: use at least 8"),
    ("unknown_dataset", "run", ["--dataset=no_such_dataset", "--model_dir={tmp}/runs/a"], {}, 2,
     "error: unknown dataset 'no_such_dataset': give a tensorflow-datasets name (e.g. 'cifar10', "
     "'fashion_mnist') or 'folder:/path/to/images' for a folder of your own images"),
    ("missing_debian_dataset_package", "run_without_debian_fashion_mnist",
     ["--dataset=fashion_mnist", "--data_dir={tmp}/empty_tfds", "--model_dir={tmp}/runs/b"], {}, 2,
     "error: Fashion-MNIST is not prepared in {tmp}/empty_tfds and Debian's dataset-fashion-mnist "
     "package is not installed (no IDX files in /usr/share/datasets/fashion-mnist): run 'apt-get "
     "install dataset-fashion-mnist' or point --data_dir at a prepared tensorflow-datasets "
     "directory"),
    ("empty_image_folder", "run", ["--dataset=folder:{tmp}/empty", "--model_dir={tmp}/runs/c"],
     {}, 2, "error: image folder '{tmp}/empty' has no images (looked for .jpg, .jpeg, .png, .gif, "
     ".bmp files)"),
    ("missing_image_folder", "run", ["--dataset=folder:{tmp}/nowhere", "--model_dir={tmp}/runs/d"],
     {}, 2, "error: image folder '{tmp}/nowhere' of dataset 'folder:{tmp}/nowhere' does not exist"),
    ("folder_of_undecodable_files", "run",
     ["--dataset=folder:{tmp}/undecodable", "--model_dir={tmp}/runs/e"], {}, 2,
     "error: image folder '{tmp}/undecodable' has no images that can be decoded: all 3 image "
     "files were skipped (see the warning naming them)"),
    ("mixed_folder_trains_skipping_named_files", "run",
     ["--dataset=folder:{tmp}/mixed", "--model_dir={tmp}/mixed_run", "--train_steps=2",
      "--checkpoint_steps=2"], {}, 0,
     "image folder {tmp}/mixed: skipping 4 of 20 files that cannot be decoded: cats/huge.png "
     "(20000x20000 pixels, more than the 100000000 allowed), cats/not_an_image.jpg (not a JPEG, "
     "PNG, GIF or BMP file), dogs/corrupt.jpg (truncated or corrupt JPEG (bad marker segments)), "
     "dogs/truncated.png (truncated PNG (no IEND chunk))"),
    ("tf_config_not_json", "run", ["--strategy=multi_worker", "--model_dir={tmp}/runs/f"],
     {"TF_CONFIG": '{"cluster": '}, 2,
     "error: TF_CONFIG is not valid JSON (Expecting value: line 1 column 13 (char 12)): expected "
     'e.g. {"cluster": {"worker": ["host1:2222", "host2:2222"]}, "task": {"type": "worker", '
     '"index": 0}}'),
    ("tf_config_task_outside_cluster", "run",
     ["--strategy=multi_worker", "--model_dir={tmp}/runs/g"],
     {"TF_CONFIG": json.dumps({"cluster": TWO_WORKERS, "task": {"type": "worker", "index": 2}})},
     2, "error: TF_CONFIG task index 2 is out of range: job 'worker' has 2 task(s), indices 0 to 1"),
    ("model_dir_under_a_file", "run", ["--model_dir={tmp}/a_file/run"], {}, 2,
     "error: --model_dir={tmp}/a_file/run is not writable (Not a directory): choose a directory "
     "this user can write to"),
    ("export_without_checkpoint", "export", ["--model_dir={tmp}/untrained"], {}, 1,
     "error: no checkpoint in {tmp}/untrained: train first, or pass --checkpoint"),
]

EXPECTED = "images must be float32 [batch, height, width, 3] with values in [0, 1]"
SERVING_CASES = [
    ("serving_wrong_rank", "serving_default", np.zeros([2, SIZE, SIZE], np.float32),
     (EXPECTED, "got shape] [2 16 16]")),
    ("serving_wrong_channels", "serving_default", np.zeros([2, SIZE, SIZE, 4], np.float32),
     (EXPECTED, "got shape] [2 16 16 4]")),
    ("serving_wrong_dtype", "serving_default", np.zeros([1, SIZE, SIZE, 3], np.int32),
     ("expected to be a float tensor but is a int32 tensor",)),
    ("serving_pixels_not_divided_by_255", "serving_default",
     np.full([1, SIZE, SIZE, 3], 255.0, np.float32), (EXPECTED, "divide uint8 pixels by 255")),
    ("serving_undecodable_bytes", "serving_bytes", np.array([b"not an image"]),
     ("image_bytes[0] is not a JPEG, PNG, GIF or BMP file (or its header is cut short)",)),
]


def _png(pixels):
    return tf.io.encode_png(pixels).numpy()


def _write(path, payload):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(payload)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory, zeros_png):
    """The workspace: folders of good and bad images, a file, an untrained run."""
    root = tmp_path_factory.mktemp("bad_input")
    rng = np.random.default_rng(0)

    def rgb():
        return rng.integers(0, 255, size=(20, 20, 3), dtype=np.uint8)

    os.makedirs(root / "empty" / "some_class")
    os.makedirs(root / "empty_tfds")
    corrupt_jpeg = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00" \
        + b"\x13\x37" * 64
    truncated_png = _png(rgb())[:60]
    _write(f"{root}/undecodable/a.jpg", b"Just some text with a .jpg name")
    _write(f"{root}/undecodable/b.png", truncated_png)
    _write(f"{root}/undecodable/c.jpg", corrupt_jpeg)
    for label in ("cats", "dogs"):
        for index in range(6):
            _write(f"{root}/mixed/{label}/{index}.png", _png(rgb()))
    _write(f"{root}/mixed/cats/gray.png", _png(rgb()[..., :1]))
    _write(f"{root}/mixed/cats/rgba.png", _png(np.concatenate([rgb(), rgb()[..., :1]], -1)))
    _write(f"{root}/mixed/dogs/gray.jpg", tf.io.encode_jpeg(rgb()[..., :1]).numpy())
    _write(f"{root}/mixed/dogs/rgba.png", _png(np.concatenate([rgb(), rgb()[..., :1]], -1)))
    _write(f"{root}/mixed/cats/huge.png", zeros_png(20000))
    _write(f"{root}/mixed/cats/not_an_image.jpg", b"<html>a web page saved as .jpg</html>")
    _write(f"{root}/mixed/dogs/corrupt.jpg", corrupt_jpeg)
    _write(f"{root}/mixed/dogs/truncated.png", truncated_png)
    _write(f"{root}/a_file", b"a regular file, not a directory")
    _write(f"{root}/untrained/config.json", b"{}")
    return str(root)


def _unshare_works():
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0
    except OSError:
        return False


def _command(kind, args):
    python = [sys.executable, "-m", "export" if kind == "export" else "simclr_tf.run"]
    if kind != "run_without_debian_fashion_mnist":
        return python + TINY * (kind == "run") + args
    python += TINY + args
    if not os.path.isdir(data.DEBIAN_FASHION_MNIST_DIR):
        return python  # the package really is missing here
    if not _unshare_works():
        return None  # cannot hide the installed package: the row is skipped
    # A private mount namespace where an empty directory hides the package's files.
    hide = f"mount --bind \"$1\" {data.DEBIAN_FASHION_MNIST_DIR} && shift && exec \"$@\""
    return ["unshare", "-rm", "sh", "-c", hide, "sh", args[1].split("=", 1)[1]] + python


@pytest.fixture(scope="module")
def cli(tmp):
    """Runs every CLI row once (two at a time); id -> CompletedProcess."""
    def run(case):
        name, kind, args, env, _, _ = case
        command = _command(kind, [a.replace("{tmp}", tmp) for a in args])
        if command is None:
            return name, None
        return name, subprocess.run(
            command, cwd=REPO, capture_output=True, text=True, timeout=600,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO, **env))

    # The training row first: it is the longest, and the serving rows need its export.
    ordered = sorted(CLI_CASES, key=lambda case: case[4] != 0)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return dict(pool.map(run, ordered))


@pytest.mark.parametrize("case", CLI_CASES, ids=[case[0] for case in CLI_CASES])
def test_cli(case, cli, tmp):
    name, _, _, _, rc, message = case
    result = cli[name]
    if result is None:
        pytest.skip("hiding Debian's Fashion-MNIST needs user + mount namespaces (unshare -rm)")
    message = message.replace("{tmp}", tmp)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == rc, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    if rc != 0:  # exactly one error line (absl adds a hint line after its own)
        assert [line for line in lines if line.startswith(("error: ", "FATAL "))] == [message]
    else:
        warnings = [line for line in lines if "cannot be decoded" in line]
        assert len(warnings) == 1 and warnings[0].endswith(message), warnings


@pytest.fixture(scope="module")
def serving(cli, tmp):
    if cli["mixed_folder_trains_skipping_named_files"].returncode != 0:
        pytest.fail("the mixed-folder run failed, so there is no export to serve")
    return tf.saved_model.load(os.path.join(tmp, "mixed_run", "export", "2"))


@pytest.mark.parametrize("case", SERVING_CASES, ids=[case[0] for case in SERVING_CASES])
def test_serving(case, serving):
    _, signature, value, messages = case
    function = serving.signatures[signature]
    name = next(iter(function.structured_input_signature[1]))
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        function(**{name: tf.constant(value)})
    for message in messages:
        assert message in error.value.message


def test_mixed_folder_run_used_only_the_decodable_images(cli, tmp):
    info = data.dataset_info(f"folder:{tmp}/mixed", "train")
    assert (info.num_examples, info.num_classes) == (16, 2)  # 20 files, 4 skipped
    assert os.listdir(os.path.join(tmp, "mixed_run", "export")) == ["2"]
