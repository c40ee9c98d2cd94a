"""The `smearnet` command: compose params, predict smears, add a hospital site, retrain (CI)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from omegaconf import OmegaConf

from smearnet.config import check_numbers, compose_config
from smearnet.data.sites import ingest_site
from smearnet.errors import run_cli
from smearnet.io import write_json, write_text
from smearnet.retrain import retrain


def compose_params(overrides: list[str], output: Path) -> Path:
    """Compose conf/ (with Hydra overrides) into params.yaml exactly as `dvc exp run` does."""
    cfg = compose_config(overrides)
    check_numbers(cfg)
    return write_text(OmegaConf.to_yaml(cfg), output)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smearnet", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    compose = commands.add_parser("compose-params", help="compose conf/ into params.yaml")
    compose.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=lightcnn experiment=demo")
    compose.add_argument("--output", type=Path, default=Path("params.yaml"))

    predict = commands.add_parser("predict", help="classify a smear's cells (folder) or many smears (manifest CSV)")
    predict.add_argument("source", type=Path, help="a folder of one smear's cell images, or a CSV with path,smear_id")
    predict.add_argument("--model", required=True,
                         help="models:/<name>@champion, models:/<name>/<version>, or a local models/<name> folder")
    predict.add_argument("--json", type=Path, help="write cells per class, smears and one row per cell here")
    predict.add_argument("--report", type=Path, help="write a report here: a self-contained HTML page (why each "
                         "smear was called: score vs threshold, the cells that weighed most, Grad-CAM heat maps), "
                         "or Markdown when the name ends in .md")
    predict.add_argument("--report-cells", type=int, default=6, help="cells shown per smear in the HTML report")
    predict.add_argument("--threshold", type=float, help="smear threshold to use instead of the one in the model's "
                         "smear rule")
    predict.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ (default: MLFLOW_TRACKING_URI, "
                         "else params.yaml's)")
    predict.add_argument("--batch-size", type=int, default=32)
    predict.add_argument("--least-sure", type=int, default=10, help="how many least certain images to list")

    site = commands.add_parser("ingest-site", help="add a new hospital's images as data/sites/<site>")
    site.add_argument("folder", type=Path, help="the site's folder: manifest.csv + images, or class-per-folder")
    site.add_argument("--site", required=True, help="site name, e.g. hospital_b")
    site.add_argument("--id-prefix", help="prefix for the site's patient and smear ids (default: '<site>-')")
    site.add_argument("--project", type=Path, default=Path("."), help="project root (default: .)")
    site.add_argument("--no-dvc-add", action="store_true", help="do not `dvc add` the site folder")

    retrain = commands.add_parser("retrain", help="dvc pull, [ingest-site], dvc repro (gate), dvc push, diffs")
    retrain.add_argument("--base", default="main", help="revision to diff metrics/params/plots against")
    retrain.add_argument("--site-folder", type=Path, help="a new site's folder to ingest first")
    retrain.add_argument("--site", help="the new site's name (with --site-folder)")
    retrain.add_argument("--summary", type=Path, help="append the Markdown summary here (default: "
                         "$GITHUB_STEP_SUMMARY, else print)")
    return parser


def _predict(args: argparse.Namespace) -> None:
    # torch and timm take seconds to import: `compose-params`, `ingest-site` and `--help` do not wait for them.
    from smearnet.serving.predict import (collect_cells, load_model, predict_cells, print_summary, to_html, to_json,
                                          to_markdown)

    started = time.perf_counter()
    cells, skipped = collect_cells(args.source)
    loaded = load_model(args.model, threshold=args.threshold, tracking_uri=args.tracking_uri)
    prediction = predict_cells(loaded, cells, batch_size=args.batch_size, skipped_files=skipped)
    print_summary(prediction)
    if args.json:
        print(f"wrote {write_json(to_json(prediction), args.json)}")
    if args.report:
        report = to_markdown(prediction, args.least_sure) if args.report.suffix.lower() == ".md" else \
            to_html(prediction, cells_per_smear=args.report_cells)
        print(f"wrote {write_text(report, args.report)}")
    print(f"predict: {len(cells)} images in {time.perf_counter() - started:.1f} s")


def main(argv: list[str] | None = None) -> None:
    def _run() -> None:
        args = build_parser().parse_args(argv)
        if args.command == "compose-params":
            print(f"wrote {compose_params(args.overrides, args.output)}")
        elif args.command == "predict":
            _predict(args)
        elif args.command == "ingest-site":
            result = ingest_site(args.folder, args.site, project=args.project, id_prefix=args.id_prefix,
                                 dvc_add=not args.no_dvc_add)
            print(f"ingest-site: {result.site}: {result.images} images of {result.patients} patients -> "
                  f"{result.manifest} (sha256 {result.sha256}); data.extra_manifests updated in conf/ and "
                  f"params.yaml{'; dvc add done' if result.dvc_tracked else ''}. Next: `dvc repro` "
                  f"(or `make retrain`), then commit conf/, params.yaml, dvc.lock and the .dvc file.")
        elif args.command == "retrain":
            retrain(Path("."), base=args.base, site_folder=args.site_folder, site=args.site, summary=args.summary)

    run_cli(_run)


if __name__ == "__main__":
    main()
