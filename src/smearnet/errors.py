"""One exception type for every failure a user can fix, printed as a single paragraph."""

from __future__ import annotations


class SmearnetError(Exception):
    """A failure with a clear cause and fix; the CLI prints it without a traceback and exits 2."""

    def __init__(self, what: str, fix: str | None = None):
        self.what = what
        self.fix = fix
        super().__init__(what if fix is None else f"{what} Fix: {fix}")


def run_cli(main) -> None:
    """Run a stage or command; a SmearnetError becomes one paragraph on stderr and exit code 2.

    A key missing from the composed configuration (a stale or hand-edited params.yaml) is reported
    the same way, naming the key.
    """
    import sys

    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue

    try:
        main()
    except SmearnetError as err:
        print(f"smearnet: {_one_paragraph(str(err))}", file=sys.stderr)
        sys.exit(2)
    except (ConfigAttributeError, ConfigKeyError, MissingMandatoryValue) as err:
        key = getattr(err, "full_key", None) or str(err).split("\n")[0]
        print(f"smearnet: The configuration (params.yaml) has no value for `{key}`. Fix: recompose params.yaml "
              "from conf/ (`smearnet compose-params` or `dvc exp run`) and set the key there if it is mandatory "
              "(`???`).", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("smearnet: interrupted; outputs are written atomically, so re-run the stage to continue.",
              file=sys.stderr)
        sys.exit(130)


def _one_paragraph(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())
