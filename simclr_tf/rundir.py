"""A run directory's housekeeping: whether it can be written, files written whole, and what a
killed run left half-written there.

Every file a run writes outside TensorFlow's checkpoint and SavedModel writers (config.json,
results, the pictures and projector files) goes through `write_atomically`: a temporary
`<name>.tmp-<pid>` beside it, renamed over it, so a reader or a resumed run never sees half a
file. `remove_stale_temporaries` deletes those temporaries, and TensorFlow's own
(`ckpt-N_temp/`, `checkpoint.tmp<hex>`), when the process that wrote them is gone.
"""

import os
import re
import shutil
import uuid

import tensorflow as tf
from absl import logging

from simclr_tf.errors import first_line

_OWN_TEMPORARY = re.compile(r".+\.tmp-(\d+)")  # write_atomically's, with the writer's pid
_CHECKPOINT_TEMPORARY = re.compile(r"ckpt-\d+_temp|checkpoint\.tmp[0-9a-f]+")


class NotWritableError(RuntimeError):
    """The run directory cannot be created or written."""


def is_local(path):
    return "://" not in str(path)


def check_writable(model_dir):
    """NotWritableError unless model_dir can be created and written (a probe file, then removed)."""
    probe = os.path.join(model_dir, f".write-test-{uuid.uuid4().hex}")
    try:
        if is_local(model_dir):  # OSError's strerror reads better than TensorFlow's message
            os.makedirs(model_dir, exist_ok=True)
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        else:
            tf.io.gfile.makedirs(model_dir)
            with tf.io.gfile.GFile(probe, "w") as f:
                f.write("ok")
            tf.io.gfile.remove(probe)
    except (OSError, tf.errors.OpError) as e:
        raise NotWritableError(f"--model_dir={model_dir} is not writable ({first_line(e)}): "
                               "choose a directory this user can write to") from None


def write_atomically(path, content):
    """Writes `content` (str or bytes) to `path` through a temporary file renamed over it, so a
    reader never sees half of it."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with tf.io.gfile.GFile(tmp, "wb" if isinstance(content, bytes) else "w") as f:
        f.write(content)
    tf.io.gfile.rename(tmp, path, overwrite=True)


def process_alive(pid):
    """Whether process `pid` runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(model_dir):
    """Deletes what a killed run left half-written in model_dir and its subdirectories (local
    directories only; exports have their own, `export.remove_stale_exports`).

    `ckpt-N_temp/` and `checkpoint.tmp<hex>` (TensorFlow's, safe to remove once their writer is
    gone: the chief calls this before it starts writing), and `write_atomically`'s temporaries
    whose writing process is no longer running (an evaluation watching the run may be writing).
    """
    if not is_local(model_dir) or not os.path.isdir(model_dir):
        return
    removed = []
    for directory, subdirectories, names in os.walk(model_dir):
        if directory == model_dir and "export" in subdirectories:
            subdirectories.remove("export")
        for name in list(subdirectories) + names:
            path = os.path.join(directory, name)
            own = _OWN_TEMPORARY.fullmatch(name)
            if directory == model_dir and _CHECKPOINT_TEMPORARY.fullmatch(name):
                shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
            elif own and os.path.isfile(path) and not process_alive(int(own.group(1))):
                os.remove(path)
            else:
                continue
            removed.append(path)
        subdirectories[:] = [d for d in subdirectories if os.path.isdir(os.path.join(directory, d))]
    if removed:
        logging.info("Removed what an interrupted run left half-written: %s", ", ".join(removed))
