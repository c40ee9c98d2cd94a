"""Cells classified a batch at a time, as `smearnet predict` and the served model decode them: the class
probabilities and (for a MIL rule) the embeddings of every cell, in order, with NaN rows for undecodable ones."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image

from smearnet.models.inference import TrainedModel
from smearnet.smear.calls import cell_outputs_for_images


def classify_in_batches(model: TrainedModel, batches: Iterable[Sequence[Image.Image | None]], *,
                        embeddings: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities (n_cells x n_classes) and embeddings (when asked) of the cells of `batches`, each batch
    decoded by the caller and classified before the next is decoded; `None` entries (undecodable) get NaN rows.

    Embeddings are None unless asked; asked, they have 0 columns when no cell of any batch could be decoded
    (every smear's bag is then empty)."""
    probabilities, features = [], []
    for images in batches:
        batch_probabilities, batch_features = cell_outputs_for_images(model, images, embeddings=embeddings)
        probabilities.append(batch_probabilities)
        features.append((len(images), batch_features))
    width = next((f.shape[1] for _, f in features if f is not None), None)
    stacked = np.concatenate(probabilities) if probabilities else np.zeros((0, len(model.classes)), dtype=np.float32)
    if not embeddings:
        return stacked, None
    if width is None:
        return stacked, np.zeros((len(stacked), 0), dtype=np.float32)
    # A batch of only undecodable cells has no embeddings: NaN rows of the others' width keep the cells in order.
    return stacked, np.concatenate([f if f is not None else np.full((n, width), np.nan, dtype=np.float32)
                                    for n, f in features])


__all__ = ["classify_in_batches"]
