"""DVC stage `pretrain@<backbone>`: cell-domain starting weights for one backbone (or a card saying none)."""

import sys
from pathlib import Path

from smearnet.config import stage_params
from smearnet.errors import SmearnetError, run_cli
from smearnet.models.pretraining import PretrainSettings, pretrain_backbone


def main() -> None:
    if len(sys.argv) != 2:
        raise SmearnetError("Usage: python pipeline/pretrain.py <backbone>.", "name one of `train.models`.")
    name = sys.argv[1]
    settings = PretrainSettings.from_params(stage_params("pretrain", item=name, item_kind="backbone"), name)
    # As in train, every DDP rank runs this; rank 0 alone writes (DVC removed the previous output before the run).
    card = pretrain_backbone(settings, Path("models/pretrained") / name, Path("checkpoints/pretrain") / name)
    if card.get("enabled"):
        head = "" if card["val_accuracy"] is None else f"val accuracy {card['val_accuracy']:.4f}, "
        print(f"pretrain@{name} ({card['objective']}): {head}features' k-NN val accuracy "
              f"{card['knn_val_accuracy']:.4f}, {card['train_seconds']:.0f} s of training "
              f"(model card: models/pretrained/{name}/MODEL_CARD.md)")


if __name__ == "__main__":
    run_cli(main)
