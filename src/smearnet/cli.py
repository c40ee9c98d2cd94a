"""The `smearnet` command: compose params, predict a smear, add a hospital site."""

from __future__ import annotations

import argparse
from pathlib import Path

from omegaconf import OmegaConf

from smearnet.errors import run_cli


def compose_params(overrides: list[str], output: Path) -> Path:
    """Compose conf/ (with Hydra overrides) into params.yaml exactly as `dvc exp run` does."""
    from smearnet.config import check_numbers, compose_config
    from smearnet.io import write_text

    cfg = compose_config(overrides)
    check_numbers(cfg)
    return write_text(OmegaConf.to_yaml(cfg), output)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smearnet", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    compose = commands.add_parser("compose-params", help="compose conf/ into params.yaml")
    compose.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=lightcnn experiment=demo")
    compose.add_argument("--output", type=Path, default=Path("params.yaml"))
    return parser


def main(argv: list[str] | None = None) -> None:
    def _run() -> None:
        args = build_parser().parse_args(argv)
        if args.command == "compose-params":
            print(f"wrote {compose_params(args.overrides, args.output)}")

    run_cli(_run)


if __name__ == "__main__":
    main()
