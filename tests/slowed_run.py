"""`python -m simclr_tf.run FLAGS...` with every compiled loop call held SECONDS longer.

    python tests/slowed_run.py SECONDS FLAGS...

tests/test_faults.py kills a run at a moment after a checkpoint; on a fast machine a tiny run can
end before any such moment comes. Held this way, the run lasts as long as the test needs, while
its flags, and so its model_dir, config and checkpoints, are those of the plain command that
resumes it.
"""

import os
import runpy
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from simclr_tf import loop  # noqa: E402


def _held(seconds):
    compiled = loop.compiled_train_loop

    def compiled_and_held(*args, **kwargs):
        train_loop = compiled(*args, **kwargs)

        def held(*loop_args, **loop_kwargs):
            metrics = train_loop(*loop_args, **loop_kwargs)
            time.sleep(seconds)
            return metrics
        return held
    return compiled_and_held


if __name__ == "__main__":
    loop.compiled_train_loop = _held(float(sys.argv[1]))
    sys.argv = ["simclr_tf.run", *sys.argv[2:]]
    runpy.run_module("simclr_tf.run", run_name="__main__", alter_sys=True)
