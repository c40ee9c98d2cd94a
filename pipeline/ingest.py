"""DVC stage `ingest`: validate every manifest row; write the accepted manifest and the validation report."""

from pathlib import Path

from smearnet.config import load_params
from smearnet.errors import run_cli
from smearnet.ingest import validate_manifest, write_ingest_outputs
from smearnet.io import write_json
from smearnet.datasets import load_dataset_manifest


def main() -> None:
    cfg = load_params()
    manifest = load_dataset_manifest(cfg.data)
    result = validate_manifest(manifest, list(cfg.data.classes), min_size=int(cfg.ingest.min_size),
                               max_pixels=int(cfg.ingest.max_pixels), on_bad_row=str(cfg.ingest.on_bad_row),
                               duplicates=str(cfg.ingest.duplicates), workers=int(cfg.ingest.workers))
    write_ingest_outputs(result, Path("data/ingested"))
    write_json({"accepted": len(result.accepted), "quarantined": len(result.quarantined)}, Path("metrics/ingest.json"))
    print(f"ingest: {len(result.accepted)} accepted, {len(result.quarantined)} quarantined "
          f"(report: data/ingested/validation.md)")


if __name__ == "__main__":
    run_cli(main)
