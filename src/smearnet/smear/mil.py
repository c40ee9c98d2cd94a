"""Attention-based multiple-instance learning over frozen cell embeddings (Ilse et al. 2018).

A smear is a bag of cells.  Each cell's embedding (the selected backbone's penultimate
layer, `smearnet.models.embeddings`) is standardised, encoded by a small layer, weighted by a
*gated attention* ``a_k = softmax_k(w^T (tanh(V h_k) * sigmoid(U h_k)))`` and the weighted
mean is classified: one probability per smear, trained on smear labels only.  The backbone
stays frozen; the aggregator has a few thousand parameters and trains in seconds on CPU.

Scores are permutation-invariant in a bag's cells; a bag without cells scores NaN (as every
smear score in ``smearnet.smear`` does).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from smearnet.errors import SmearnetError
from smearnet.models.embeddings import batch_embeddings
from smearnet.models.inference import TrainedModel

MIL_WEIGHTS = "mil.safetensors"
MIL_META = "mil.json"


# --- cell embeddings from the selected backbone ------------------------------------------


@dataclass(frozen=True)
class CellOutputs:
    """Row-aligned logits ``(n, n_classes)`` and penultimate-layer embeddings ``(n, d)``."""

    logits: np.ndarray
    embeddings: np.ndarray


@torch.inference_mode()
def cell_outputs(model: TrainedModel, manifest: pd.DataFrame, *, batch_size: int = 32, progress: bool = False,
                 embeddings: bool = True) -> CellOutputs:
    """Logits (through the model's inference engine) and, when asked, embeddings of every row of ``manifest``.

    Logits come from ``model.logits``, the engine predict and serving run, so a smear rule fitted on them is
    applied to the same numbers where it is served.  Embeddings (for the MIL score) come from the eager
    network (:func:`batch_embeddings`); without them the array has zero columns.
    """
    from tqdm import tqdm

    from smearnet.data.loaders import make_loader

    net = model.net.eval()
    loader = make_loader(manifest, model.classes, model.input_spec, batch_size=batch_size, shuffle=False)
    logits_chunks: list[np.ndarray] = []
    embedding_chunks: list[np.ndarray] = []
    for images, _ in tqdm(loader, desc="cell outputs", unit="batch", disable=not progress):
        logits_chunks.append(model.logits(images).float().numpy())
        if embeddings:
            embedding_chunks.append(batch_embeddings(net, images).numpy())
    if not logits_chunks:
        return CellOutputs(np.zeros((0, len(model.classes)), np.float32), np.zeros((0, 0), np.float32))
    stacked = np.concatenate(embedding_chunks) if embedding_chunks else np.zeros((sum(map(len, logits_chunks)), 0),
                                                                                 np.float32)
    return CellOutputs(np.concatenate(logits_chunks), stacked)


# --- the aggregator ------------------------------------------------------------------------


class GatedAttentionMIL(nn.Module):
    """Gated attention pooling (Ilse, Tomczak & Welling 2018, eq. 9) and a linear bag classifier."""

    def __init__(self, in_features: int, hidden: int = 64, attention: int = 32, dropout: float = 0.0) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention_v = nn.Linear(hidden, attention)
        self.attention_u = nn.Linear(hidden, attention)
        self.attention_w = nn.Linear(attention, 1)
        self.classifier = nn.Linear(hidden, 1)

    def forward(self, instances: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``instances (B, N, D)``, ``mask (B, N)`` (True = real cell) -> bag logits ``(B,)``, attention ``(B, N)``.

        Every bag needs at least one real cell (an all-padding row would give NaN attention).
        """
        hidden = self.encoder(instances)
        gate = torch.tanh(self.attention_v(hidden)) * torch.sigmoid(self.attention_u(hidden))
        attention_logits = self.attention_w(gate).squeeze(-1).masked_fill(~mask, float("-inf"))
        attention = torch.softmax(attention_logits, dim=1)
        pooled = (attention.unsqueeze(-1) * hidden).sum(dim=1)
        return self.classifier(pooled).squeeze(-1), attention


@dataclass(frozen=True)
class MILConfig:
    """Aggregator size and training schedule (Adam, class-balanced BCE on bags)."""

    hidden: int = 64
    attention: int = 32
    dropout: float = 0.1
    epochs: int = 25
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4

    def __post_init__(self) -> None:
        for name in ("hidden", "attention", "epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise SmearnetError(f"aggregate.mil.{name} must be >= 1; got {getattr(self, name)}.",
                                    "Use the defaults in conf/config.yaml.")
        if not 0.0 <= self.dropout < 1.0 or self.lr <= 0.0 or self.weight_decay < 0.0:
            raise SmearnetError(
                f"Invalid MIL optimisation settings (dropout {self.dropout}, lr {self.lr}, "
                f"weight_decay {self.weight_decay}).",
                "Use 0 <= dropout < 1, lr > 0, weight_decay >= 0.",
            )

    @classmethod
    def from_mapping(cls, values: Any) -> MILConfig:
        known = {key: values[key] for key in cls.__dataclass_fields__ if key in values}
        unknown = set(values) - set(known)
        if unknown:
            raise SmearnetError(f"Unknown aggregate.mil key(s) {sorted(unknown)}.",
                                f"Use only {sorted(cls.__dataclass_fields__)}.")
        casts: dict[str, type] = {"dropout": float, "lr": float, "weight_decay": float}
        typed: dict[str, Any] = {key: casts.get(key, int)(value) for key, value in known.items()}
        return cls(**typed)


def _bag_arrays(bags: Sequence[np.ndarray]) -> list[np.ndarray]:
    arrays = [np.asarray(bag, dtype=np.float32) for bag in bags]
    widths = {bag.shape[1] for bag in arrays if bag.ndim == 2 and len(bag)}
    if any(bag.ndim != 2 for bag in arrays) or len(widths) > 1:
        raise SmearnetError(
            f"Bags must be 2-D arrays (cells x features) of one width; got widths {sorted(widths)}.",
            "Pass one (n_cells, d) embedding array per smear.",
        )
    if any(not np.all(np.isfinite(bag)) for bag in arrays):
        raise SmearnetError("Cell embeddings contain NaN or infinite values.", "Check the backbone outputs.")
    return arrays


def _padded(bags: Sequence[np.ndarray], mean: np.ndarray, std: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(bag) for bag in bags)
    instances = np.zeros((len(bags), longest, len(mean)), dtype=np.float32)
    mask = np.zeros((len(bags), longest), dtype=bool)
    for row, bag in enumerate(bags):
        instances[row, : len(bag)] = (bag - mean) / std
        mask[row, : len(bag)] = True
    return torch.from_numpy(instances), torch.from_numpy(mask)


@dataclass
class MILAggregator:
    """A trained :class:`GatedAttentionMIL` with the feature standardisation it was trained with."""

    net: GatedAttentionMIL
    mean: np.ndarray
    std: np.ndarray
    config: MILConfig

    @property
    def in_features(self) -> int:
        return len(self.mean)

    @torch.inference_mode()
    def _forward(self, bags: Sequence[np.ndarray], batch_size: int = 256) -> tuple[np.ndarray, list[np.ndarray]]:
        arrays = _bag_arrays(bags)
        if any(len(bag) and bag.shape[1] != self.in_features for bag in arrays):
            raise SmearnetError(
                f"The aggregator was trained on {self.in_features}-d embeddings; got other widths.",
                "Score embeddings from the backbone the aggregator was trained on.",
            )
        self.net.eval()
        scores = np.full(len(arrays), np.nan)
        attention: list[np.ndarray] = [np.zeros(0) for _ in arrays]
        filled = [i for i, bag in enumerate(arrays) if len(bag)]
        for start in range(0, len(filled), batch_size):
            chunk = filled[start : start + batch_size]
            instances, mask = _padded([arrays[i] for i in chunk], self.mean, self.std)
            logits, weights = self.net(instances, mask)
            for position, index in enumerate(chunk):
                scores[index] = float(torch.sigmoid(logits[position]))
                attention[index] = weights[position, : len(arrays[index])].numpy().astype(np.float64)
        return scores, attention

    def score(self, bags: Sequence[np.ndarray]) -> np.ndarray:
        """Probability that each bag is positive; NaN for a bag without cells."""
        return self._forward(bags)[0]

    def attention(self, bags: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Each bag's attention weights over its cells (sum 1; empty for an empty bag)."""
        return self._forward(bags)[1]


def train_mil(bags: Sequence[np.ndarray], labels: Sequence[bool] | np.ndarray, config: MILConfig | None = None,
              *, seed: int = 0) -> MILAggregator:
    """Train a gated-attention aggregator on bags of cell embeddings and their smear labels.

    Deterministic for a given ``seed`` (torch's global RNG is forked, not disturbed).  Bags
    without cells are skipped; at least one positive and one negative bag are needed.
    """
    config = config or MILConfig()
    arrays = _bag_arrays(bags)
    truth = np.asarray(labels, dtype=bool)
    if truth.shape != (len(arrays),):
        raise SmearnetError(f"Got {len(arrays)} bags but {truth.shape} labels.", "Pass one label per bag.")
    keep = [i for i, bag in enumerate(arrays) if len(bag)]
    arrays, truth = [arrays[i] for i in keep], truth[keep]
    n_positive, n_negative = int(truth.sum()), int((~truth).sum())
    if n_positive == 0 or n_negative == 0:
        raise SmearnetError(
            f"Training the MIL aggregator needs positive and negative bags; got {n_positive} and {n_negative}.",
            "Compose smears of both classes from the development cells.",
        )
    stacked = np.concatenate(arrays)
    mean = stacked.mean(axis=0).astype(np.float32)
    std = np.maximum(stacked.std(axis=0), 1e-6).astype(np.float32)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors this small only pay thread overhead (10x slower with 2 busy cores)
    try:
        with torch.random.fork_rng(devices=[]):
            return _fit(arrays, truth, mean, std, config, seed)
    finally:
        torch.set_num_threads(threads)


def _fit(arrays: list[np.ndarray], truth: np.ndarray, mean: np.ndarray, std: np.ndarray, config: MILConfig,
         seed: int) -> MILAggregator:
    """Mini-batch Adam on class-balanced BCE; batches are cut to their longest bag."""
    n_positive, n_negative = int(truth.sum()), int((~truth).sum())
    instances, mask = _padded(arrays, mean, std)
    targets = torch.from_numpy(truth.astype(np.float32))
    torch.manual_seed(seed)
    net = GatedAttentionMIL(len(mean), config.hidden, config.attention, config.dropout)
    optimiser = torch.optim.Adam(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(n_negative / n_positive))
    generator = torch.Generator().manual_seed(seed)
    net.train()
    for _epoch in range(config.epochs):
        order = torch.randperm(len(arrays), generator=generator)
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            longest = int(mask[batch].sum(dim=1).max())
            logits, _ = net(instances[batch, :longest], mask[batch, :longest])
            loss = loss_fn(logits, targets[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return MILAggregator(net=net.eval(), mean=mean, std=std, config=config)


def save_mil(aggregator: MILAggregator, folder: Path) -> Path:
    """Weights (with the standardisation) as safetensors and the configuration as JSON in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().contiguous() for key, value in aggregator.net.state_dict().items()}
    state["standardise.mean"] = torch.from_numpy(aggregator.mean.copy())
    state["standardise.std"] = torch.from_numpy(aggregator.std.copy())
    save_file(state, str(folder / MIL_WEIGHTS))
    meta = {"in_features": aggregator.in_features, "config": asdict(aggregator.config),
            "reference": "Ilse, Tomczak & Welling 2018, gated attention"}
    (folder / MIL_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return folder


def load_mil(folder: Path) -> MILAggregator:
    """Rebuild an aggregator written by :func:`save_mil` (no pickle)."""
    folder = Path(folder)
    if not (folder / MIL_WEIGHTS).is_file() or not (folder / MIL_META).is_file():
        raise SmearnetError(f"{folder} holds no MIL aggregator ({MIL_META} + {MIL_WEIGHTS}).",
                            "Run `dvc repro aggregate` first.")
    meta = json.loads((folder / MIL_META).read_text())
    config = MILConfig.from_mapping(meta["config"])
    state = load_file(str(folder / MIL_WEIGHTS))
    mean, std = state.pop("standardise.mean").numpy(), state.pop("standardise.std").numpy()
    net = GatedAttentionMIL(int(meta["in_features"]), config.hidden, config.attention, config.dropout)
    net.load_state_dict(state)
    return MILAggregator(net=net.eval(), mean=mean, std=std, config=config)


def logit_features(probabilities: Sequence[np.ndarray], clip: float = 1e-6) -> list[np.ndarray]:
    """Each smear's cell probabilities as a one-feature bag ``logit(p)``: MIL over probabilities alone."""
    bags = []
    for values in probabilities:
        p = np.clip(np.asarray(values, dtype=np.float64), clip, 1.0 - clip)
        bags.append((np.log(p) - np.log1p(-p)).reshape(-1, 1))
    return bags
