"""Coarser labels for evaluation (`--label_map`): the granularity lens of Cole et al. 2022.

A label map names, for every class of a dataset, the coarse class it belongs to. It is a JSON
object {fine class name or id: coarse class name} in a file, or a built-in map by name:

* `fashion_mnist_coarse`: Fashion-MNIST's 10 classes as 6 kinds of garment by where they are
  worn: tops (T-shirt/top, pullover, shirt), bottoms (trouser), dresses (dress), outerwear (coat),
  footwear (sandal, sneaker, ankle boot) and bags (bag). The fine task's hard confusions (shirt vs
  T-shirt vs pullover, sandal vs sneaker vs boot) fall inside a coarse class, while coat vs
  pullover, the one that crosses the body-part line, stays between two.

Coarse ids follow the order in which the coarse names first appear over the fine ids. Evaluation
maps the labels of the bank and the eval split (kNN and the linear evaluation are then fitted to
the coarse classes), and scores a fine-level head (the pretraining probe, a fine-tuned classifier)
by adding up its softmax over each coarse class.
"""

import dataclasses
import json

import numpy as np
import tensorflow as tf

BUILTIN = {
    "fashion_mnist_coarse": {
        "T-shirt/top": "tops", "Trouser": "bottoms", "Pullover": "tops", "Dress": "dresses",
        "Coat": "outerwear", "Sandal": "footwear", "Shirt": "tops", "Sneaker": "footwear",
        "Bag": "bags", "Ankle boot": "footwear"},
}


class LabelMapError(ValueError):
    """The label map cannot be read or does not fit the dataset; one line naming --label_map."""


@dataclasses.dataclass(frozen=True)
class LabelMap:
    """fine_to_coarse[fine id] = coarse id; names[coarse id] = coarse class name."""
    fine_to_coarse: np.ndarray
    names: tuple

    @property
    def num_classes(self):
        return len(self.names)

    def labels(self, fine_labels):
        """Coarse labels of a tensor of fine labels."""
        return tf.gather(tf.constant(self.fine_to_coarse), fine_labels)

    def logits(self, fine_logits):
        """Coarse log-probabilities [N, C] from fine logits [N, F]: log of the summed softmax."""
        fine_logits = np.asarray(fine_logits, np.float64)
        shifted = np.exp(fine_logits - fine_logits.max(axis=1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
        one_hot = np.eye(self.num_classes)[self.fine_to_coarse]
        return np.log(np.maximum(probabilities @ one_hot, 1e-30)).astype(np.float32)


def load(spec, class_names, num_classes):
    """The `LabelMap` `spec` (a built-in name or a JSON file) gives a dataset of `num_classes`
    classes named `class_names` (() when unnamed: the map then uses ids)."""
    if spec in BUILTIN:
        mapping = BUILTIN[spec]
    else:
        try:
            with tf.io.gfile.GFile(spec) as f:
                mapping = json.load(f)
        except (tf.errors.OpError, OSError, ValueError) as e:
            raise LabelMapError(f"label_map={spec}: neither a built-in map "
                                f"({', '.join(BUILTIN)}) nor a readable JSON file ({e})") from None
        if not isinstance(mapping, dict):
            raise LabelMapError(f"label_map={spec} must hold a JSON object {{fine: coarse}}")
    keys = {str(k): str(v) for k, v in mapping.items()}
    coarse, names = [], []
    for fine in range(num_classes):
        name = class_names[fine] if fine < len(class_names) else str(fine)
        target = keys.get(name, keys.get(str(fine)))
        if target is None:
            raise LabelMapError(f"label_map={spec} does not map class {fine} ({name!r}) of the "
                                "dataset: map every class, by name or id")
        if target not in names:
            names.append(target)
        coarse.append(names.index(target))
    known = set(class_names) | {str(i) for i in range(num_classes)}
    unknown = sorted(set(keys) - known)
    if unknown:
        raise LabelMapError(f"label_map={spec} maps {unknown[0]!r}, which is not a class of the "
                            f"dataset ({len(unknown)} such)")
    return LabelMap(np.asarray(coarse, np.int32), tuple(names))
