"""Self-supervised learning of cell features (SimCLR: Chen et al. 2020), for the `pretrain` stage.

`train.objective` (`pretrain.train.objective`) says what a network learns from:

- ``supervised``: cross-entropy on the labels (the default everywhere);
- ``contrastive``: no labels: two augmented views of each cell (stain jitter, flips and rotations per view from
  `CellImages`, then a random crop of each view, `random_resized_crop`) are pulled together and every other cell
  of the batch pushed away (`nt_xent` on a small projection of the features the classifier reads);
- ``both``: the sum of the two.

The projection head lives beside the network, not in it: the weights file holds the network alone, and whoever
starts from it (``model.<name>.cell_weights``) resets the classifier as for supervised weights. Under DDP the
processes' projections are gathered (`global_pairs`): each view's partner is picked among the whole global batch,
as in one process with that batch, not among a process's share of it.

`knn_accuracy` scores features with no head at all (the usual yardstick of self-supervised features), so the
objectives can be compared on one figure. The features are the network's embeddings (`smearnet.models.embeddings`).
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

OBJECTIVES = ("supervised", "contrastive", "both")


def nt_xent(first: torch.Tensor, second: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent loss of two batches of embeddings, row i of `first` and of `second` being two views of one
    cell: cross-entropy of picking each view's partner among the 2N - 1 other views, by cosine similarity over
    `temperature`. Equals log(2N - 1) when every embedding is the same."""
    if first.shape != second.shape or first.dim() != 2 or len(first) < 2:
        raise ValueError(f"nt_xent needs two (N, D) batches with N >= 2; got {tuple(first.shape)} and "
                         f"{tuple(second.shape)}")
    n = len(first)
    z = torch.nn.functional.normalize(torch.cat([first, second]).float(), dim=1)
    similarity = z @ z.T / temperature
    similarity.fill_diagonal_(float("-inf"))  # a view is not its own partner
    partners = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(first.device)
    return torch.nn.functional.cross_entropy(similarity, partners)


def global_pairs(first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every process's (N, D) pairs of views, concatenated in rank order, with gradients flowing back to the process
    that owns each row; the pairs as they are outside a multi-process group.

    Every process then computes the same loss over the global batch. Its gradient reaches each process's own rows
    summed over the W processes' copies of the loss, and DDP averages over the W processes: the gradient of the
    single-process loss on the global batch (tests/test_contrastive.py checks it on two gloo processes).
    Every process must pass the same N (DistributedSampler pads the shards to one length)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return first, second
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(first)), torch.cat(all_gather(second))


def random_resized_crop(images: torch.Tensor, min_scale: float, generator: torch.Generator | None = None
                        ) -> torch.Tensor:
    """Each image of a (N, C, H, W) batch cropped to a random square-aspect window of side `min_scale`..1 of the
    image (anywhere inside it) and resized back to H x W (bilinear). `min_scale=1` returns the batch as it was."""
    n = len(images)
    scale = min_scale + (1.0 - min_scale) * torch.rand(n, generator=generator)
    shift = (1.0 - scale) * (2.0 * torch.rand(2, n, generator=generator) - 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = scale, scale
    theta[:, 0, 2], theta[:, 1, 2] = shift[0], shift[1]
    grid = torch.nn.functional.affine_grid(theta.to(images), list(images.shape), align_corners=False)
    return torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


class TwoViews(Dataset):
    """A dataset of (image, target) items as ((2, C, H, W) two independently augmented views, target)."""

    def __init__(self, images: Dataset):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        first, target = self.images[i]
        second, _ = self.images[i]
        return torch.stack([first, second]), target


def projection_head(features: int, hidden: int = 256, out: int = 128) -> torch.nn.Module:
    """SimCLR's two-layer projection from the classifier's input features to the space the loss compares in."""
    return torch.nn.Sequential(torch.nn.Linear(features, hidden), torch.nn.ReLU(inplace=True),
                               torch.nn.Linear(hidden, out))


def knn_accuracy(train_features: torch.Tensor, train_targets: torch.Tensor, query_features: torch.Tensor,
                 query_targets: torch.Tensor, k: int = 20) -> float:
    """Accuracy of a k-nearest-neighbour vote (cosine similarity, each neighbour weighted by it) of the query
    cells among the training cells' features."""
    train = torch.nn.functional.normalize(train_features.float(), dim=1)
    query = torch.nn.functional.normalize(query_features.float(), dim=1)
    k = min(k, len(train))
    similarity, index = (query @ train.T).topk(k, dim=1)
    votes = torch.zeros(len(query), int(train_targets.max()) + 1)
    votes.scatter_add_(1, train_targets[index], similarity.clamp(min=0))
    return float((votes.argmax(1) == query_targets).float().mean())
