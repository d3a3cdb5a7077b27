"""Connected components of a class map in plain numpy (no scipy): min-label propagation with pointer jumping."""

from __future__ import annotations

import numpy as np


def label_components(classes: np.ndarray) -> np.ndarray:
    """4-connected components of equal classes.

    classes: (H, W) ints, negative = not part of any component.
    Returns (H, W) int64 labels: each pixel gets the flat index (row * W + col) of the first pixel of its
    component, so a component's root pixel is the one whose label equals its own index; -1 where ignored.

    Each round lets every pixel take the smallest label among itself and its same-class 4-neighbours, then jumps
    pointers (label <- label of the pixel named by label), which roughly halves the remaining distance each
    round; the fixed point gives every pixel its component's minimum index.
    """
    classes = np.asarray(classes)
    h, w = classes.shape
    valid = classes >= 0
    none = h * w  # larger than any index: "no label yet" for ignored pixels
    lab = np.where(valid, np.arange(h * w).reshape(h, w), none)
    # Which neighbour pairs are joined: same class and both valid.  (H, W-1) and (H-1, W)
    join_x = valid[:, :-1] & valid[:, 1:] & (classes[:, :-1] == classes[:, 1:])
    join_y = valid[:-1, :] & valid[1:, :] & (classes[:-1, :] == classes[1:, :])
    flat_valid = valid.ravel()
    while True:
        new = lab.copy()
        np.minimum(new[:, :-1], np.where(join_x, lab[:, 1:], none), out=new[:, :-1])
        np.minimum(new[:, 1:], np.where(join_x, lab[:, :-1], none), out=new[:, 1:])
        np.minimum(new[:-1, :], np.where(join_y, lab[1:, :], none), out=new[:-1, :])
        np.minimum(new[1:, :], np.where(join_y, lab[:-1, :], none), out=new[1:, :])
        flat = new.ravel()
        flat[flat_valid] = flat[flat[flat_valid]]  # pointer jump: a label is a pixel of the same component
        if np.array_equal(new, lab):
            break
        lab = new
    return np.where(valid, lab, -1)
