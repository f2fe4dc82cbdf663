"""What the command lines (`python -m simclr_tf.run`, `python -m simclr_tf.convert`, `python -m
export`) share: how they start (the log level, TensorFlow's device probe kept quiet, absl's app),
that every argument is a flag, and the one-line error they end with."""

import sys


def fail(message, status=2):
    """Ends the command with `error: <message>` on stderr."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def only_flags(argv, status=2):
    """Refuses positional arguments (absl passes them through in `argv`)."""
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}: flags are written --name=value", status)


def start(main, verbosity="info", define_flags=None):
    """Runs `main` under absl's app, after defining the flags and probing the devices quietly
    (TensorFlow's own after-init hook of app.run would print the CUDA probe)."""
    import tensorflow as tf
    from absl import app, logging

    import simclr_tf
    from simclr_tf import quiet_start

    logging.set_verbosity(verbosity)
    with quiet_start.silenced(simclr_tf.QUIET_START):
        tf.config.list_physical_devices()
    if define_flags is not None:
        define_flags()
    app.run(main)
