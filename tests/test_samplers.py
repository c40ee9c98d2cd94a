"""Which training cells an epoch draws (smearnet.models.samplers): shuffled once each, or classes balanced; and
the loss weight of each class (train.class_weights)."""

from collections import Counter

import pytest
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from torch.utils.data import RandomSampler

from smearnet.errors import SmearnetError
from smearnet.models.samplers import ClassBalancedSampler, EpochShuffleSampler, loss_class_weights, training_sampler

RARE = [0] * 90 + [1] * 9 + [2] * 1  # 90/9/1 cells of three classes


def class_shares(sampler, targets, epochs: int = 20) -> dict[int, float]:
    drawn = Counter()
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        drawn.update(targets[i] for i in sampler)
    total = sum(drawn.values())
    return {label: drawn[label] / total for label in sorted(set(targets))}


def test_balanced_sampling_draws_every_class_about_equally_often():
    shares = class_shares(training_sampler("balanced", RARE, seed=42), RARE)
    assert all(share == pytest.approx(1 / 3, abs=0.04) for share in shares.values()), shares
    # The check means something: shuffling draws the classes as they come, 90/9/1.
    shuffled = class_shares(training_sampler("shuffle", RARE, seed=42), RARE)
    assert not all(share == pytest.approx(1 / 3, abs=0.04) for share in shuffled.values())
    assert shuffled == pytest.approx({0: 0.9, 1: 0.09, 2: 0.01})


def test_an_epoch_draws_as_many_cells_as_the_training_set_holds():
    sampler = ClassBalancedSampler(RARE, seed=1)
    assert len(sampler) == len(list(sampler)) == len(RARE)
    assert len(ClassBalancedSampler([], seed=1)) == 0 and list(ClassBalancedSampler([], seed=1)) == []


def test_a_class_absent_from_the_training_data_is_never_drawn():
    targets = [0] * 30 + [2] * 10  # class 1 has no cells
    shares = class_shares(ClassBalancedSampler(targets, seed=3), targets)
    assert set(shares) == {0, 2} and shares[2] == pytest.approx(0.5, abs=0.05)


def test_the_same_seed_and_epoch_draw_the_same_cells():
    def draw(seed, epoch):
        sampler = ClassBalancedSampler(RARE, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert draw(42, 3) == draw(42, 3)  # a resumed run, or another DDP rank, draws what an uninterrupted one does
    assert draw(42, 3) != draw(42, 4) and draw(42, 3) != draw(43, 3)
    assert draw(41, 4) == draw(42, 3)  # seeded by seed + epoch, as DistributedSampler seeds its permutation
    sampler = ClassBalancedSampler(RARE, seed=42)
    sampler.set_epoch(3)
    assert list(sampler) == list(sampler)  # repeatable within the epoch


@pytest.mark.parametrize("kind", ["balanced", "shuffle"])
def test_two_ddp_ranks_take_interleaved_shards_of_one_global_draw(kind):
    """What Lightning does under DDP with a sampler that is not a RandomSampler: wrap it, forward set_epoch, deal."""
    targets = RARE
    single = training_sampler(kind, targets, seed=42)
    if kind == "balanced":
        # A RandomSampler would be swapped for a plain DistributedSampler (a permutation: no balance left).
        assert not isinstance(single, RandomSampler)
    ranks = [DistributedSamplerWrapper(training_sampler(kind, targets, seed=42), num_replicas=2, rank=rank,
                                       shuffle=False) for rank in range(2)]
    for epoch in range(3):
        for sampler in (single, *ranks):
            sampler.set_epoch(epoch)
        draw = list(single)
        shards = [list(rank) for rank in ranks]
        assert shards[0] == draw[0::2] and shards[1] == draw[1::2]  # one global draw, partitioned
        assert sorted(shards[0] + shards[1]) == sorted(draw)


def test_the_shuffle_sampler_still_draws_a_new_permutation_each_epoch():
    sampler = EpochShuffleSampler(range(50), seed=7)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    assert all(sorted(order) == list(range(50)) for order in orders) and orders[0] != orders[1] != orders[2]


def test_an_unknown_sampler_is_a_clear_error():
    with pytest.raises(SmearnetError, match="train.sampler `weighted`"):
        training_sampler("weighted", RARE, seed=0)


def test_balanced_class_weights_give_every_present_class_the_same_total_weight():
    weights = loss_class_weights("balanced", RARE, num_classes=4)  # class 3 has no cells
    totals = [weights[c] * RARE.count(c) for c in range(3)]
    assert totals == pytest.approx([len(RARE) / 3] * 3)
    assert weights[2] == pytest.approx(90 * weights[0]) and weights[3] == 0.0
    assert loss_class_weights("none", RARE, num_classes=3) is None
    with pytest.raises(SmearnetError, match="train.class_weights"):
        loss_class_weights("focal", RARE, num_classes=3)
