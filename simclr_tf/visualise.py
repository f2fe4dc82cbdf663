"""What a person looks at to see the embeddings: the files of TensorBoard's embedding projector and
the nearest-neighbour picture.

* The projector: h of a sample of evaluation images (`embeddings.tsv`), their labels and class
  names (`metadata.tsv`) and thumbnails (`sprite.png`) in `<model_dir>/eval_<split>/`, and the
  `<model_dir>/projector_config.pbtxt` that ties them together. TensorBoard's Projector tab then
  shows the sample in PCA, t-SNE or UMAP, coloured by class, as pictures.
* The nearest-neighbour picture: each row is an evaluation image (blue frame) followed by its
  nearest training images under f (cosine similarity of h, most similar first), framed green when
  they share the query's class and red when not. It goes to TensorBoard's Images tab
  (`eval/nearest_neighbours`) and to `<model_dir>/nearest_neighbours.png`.

Both are written for pretraining checkpoints by `evaluate.evaluate_checkpoint`, from the features
the evaluation extracted anyway; only the images are read again.
"""

import os

import numpy as np
import tensorflow as tf
from google.protobuf import text_format
from tensorboard.plugins import projector

from simclr_tf import data as data_lib
from simclr_tf import knn
from simclr_tf.rundir import write_atomically

EMBEDDINGS_FILENAME = "embeddings.tsv"
METADATA_FILENAME = "metadata.tsv"
SPRITE_FILENAME = "sprite.png"
PROJECTOR_CONFIG_FILENAME = "projector_config.pbtxt"  # the name TensorBoard looks for
NEIGHBOURS_FILENAME = "nearest_neighbours.png"
NEIGHBOURS = 8          # columns of the nearest-neighbour picture after the query
CELL = 96               # side of a picture cell in pixels, frame included
FRAME = 4
MAX_SPRITE_THUMBNAIL = 64
QUERY, SAME, OTHER = (60, 110, 230), (40, 170, 60), (220, 40, 40)  # frame colours (RGB)


# --------------------------------------------------------------------------------------------
# Choosing and reading images.

def sample_indices(num_examples, size):
    """`size` indices spread evenly over range(num_examples) (all of them if fewer)."""
    if size >= num_examples:
        return np.arange(num_examples)
    return np.unique(np.linspace(0, num_examples - 1, size).round().astype(np.int64))


def pick_queries(labels, count):
    """Positions of `count` rows of `labels` covering as many classes as possible: the first row
    of each class in order of appearance, then the next rows not yet taken."""
    labels = np.asarray(labels)
    firsts = [int(np.flatnonzero(labels == c)[0]) for c in dict.fromkeys(labels.tolist())]
    chosen = sorted(firsts[:count])
    rest = [i for i in range(len(labels)) if i not in set(chosen)]
    return np.asarray(sorted(chosen + rest[:max(0, count - len(chosen))]), np.int64)


def images_at(dataset, indices):
    """Images number `indices` (counting unmasked examples, in order) of a masked dataset of
    `data.eval_dataset` batches, float32 [len(indices), H, W, 3], in the order of `indices`.
    Reading stops after the largest index."""
    wanted = {int(i) for i in indices}
    found, seen = {}, 0
    last = max(wanted, default=-1)
    for batch in dataset:
        keep = np.flatnonzero(batch[data_lib.MASK].numpy() > 0)
        images = batch[data_lib.IMAGE]
        for row in keep:
            if seen in wanted:
                found[seen] = images[int(row)].numpy()
            seen += 1
        if seen > last:
            break
    missing = sorted(wanted - set(found))
    if missing:
        raise ValueError(f"the dataset has {seen} examples, fewer than index {missing[0]} + 1")
    return np.stack([found[int(i)] for i in indices]) if len(indices) else np.zeros([0])


def nearest_neighbours(queries, bank, k=NEIGHBOURS):
    """Indices [Q, k] of the k most cosine-similar rows of `bank` for each query, best first
    (the kNN classifier's search)."""
    _, index = knn.nearest(queries, bank, k)
    return index.numpy()


# --------------------------------------------------------------------------------------------
# Pictures.

def _to_uint8(images):
    return np.asarray(np.clip(np.round(np.asarray(images) * 255.0), 0, 255), np.uint8)


def _resize(images, side):
    """float [N, H, W, 3] -> [N, side, side, 3]: nearest-neighbour up (crisp pixels), area down."""
    height = images.shape[1]
    if height == side:
        return np.asarray(images)
    method = "nearest" if side > height else "area"
    return tf.image.resize(images, [side, side], method=method).numpy()


def _framed(images, colour, side=CELL, frame=FRAME):
    """uint8 cells [N, side, side, 3]: each image scaled into the cell inside a coloured frame."""
    cells = np.empty([len(images), side, side, 3], np.uint8)
    cells[...] = colour
    inner = side - 2 * frame
    cells[:, frame:frame + inner, frame:frame + inner] = _to_uint8(_resize(images, inner))
    return cells


def neighbour_picture(query_images, query_labels, neighbour_images, neighbour_labels):
    """uint8 [Q * CELL, (1 + k) * CELL, 3]: a row per query, the query then its k neighbours.

    Args:
      query_images: float [Q, H, W, 3] in [0, 1].
      query_labels: int [Q].
      neighbour_images: float [Q, k, H, W, 3] in [0, 1], best first.
      neighbour_labels: int [Q, k].
    """
    rows = []
    for image, label, neighbours, labels in zip(query_images, query_labels, neighbour_images,
                                                neighbour_labels):
        cells = [_framed(image[None], QUERY)[0]]
        cells += [_framed(n[None], SAME if l == label else OTHER)[0]
                  for n, l in zip(neighbours, labels)]
        rows.append(np.concatenate(cells, axis=1))
    return np.concatenate(rows, axis=0)


def sprite(images):
    """uint8 [R * s, R * s, 3]: thumbnails (side s <= MAX_SPRITE_THUMBNAIL) in row-major order on
    the smallest square grid R x R that holds them, the projector's sprite layout; and s."""
    side = min(images.shape[1], MAX_SPRITE_THUMBNAIL)
    thumbnails = _to_uint8(_resize(images, side))
    grid = int(np.ceil(np.sqrt(len(images))))
    canvas = np.zeros([grid * grid, side, side, 3], np.uint8)
    canvas[:len(images)] = thumbnails
    canvas = canvas.reshape(grid, grid, side, side, 3).transpose(0, 2, 1, 3, 4)
    return canvas.reshape(grid * side, grid * side, 3), side


# --------------------------------------------------------------------------------------------
# Files.

def _class_name(label, class_names):
    """The name of label id `label`, or the id itself when the dataset names none for it."""
    label = int(label)
    return class_names[label] if 0 <= label < len(class_names) else str(label)


def write_png(path, pixels):
    write_atomically(path, tf.io.encode_png(pixels).numpy())


def write_projector(run_dir, files_dir, features, labels, images, class_names=(),
                    tensor_name="h"):
    """Writes the projector's files for `features` [N, D], `labels` [N] and `images`
    [N, H, W, 3] (float in [0, 1]) into `files_dir`, and lists them first in
    `run_dir`/projector_config.pbtxt (`files_dir` inside `run_dir`: TensorBoard reads paths
    relative to the config). Returns the config's path.

    The config lives in the run directory itself (the model_dir), not in the evaluation's: there
    it is TensorBoard's first run and these embeddings its first tensor, so the Projector tab
    opens on them; the variables of the run's checkpoint, which TensorBoard adds on its own,
    come after. Embeddings listed from other directories (other eval splits) are kept.
    """
    tf.io.gfile.makedirs(files_dir)
    rows = ("\t".join(f"{v:.6g}" for v in row) for row in np.asarray(features, np.float32))
    write_atomically(os.path.join(files_dir, EMBEDDINGS_FILENAME), "\n".join(rows) + "\n")
    metadata = ["label\tclass"] + [f"{int(l)}\t{_class_name(l, class_names)}" for l in labels]
    write_atomically(os.path.join(files_dir, METADATA_FILENAME), "\n".join(metadata) + "\n")
    pixels, side = sprite(images)
    write_png(os.path.join(files_dir, SPRITE_FILENAME), pixels)

    relative = os.path.relpath(files_dir, run_dir)
    path = os.path.join(run_dir, PROJECTOR_CONFIG_FILENAME)
    config = projector.ProjectorConfig()
    embedding = config.embeddings.add()
    embedding.tensor_name = tensor_name
    embedding.tensor_path = os.path.join(relative, EMBEDDINGS_FILENAME)
    embedding.metadata_path = os.path.join(relative, METADATA_FILENAME)
    embedding.sprite.image_path = os.path.join(relative, SPRITE_FILENAME)
    embedding.sprite.single_image_dim.extend([side, side])
    if tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path) as f:
            old = text_format.Parse(f.read(), projector.ProjectorConfig())
        config.embeddings.extend(e for e in old.embeddings
                                 if os.path.dirname(e.tensor_path) != relative)
    write_atomically(path, text_format.MessageToString(config))
    return path


def write_neighbour_picture(model_dir, summary_dir, step, pixels, description=""):
    """The picture as `<model_dir>/nearest_neighbours.png` and as the TensorBoard image
    `eval/nearest_neighbours` at `step` in `summary_dir`; returns the PNG's path."""
    path = os.path.join(model_dir, NEIGHBOURS_FILENAME)
    write_png(path, pixels)
    writer = tf.summary.create_file_writer(summary_dir)
    with writer.as_default(step=step):
        tf.summary.image("eval/nearest_neighbours", pixels[None], description=description)
    writer.flush()
    return path


def legend(query_labels, class_names=()):
    """Markdown describing the picture's rows (for the TensorBoard image's description)."""
    names = [_class_name(l, class_names) for l in query_labels]
    return ("Each row: an evaluation image (blue frame), then its nearest training images under "
            "f, most similar first; green frame: same class as the query, red: another class. "
            "Rows: " + ", ".join(names) + ".")
