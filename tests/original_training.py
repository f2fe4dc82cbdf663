"""The training-step fixtures of the original SimCLR TF2 code: cases, inputs and update sketches.

Shared by `tests/data/original/make_training_reference.py` (which runs the original code's
training step on these inputs) and `tests/test_training_fidelity.py` (which runs ours), so both
sides read the same settings and draw the same batches.

A case trains a model whose weights start at `original_layout.recipe_value` for STEPS steps.
The fixture keeps, for every variable, the exact L2 norm of its update (trained minus initial)
and a sketch of it: the update at SKETCH_SIZE positions drawn from the variable's path. Nothing
in this file comes from the original code: only its flag and variable names do.
"""

import json
import os
import zlib

import numpy as np

from original_layout import FIXTURES

STEPS = 6
# Updates are recorded after these many steps: after the first step that moves the weights (the
# first learning rate is 0), and after the last.
SNAPSHOTS = {"first": 2, "final": STEPS}
BATCH = 8
IMAGE_SIZE = 32  # the original's CIFAR stem (3x3 stride 1, no max-pool) at <= 32 px
NUM_CLASSES = 10
# An "epoch" of 80 examples is 10 steps at batch 8: warmup_epochs=0.2 warms up over 2 steps
# (learning rates 0, peak/2, then the cosine), and train_steps=20 keeps the cosine well above 0.
NUM_EXAMPLES = 80
WARMUP_EPOCHS = 0.2
TRAIN_STEPS = 20
SKETCH_SIZE = 256
INPUT_SEED = 2026

_R18 = dict(resnet_depth=18, width_multiplier=1, sk_ratio=0.0, se_ratio=0.0)
# Every setting either side needs: the original's flag names (and values).
CASES = {
    # SimCLR pretraining as the paper: LARS, a 2-layer head, the linear probe on stop_grad(h).
    "r18_lars": dict(_R18, num_proj_layers=2, train_mode="pretrain", optimizer="lars",
                     learning_rate=0.2, weight_decay=1e-3, temperature=0.2,
                     batch_norm_decay=0.9),
    # The same with Nesterov momentum: every weight but BN's is decayed through the loss.
    "r18_momentum": dict(_R18, num_proj_layers=2, train_mode="pretrain", optimizer="momentum",
                         learning_rate=0.001, weight_decay=1e-3, temperature=0.1,
                         batch_norm_decay=0.9),
    # SimCLRv2: selective kernels (the original has them in bottleneck blocks only), ResNet-D
    # shortcuts, a 3-layer head.
    "r50_sk_head3": dict(resnet_depth=50, width_multiplier=1, sk_ratio=0.0625, se_ratio=0.0,
                         num_proj_layers=3, train_mode="pretrain", optimizer="lars",
                         learning_rate=0.2, weight_decay=1e-3, temperature=0.1,
                         batch_norm_decay=0.95),
    # Fine-tuning from the middle of a 3-layer head, block groups 1-2 and the stem frozen.
    "r18_finetune": dict(_R18, num_proj_layers=3, train_mode="finetune", optimizer="momentum",
                         learning_rate=0.01, weight_decay=1e-3, temperature=0.1,
                         batch_norm_decay=0.9, fine_tune_after_block=2, ft_proj_selector=1),
}


def case_flags(name):
    """The original's flags of case `name` (beyond its defaults), as {flag: value}."""
    settings = dict(CASES[name])
    return dict(settings, image_size=IMAGE_SIZE, train_batch_size=BATCH,
                warmup_epochs=WARMUP_EPOCHS, train_steps=TRAIN_STEPS, momentum=0.9,
                learning_rate_scaling="linear", hidden_norm=True, proj_out_dim=128,
                proj_head_mode="nonlinear", lineareval_while_pretraining=True, use_blur=False,
                global_bn=False, fine_tune_after_block=settings.get("fine_tune_after_block", -1),
                ft_proj_selector=settings.get("ft_proj_selector", 0))


def batches(name):
    """The STEPS batches of case `name`: [{view_a, view_b, label}], views float32 NHWC in
    [0, 1], labels in 0..NUM_CLASSES-1 (int32). Fine-tuning reads view_a only.

    Each example is a colour of its own plus a coarse 4x4 pattern of its own; its two views add
    their own pixel noise. Images of i.i.d. uniform pixels would all look alike to the network:
    their h differ so little that batch norm in the head divides float rounding by a tiny batch
    deviation, and two float orders then disagree by percents.
    """
    rng = np.random.default_rng([INPUT_SEED, zlib.crc32(name.encode())])
    out = []
    cell = IMAGE_SIZE // 4
    for _ in range(STEPS):
        colour = rng.uniform(0.1, 0.9, size=(BATCH, 1, 1, 3))
        pattern = np.kron(rng.uniform(-0.25, 0.25, size=(BATCH, 4, 4, 3)),
                          np.ones((1, cell, cell, 1)))
        views = [np.clip(colour + pattern + rng.uniform(-0.1, 0.1, size=pattern.shape), 0, 1)
                 .astype(np.float32) for _ in range(2)]
        out.append({"view_a": views[0], "view_b": views[1],
                    "label": rng.integers(0, NUM_CLASSES, size=BATCH).astype(np.int32)})
    return out


def sketch_indices(path, size):
    """Positions (into the flattened variable) kept in the sketch of the variable at `path`."""
    rng = np.random.default_rng(zlib.crc32(path.encode()))
    return np.sort(rng.choice(size, min(size, SKETCH_SIZE), replace=False))


def sketch(path, update):
    """The update's values at `sketch_indices` (float32)."""
    flat = np.asarray(update).reshape(-1)
    return flat[sketch_indices(path, flat.size)].astype(np.float32)


def group_of(path):
    """The group whose updates are compared together: "supervised" (the supervised head, which
    LARS leaves to momentum), "kernels" (conv and dense kernels of f and g), "bn_params" (gamma,
    beta) or "bn_moving" (moving mean and variance)."""
    leaf = path.rsplit("/", 1)[-1]
    if "/supervised_head/" in path or path.startswith("model/supervised_head/"):
        return "supervised"
    if leaf == "kernel":
        return "kernels"
    if leaf in ("gamma", "beta"):
        return "bn_params"
    if leaf in ("moving_mean", "moving_variance"):
        return "bn_moving"
    if leaf == "bias":
        return "biases"
    raise ValueError(f"no group for variable {path}")


def relative_difference(a, b):
    """||a - b|| / ||b|| of two lists of arrays (float64; 0 when both are 0)."""
    a = np.concatenate([np.asarray(x, np.float64).reshape(-1) for x in a])
    b = np.concatenate([np.asarray(x, np.float64).reshape(-1) for x in b])
    norm = np.linalg.norm(b)
    diff = np.linalg.norm(a - b)
    return float(diff / norm) if norm else float(diff)


def load(name):
    """(description, {"<snapshot>/<path>": sketch}) of the fixture of case `name`."""
    with open(os.path.join(FIXTURES, f"training_{name}.json")) as f:
        description = json.load(f)
    with np.load(os.path.join(FIXTURES, f"training_{name}.npz")) as sketches:
        return description, dict(sketches)
