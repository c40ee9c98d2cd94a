"""A network's cell embeddings: the features its classifier reads (the penultimate layer).

One place for them, below every user: the MIL smear score (`smearnet.smear.mil`, frozen embeddings), the
contrastive pretraining objective (`smearnet.models.training`, with gradients) and the k-NN yardstick of
pretrained features (`smearnet.models.pretraining`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from smearnet.errors import SmearnetError
from smearnet.models.inference import TrainedModel


def classifier_layer(net: nn.Module) -> nn.Module:
    """The network's classifier layer (timm's `get_classifier`, lightcnn's too, or a `classifier` attribute)."""
    getter = getattr(net, "get_classifier", None)
    layer = getter() if callable(getter) else getattr(net, "classifier", None)
    if not isinstance(layer, nn.Module) or isinstance(layer, nn.Identity):
        raise SmearnetError(
            f"Cannot find the classifier layer of {type(net).__name__} to read the cell embeddings from.",
            "Use a timm model (forward_head) or a model with get_classifier() / a `classifier` attribute.",
        )
    return layer


def _timm_outputs(net: nn.Module) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
    """``images -> (logits, pre-logits)`` for a timm-style model (forward_features + forward_head), else None."""
    forward_features = getattr(net, "forward_features", None)
    forward_head = getattr(net, "forward_head", None)
    if not (callable(forward_features) and callable(forward_head)):
        return None

    def outputs(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = forward_features(images)
        return forward_head(features), forward_head(features, pre_logits=True)

    return outputs


def logits_and_embeddings(net: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and penultimate-layer embeddings ``(n, d)`` of a batch in one pass, under the caller's grad mode.

    timm's ``forward_head(forward_features(x), pre_logits=True)`` (pooled features before the classifier) when the
    model has ``forward_head``; otherwise the input of the classifier layer, captured by a forward pre-hook during
    ``net(x)``.
    """
    timm_outputs = _timm_outputs(net)
    if timm_outputs is not None:
        logits, embeddings = timm_outputs(images)
        return logits, embeddings.flatten(1)
    captured: list[torch.Tensor] = []
    handle = classifier_layer(net).register_forward_pre_hook(lambda _module, inputs: captured.append(inputs[0]))
    try:
        logits = net(images)
    finally:
        handle.remove()
    return logits, captured[-1].flatten(1)


def batch_embeddings(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Penultimate-layer embeddings ``(n, d)`` of a batch, eager fp32, detached (`logits_and_embeddings`)."""
    return logits_and_embeddings(net, images)[1].detach().float()


@torch.inference_mode()
def cell_embeddings(model: TrainedModel, manifest: pd.DataFrame, *, batch_size: int = 32) -> np.ndarray:
    """Penultimate-layer embeddings ``(n_cells, d)`` of every row of ``manifest``, from the eager network."""
    from smearnet.data.loaders import make_loader

    net = model.net.eval()
    loader = make_loader(manifest, model.classes, model.input_spec, batch_size=batch_size, shuffle=False)
    chunks = [batch_embeddings(net, images).numpy() for images, _ in loader]
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)
