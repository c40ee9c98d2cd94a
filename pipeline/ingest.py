"""DVC stage `ingest`: validate every manifest row; write the accepted manifest and the validation report."""

import os
from pathlib import Path

from smearnet.config import stage_params
from smearnet.data.sources import load_dataset_manifest
from smearnet.errors import SmearnetError, run_cli
from smearnet.data.ingest import validate_manifest
from smearnet.data.ingest_report import IngestResult, write_ingest_outputs
from smearnet.io import atomic_directory, write_json

OUT = Path("data/ingested")


def main() -> None:
    params = stage_params("ingest")
    manifest = load_dataset_manifest(params.data)
    # The four outputs replace data/ingested together: a killed run leaves the previous version whole.
    with atomic_directory(OUT) as staging:
        ingest = params.ingest
        result = validate_manifest(manifest, list(params.data.classes), min_size=int(ingest.min_size),
                                   max_pixels=int(ingest.max_pixels), on_bad_row=str(ingest.on_bad_row),
                                   duplicates=str(ingest.duplicates), confine=bool(params.data.confine),
                                   workers=int(ingest.workers))
        refuse_inputs_inside(result, OUT)
        if result.report.get("manifest"):  # the report must not depend on where the project is checked out
            result.report["manifest"] = project_relative(result.report["manifest"])
        write_ingest_outputs(result, staging)
    write_json({"accepted": len(result.accepted), "quarantined": len(result.quarantined)}, Path("metrics/ingest.json"))
    print(f"ingest: {len(result.accepted)} accepted, {len(result.quarantined)} quarantined "
          f"(report: {OUT / 'validation.md'})")


def project_relative(path: str) -> str:
    """`path` relative to the project root (the working directory) when inside it, else absolute."""
    root, resolved = Path.cwd().resolve(), Path(path).resolve()
    return resolved.relative_to(root).as_posix() if resolved.is_relative_to(root) else str(resolved)


def refuse_inputs_inside(result: IngestResult, out_dir: Path) -> None:
    """Raise if the input manifest or any listed image lies inside `out_dir`, which the stage replaces whole."""
    folder = os.path.realpath(out_dir) + os.sep
    inputs = [result.report.get("manifest") or ""]
    for frame in (result.accepted, result.quarantined):
        if "path" in frame.columns:
            inputs.extend(str(path) for path in frame["path"] if path)
    inside = [path for path in inputs if path and os.path.realpath(path).startswith(folder)]
    if inside:
        raise SmearnetError(
            f"{len(inside)} input file(s) lie inside the ingest output folder {out_dir}, which the stage replaces "
            f"as a whole (first: {inside[0]}).",
            "keep the dataset outside data/ingested (e.g. data/raw/) and point `data.manifest` / `data.root` there.",
        )


if __name__ == "__main__":
    run_cli(main)
