"""Stopping a run on request: SIGTERM (a preemption notice) turns into a save and a clean exit.

`StopSignal` records the signal instead of letting it kill the process; the outer training loop
(`simclr_tf.loop`) polls it between compiled loop calls, through `agreed`, so every worker of a
multi-worker run stops at the same step. The loop then saves a checkpoint and raises `Preempted`,
and the command exits 0 saying how to resume.
"""

import signal

import tensorflow as tf
from absl import logging


class Preempted(Exception):
    """Training stopped on request (SIGTERM) after saving; running the same command resumes."""

    def __init__(self, step, total, checkpoint):
        self.step, self.total, self.checkpoint = step, total, checkpoint
        saved = f"saved {checkpoint}" if checkpoint else "nothing trained yet, nothing saved"
        super().__init__(f"stopped at step {step} of {total}; {saved}")


class StopSignal:
    """While entered, SIGTERM sets a flag instead of killing the process; call it to read it.

    The handler only records the signal: the outer training loop checks between compiled loop
    calls (Python runs signal handlers between bytecodes, not inside a TensorFlow call).
    """

    def __init__(self, signals=(signal.SIGTERM,)):
        self._signals = tuple(signals)
        self._previous = {}
        self.received = None

    def __enter__(self):
        for sig in self._signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        del frame
        self.received = signal.Signals(signum).name
        logging.warning("Received %s: saving a checkpoint after the current loop, then stopping",
                        self.received)

    def __call__(self):
        return self.received is not None


def agreed(strategy, requested):
    """A callable telling whether any worker was asked to stop (False if `requested` is None).

    Every worker of a MultiWorkerMirroredStrategy must stop at the same step (the next step's
    collectives would wait for the one that left), so their flags are all-reduced: one tiny
    collective per loop call. Other strategies run one Python process: no collective.
    """
    if requested is None:
        return lambda: False
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return requested

    @tf.function
    def any_worker(flag):
        per_replica = strategy.run(tf.identity, args=(flag,))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None) > 0

    return lambda: bool(any_worker(tf.constant(1.0 if requested() else 0.0)))
