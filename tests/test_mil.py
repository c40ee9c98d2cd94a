"""The gated-attention MIL aggregator learns a planted bag rule; cell embeddings come from the backbone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import colour_cells
from sklearn.metrics import roc_auc_score

from smearnet.errors import SmearnetError
from smearnet.models.embeddings import cell_embeddings
from smearnet.models.inference import TrainedModel, predict_probabilities
from smearnet.smear.mil import (
    MILConfig,
    cell_outputs,
    load_mil,
    logit_features,
    save_mil,
    train_mil,
)
from smearnet.models.factory import build_model, model_input_spec

FAST = MILConfig(hidden=32, attention=16, dropout=0.0, epochs=20, batch_size=16, lr=3e-3)


def planted_bags(n_bags: int, seed: int, dim: int = 8) -> tuple[list[np.ndarray], np.ndarray, list[int]]:
    """Bag positive iff one of its 10-30 instances has dimension 0 > 2 (1-3 such instances).

    Returns the bags, their labels and, for positive bags, the position of the strongest planted instance.
    """
    rng = np.random.default_rng(seed)
    bags, labels, planted = [], [], []
    for index in range(n_bags):
        size = int(rng.integers(10, 31))
        bag = rng.normal(size=(size, dim))
        bag[:, 0] = np.minimum(bag[:, 0], 1.5)  # negatives never cross 2
        positive = index % 2 == 0
        if positive:
            rows = rng.choice(size, int(rng.integers(1, 4)), replace=False)
            bag[rows, 0] = rng.uniform(2.5, 4.0, len(rows))
        planted.append(int(np.argmax(bag[:, 0])) if positive else -1)
        bags.append(bag)
        labels.append(positive)
    return bags, np.array(labels), planted


def test_mil_learns_a_planted_rule_on_held_out_bags():
    train_bags, train_labels, _ = planted_bags(160, seed=0)
    test_bags, test_labels, planted = planted_bags(200, seed=1)
    aggregator = train_mil(train_bags, train_labels, FAST, seed=0)
    scores = aggregator.score(test_bags)
    assert roc_auc_score(test_labels, scores) > 0.9
    attention = aggregator.attention(test_bags)
    hits = [int(np.argmax(weights)) == position
            for weights, position, label in zip(attention, planted, test_labels, strict=True) if label]
    assert np.mean(hits) > 0.7  # it attends to the cell that makes the bag positive
    assert all(weights.sum() == pytest.approx(1.0) for weights in attention)


def test_scores_are_permutation_invariant_and_empty_bags_are_nan():
    bags, labels, _ = planted_bags(40, seed=2)
    aggregator = train_mil(bags, labels, MILConfig(epochs=2), seed=0)
    rng = np.random.default_rng(0)
    shuffled = [bag[rng.permutation(len(bag))] for bag in bags]
    np.testing.assert_allclose(aggregator.score(bags), aggregator.score(shuffled), rtol=1e-5, atol=1e-6)
    # padding must not leak: a bag scored alone equals the same bag scored next to a long one
    alone = aggregator.score([bags[1]])[0]
    assert aggregator.score([bags[1], np.vstack(bags[:5])])[0] == pytest.approx(alone, abs=1e-6)
    scores = aggregator.score([bags[0], np.zeros((0, 8))])
    assert np.isfinite(scores[0]) and np.isnan(scores[1])
    assert aggregator.attention([np.zeros((0, 8))])[0].size == 0


def test_training_is_seeded_and_leaves_the_global_rng_alone():
    bags, labels, _ = planted_bags(30, seed=3)
    state = torch.get_rng_state()
    threads = torch.get_num_threads()
    first = train_mil(bags, labels, MILConfig(epochs=3), seed=7).score(bags)
    assert torch.equal(torch.get_rng_state(), state) and torch.get_num_threads() == threads
    np.testing.assert_array_equal(first, train_mil(bags, labels, MILConfig(epochs=3), seed=7).score(bags))
    assert not np.array_equal(first, train_mil(bags, labels, MILConfig(epochs=3), seed=8).score(bags))


def test_save_and_load_round_trip(tmp_path):
    bags, labels, _ = planted_bags(30, seed=4)
    aggregator = train_mil(bags, labels, MILConfig(epochs=2), seed=0)
    restored = load_mil(save_mil(aggregator, tmp_path / "mil"))
    np.testing.assert_array_equal(restored.score(bags), aggregator.score(bags))
    assert restored.config == aggregator.config
    with pytest.raises(SmearnetError, match="holds no MIL aggregator"):
        load_mil(tmp_path / "nothing")


def test_training_and_scoring_errors():
    bags, labels, _ = planted_bags(10, seed=5)
    with pytest.raises(SmearnetError, match="positive and negative bags"):
        train_mil(bags, np.ones(10, dtype=bool))
    with pytest.raises(SmearnetError, match="one label per bag"):
        train_mil(bags, labels[:5])
    with pytest.raises(SmearnetError, match="one width"):
        train_mil([bags[0], bags[1][:, :4]], [True, False])
    aggregator = train_mil(bags, labels, MILConfig(epochs=1), seed=0)
    with pytest.raises(SmearnetError, match=r"8-d embeddings"):
        aggregator.score([np.zeros((3, 5))])
    with pytest.raises(SmearnetError, match=r"aggregate\.mil\.epochs"):
        MILConfig(epochs=0)
    with pytest.raises(SmearnetError, match=r"Unknown aggregate\.mil"):
        MILConfig.from_mapping({"hidden": 8, "layers": 2})


def test_logit_features_are_one_feature_bags():
    bags = logit_features([np.array([0.5, 0.9]), np.array([])])
    assert bags[0].shape == (2, 1) and bags[0][0, 0] == pytest.approx(0.0)
    assert bags[0][1, 0] == pytest.approx(np.log(9.0)) and bags[1].shape == (0, 1)


@pytest.mark.parametrize("model_cfg, width", [
    ({"name": "resnet18", "arch": "resnet18", "input_size": [32, 32]}, 512),   # timm: forward_head(pre_logits)
    ({"name": "lightcnn", "arch": "lightcnn", "input_size": [16, 20], "fc_units": 24}, 24),  # classifier hook
])
def test_cell_embeddings_feed_the_classifier(tmp_path, model_cfg, width):
    classes = ["normal", "classic_rl", "covid_rl"]
    manifest = colour_cells(tmp_path, classes * 2, ["p1"] * 6, size=24)
    torch.manual_seed(0)
    net = build_model(model_cfg, num_classes=3).eval()
    model = TrainedModel(net=net, name=model_cfg["name"], classes=classes, input_spec=model_input_spec(model_cfg),
                         meta={})
    outputs = cell_outputs(model, manifest, batch_size=4)
    assert outputs.embeddings.shape == (6, width) and outputs.logits.shape == (6, 3)
    np.testing.assert_allclose(cell_embeddings(model, manifest, batch_size=5), outputs.embeddings, atol=1e-5)
    with torch.inference_mode():
        from_embeddings = net.get_classifier()(torch.from_numpy(outputs.embeddings)).numpy()
    np.testing.assert_allclose(from_embeddings, outputs.logits, atol=1e-4)
    probabilities = predict_probabilities(model, manifest, batch_size=4, progress=False)
    np.testing.assert_allclose(torch.softmax(torch.from_numpy(outputs.logits), 1).numpy(), probabilities, atol=1e-5)
    assert not net.get_classifier()._forward_pre_hooks  # the hook is removed afterwards
