"""Silences TensorFlow's C++ start-up messages on the command line, unless you ask for them.

Loading TensorFlow and initialising its devices prints lines such as "Could not find cuda drivers
on your machine", "failed call to cuInit", "This TensorFlow binary is optimized to use available
CPU instructions" and "oneDNN custom operations are on". Several are written before TensorFlow's
log level applies (absl: "All log messages before absl::InitializeLog() is called are written to
STDERR"), so TF_CPP_MIN_LOG_LEVEL cannot hide them. `silenced` points file descriptor 2 at
/dev/null around those two moments only (`import tensorflow`, building the strategy); Python's
own messages of that moment go with them, so nothing else runs inside. The command line uses it
when the environment does not set TF_CPP_MIN_LOG_LEVEL: setting it (to 0 for everything) brings
TensorFlow's messages back.

The same switch hides the INFO lines TensorFlow, tensorflow-datasets and Keras log from Python
while a run goes ("Load dataset info from ...", "Sharding callback duration", "Assets written
to ..."), so the run's own progress lines stand out (`hide_library_info`); their warnings stay.
"""

import contextlib
import logging
import os
import sys

_LIBRARY_DIRS = tuple(f"{os.sep}{name}{os.sep}" for name in
                      ("tensorflow", "tensorflow_datasets", "keras", "tf_keras", "absl"))


def wanted(argv0, environ):
    """Whether a process started as `argv0` with `environ` should start quietly: a command line
    (`python -m simclr_tf.run`, whose package loads while argv[0] is "-m", or `python -m export`,
    whose `__main__.py` imports simclr_tf) whose user did not set TF_CPP_MIN_LOG_LEVEL."""
    command = argv0 == "-m" or os.path.basename(argv0) == "__main__.py"
    return command and "TF_CPP_MIN_LOG_LEVEL" not in environ


@contextlib.contextmanager
def silenced(enabled=True):
    """Inside, whatever is written to file descriptor 2 (C++ and Python alike) is discarded."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


class LibraryInfoFilter(logging.Filter):
    """Drops records at INFO or below that the libraries' own source files log."""

    def filter(self, record):
        return record.levelno > logging.INFO or not any(
            part in record.pathname for part in _LIBRARY_DIRS)


def hide_library_info():
    """Filters the loggers the libraries log through: absl's (tensorflow-datasets, TensorFlow's
    absl calls) and TensorFlow's own."""
    for name in ("absl", "tensorflow"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, LibraryInfoFilter) for f in logger.filters):
            logger.addFilter(LibraryInfoFilter())
