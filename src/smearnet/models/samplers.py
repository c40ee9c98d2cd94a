"""Which training cells an epoch draws, and in what order: `train.sampler` (shuffle | balanced); and how much each
class weighs in the loss: `train.class_weights` (none | balanced).

Both samplers draw from ``seed + epoch`` alone (Lightning calls ``set_epoch`` every epoch, also after resuming), so a
resumed run sees the epochs an uninterrupted run would, and every DDP rank draws the same global sequence. They do
no sharding themselves: under DDP Lightning deals the global sequence round-robin to the ranks (rank r takes items
r, r + N, r + 2N, ... of it), so N processes with batch B/N train each step on the images one process with batch B
would. How it deals depends on the sampler's type, which is why only EpochShuffleSampler is a RandomSampler:

- a RandomSampler is replaced by ``DistributedSampler(dataset, shuffle=True, seed=PL_GLOBAL_SEED)``, which draws
  the same ``seed + epoch`` permutation itself;
- any other sampler is wrapped in ``DistributedSamplerWrapper``, which forwards ``set_epoch`` to it and deals its
  draw. A balanced sampler that were a RandomSampler would be replaced by a plain permutation and lose its balance.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence, Sized

import torch
from torch.utils.data import RandomSampler, Sampler

from smearnet.errors import SmearnetError

SAMPLERS = ("shuffle", "balanced")
CLASS_WEIGHTS = ("none", "balanced")


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The one random source of an epoch's draw: the same on every rank, before and after a resume."""
    return torch.Generator().manual_seed(int(seed) + int(epoch))


class EpochShuffleSampler(RandomSampler):
    """A new permutation each epoch from ``seed + epoch``, the order torch's DistributedSampler draws.

    Lightning calls ``set_epoch`` every epoch (also after resuming) and, being a RandomSampler, under DDP this
    is replaced by ``DistributedSampler(shuffle=True, seed=PL_GLOBAL_SEED)``, which deals the same permutation
    round-robin to the ranks: with equal global batches, every step trains on the same images either way.
    """

    def __init__(self, data_source: Sized, seed: int):
        super().__init__(data_source)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        yield from torch.randperm(len(self.data_source), generator=epoch_generator(self.seed, self.epoch)).tolist()


class ClassBalancedSampler(Sampler[int]):
    """``len(targets)`` draws with replacement each epoch, every class present equally likely (each item weighs
    1 / the count of its class), from ``seed + epoch``: rare classes are seen as often as common ones without
    writing upsampled copies. Classes absent from `targets` are never drawn.

    Not a RandomSampler, so that under DDP Lightning wraps it (``DistributedSamplerWrapper``) and deals this draw
    to the ranks instead of replacing it by a plain permutation (see the module's docstring).
    """

    def __init__(self, targets: Sequence[int], seed: int):
        counts = Counter(int(target) for target in targets)
        self.weights = torch.tensor([1.0 / counts[int(target)] for target in targets], dtype=torch.double)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.weights)

    def __iter__(self) -> Iterator[int]:
        if not len(self.weights):
            return iter(())
        draw = torch.multinomial(self.weights, len(self.weights), replacement=True,
                                 generator=epoch_generator(self.seed, self.epoch))
        return iter(draw.tolist())


def training_sampler(kind: str, targets: Sequence[int], seed: int) -> Sampler[int]:
    """The `train.sampler` named `kind` over a training set whose items have the class indices `targets`."""
    if kind == "shuffle":
        return EpochShuffleSampler(targets, seed)
    if kind == "balanced":
        return ClassBalancedSampler(targets, seed)
    raise SmearnetError(f"Unknown train.sampler `{kind}`.", f"use one of {', '.join(SAMPLERS)}.")


def loss_class_weights(kind: str, targets: Sequence[int], num_classes: int) -> list[float] | None:
    """The cross-entropy weight of each class under `train.class_weights` = `kind`: None (every cell weighs the same)
    or "balanced", ``len(targets) / (present classes * count of the class)`` as scikit-learn's ``"balanced"``, so
    every present class carries the same total weight. A class absent from `targets` weighs 0 (it has no cells)."""
    if kind == "none":
        return None
    if kind != "balanced":
        raise SmearnetError(f"Unknown train.class_weights `{kind}`.", f"use one of {', '.join(CLASS_WEIGHTS)}.")
    counts = Counter(int(t) for t in targets)
    if not counts:
        raise SmearnetError("train.class_weights=balanced needs training cells; there are none.",
                            "check the split: the train split is empty.")
    return [len(targets) / (len(counts) * counts[c]) if counts[c] else 0.0 for c in range(num_classes)]
