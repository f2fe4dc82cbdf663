"""Pieces several benches share: the matmul peak, the FLOPs of f, the bare encoder step, the
full SimCLR step fed by the real input pipeline, photo-like JPEGs and a threaded request load.

They take explicit arguments (no absl flags), so any bench can import them without taking the
flags of another bench; `define_step_flags` defines, when a bench calls it, the flags the benches
of one training step share.
"""

import threading
import time


def define_step_flags(flags, steps_help):
    """The flags of a bench of one training step (train_throughput, step_profile): the model,
    the batch, the precision, how many steps a loop runs, and the full step's dataset. Adopted as
    the calling bench's own (its --help lists them)."""
    flags.DEFINE_integer("depth", 18, "ResNet depth.")
    flags.DEFINE_integer("image_size", 32, "View side.")
    flags.DEFINE_integer("batch", 128, "Global batch (images).")
    flags.DEFINE_string("precision", "float32", "float32, bfloat16 or float16.")
    flags.DEFINE_integer("steps", 3, steps_help)
    flags.DEFINE_string("dataset", "fashion_mnist", "Dataset of the full step.")
    flags.DEFINE_string("data_dir", None, "tensorflow-datasets directory.")


def matmul_gflops(tf, size=2048, dtype=None, repeats=5, chain=1):
    """Best of `repeats` timed calls of `chain` `tf.matmul`s of size x size matrices of `dtype`
    (float32 if None) on the default device, in GFLOP/s (2 x size^3 per product), after one
    warm-up call.

    With chain > 1 each product takes the previous one as input (so none can be skipped or run
    at once with another), which spreads the cost of one call and its wait over `chain` products
    (on a GPU that cost is tens of microseconds, a few percent of one 8192^3 bf16 product); its
    matrices are normal / sqrt(size), so the chained products keep their scale in float16.
    """
    dtype = dtype or tf.float32
    if chain == 1:
        a = tf.cast(tf.random.uniform([size, size]), dtype)
        b = tf.cast(tf.random.uniform([size, size]), dtype)
    else:
        a = tf.cast(tf.random.normal([size, size]), dtype)
        b = tf.cast(tf.random.normal([size, size]) / size ** 0.5, dtype)

    def products(x, y):
        for _ in range(chain):
            x = tf.matmul(x, y)
        # The reduction brings one scalar back, so .numpy() waits for the products and no more.
        return tf.reduce_sum(tf.cast(x, tf.float32))

    matmul = tf.function(products)
    matmul(a, b).numpy()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        matmul(a, b).numpy()
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 * chain / best / 1e9


def forward_flops_per_view(encoder, keras):
    """2 x multiply-adds of every conv and dense layer of f, for one view."""
    macs = 0
    for layer in encoder.layers:
        if isinstance(layer, keras.layers.Conv2D):
            out_h, out_w, out_c = layer.output.shape[1:]
            k_h, k_w, in_c, _ = layer.kernel.shape
            macs += out_h * out_w * out_c * k_h * k_w * in_c
        elif isinstance(layer, keras.layers.Dense):
            macs += layer.kernel.shape[0] * layer.kernel.shape[1]
    return 2 * macs


def bare_encoder_loop(tf, strategy, config, batch, steps, jit):
    """A callable(count=steps) running bare encoder steps (forward + backward of f alone on random
    inputs, 2 x `batch` views, loss mean(h^2), plain SGD), and the encoder. The encoder follows
    the global Keras dtype policy in force when this is called."""
    import keras
    from simclr_tf import models
    with strategy.scope():
        encoder = models.build_encoder(config.encoder, config.data.image_size,
                                       global_bn=strategy.num_replicas_in_sync > 1)
        sgd = keras.optimizers.SGD(0.01)
        sgd.build(encoder.trainable_variables)
    per_replica = 2 * batch // strategy.num_replicas_in_sync
    size = config.data.image_size

    def replica_step():
        views = tf.random.uniform([per_replica, size, size, 3])
        with tf.GradientTape() as tape:
            h = encoder(views, training=True)
            loss = tf.reduce_mean(tf.square(tf.cast(h, tf.float32)))
            loss /= strategy.num_replicas_in_sync
        grads = tape.gradient(loss, encoder.trainable_variables)
        sgd.apply_gradients(zip(grads, encoder.trainable_variables))

    step = tf.function(replica_step, jit_compile=True) if jit else replica_step

    @tf.function
    def loop(count):
        for _ in tf.range(count):
            strategy.run(step)
        return tf.constant(0)

    # The step count is a tensor argument: calls with another count reuse the same trace.
    return lambda count=steps: loop(tf.constant(count)).numpy(), encoder


def full_step_loop(tf, strategy, config, steps, dataset_options=None):
    """A callable(count=steps) running full SimCLR steps through `pretrain.Pretrainer`'s compiled loop,
    fed by the real input pipeline (`pretrain.make_dataset_fn(config)`), and the trainer."""
    from simclr_tf import data, pretrain
    from simclr_tf.schedules import make_schedule
    info = data.dataset_info(config.data.dataset, config.data.train_split, config.data.data_dir)
    schedule = make_schedule(config.train, config.optimizer, info.num_examples)
    trainer = pretrain.Pretrainer(config, strategy, schedule, num_classes=info.num_classes)
    dataset_fn = pretrain.make_dataset_fn(config)

    def distributed(context):
        dataset = dataset_fn(context, 0)
        return dataset.with_options(dataset_options) if dataset_options else dataset

    iterator = iter(strategy.distribute_datasets_from_function(distributed))
    loop = trainer.make_train_loop()
    # `steps` is a tensor argument: calls with another count reuse the same trace.
    return lambda count=steps: loop(iterator, tf.constant(count))["loss"].numpy(), trainer


def photo_jpegs(count, side=224, seed=0):
    """`count` photo-like JPEGs (quality 90, smooth gradients plus noise) of side x side px."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    ramp = np.add.outer(np.arange(side), np.arange(side))[..., None]
    files = []
    for i in range(count):
        pixels = (ramp * rng.uniform(0.2, 1.0, 3) + rng.normal(0, 12, (side, side, 3))
                  + 40 * i) % 256
        files.append(tf.io.encode_jpeg(pixels.astype(np.uint8), quality=90).numpy())
    return files


def timed_load(call, count, threads):
    """Seconds for `count` calls of call() spread over `threads` threads (after one warm-up)."""
    call()
    remaining = [count]
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                if remaining[0] == 0:
                    return
                remaining[0] -= 1
            call()

    t0 = time.perf_counter()
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return time.perf_counter() - t0
