"""Peak memory of NT-Xent forward + backward, global batch 4096, over 1, 4 and 8 logical replicas.

    python bench/loss_memory.py [--batch=4096] [--dim=128]

Each replica count runs in its own process (logical CPU devices are fixed at start-up); the figure
is the growth of the process's peak resident memory (ru_maxrss) over the run, next to the size of
one replica's logits, which is [2n, 2N] (n = N / replicas) and never the full [2N, 2N]. Prints one
JSON line at the end.
"""

import json
import os
import resource
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def _peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(replicas, batch, dim):
    from simclr_tf import distribute
    distribute.split_cpu(replicas)
    import tensorflow as tf
    from simclr_tf.losses import nt_xent

    strategy = distribute.build_strategy("mirrored", replicas) if replicas > 1 \
        else tf.distribute.get_strategy()
    n = batch // replicas
    logits_shapes = []

    def replica_fn(z_a, z_b):
        with tf.GradientTape() as tape:
            tape.watch([z_a, z_b])
            loss = nt_xent(z_a, z_b, temperature=0.1)
        graph = tf.compat.v1.get_default_graph()
        logits_shapes.extend(op.outputs[0].shape.as_list() for op in graph.get_operations()
                             if op.type == "ConcatV2" and op.outputs[0].shape.rank == 2)
        return loss, tape.gradient(loss, [z_a, z_b])

    @tf.function
    def step():
        z = tf.random.normal([n, dim])
        return strategy.run(replica_fn, args=(z, tf.random.normal([n, dim])))

    step.get_concrete_function()
    base = _peak_mib()
    step()
    peak = _peak_mib() - base
    per_replica_logits = 2 * n * 2 * batch * 4 / 2 ** 20
    print(json.dumps({"replicas": replicas, "peak_growth_mib": round(peak, 1),
                      "per_replica_logits_shape": [2 * n, 2 * batch],
                      "traced_concat_shapes": sorted({tuple(s) for s in logits_shapes}),
                      "per_replica_logits_mib": round(per_replica_logits, 1)}))


def main():
    args = dict(a.lstrip("-").split("=") for a in sys.argv[1:])
    batch, dim = int(args.get("batch", 4096)), int(args.get("dim", 128))
    if "child" in args:
        return child(int(args["child"]), batch, dim)
    rows = []
    for replicas in (1, 4, 8):
        out = subprocess.run([sys.executable, __file__, f"--child={replicas}", f"--batch={batch}",
                              f"--dim={dim}"], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(json.dumps({"benchmark": "loss_memory", "global_batch": batch, "dim": dim,
                      "runs": rows}))


if __name__ == "__main__":
    main()
