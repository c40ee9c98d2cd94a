"""One exception type for every failure a user can fix, printed as a single paragraph."""

from __future__ import annotations


class SmearnetError(Exception):
    """A failure with a clear cause and fix; the CLI prints it without a traceback and exits 2."""

    def __init__(self, what: str, fix: str | None = None):
        self.what = what
        self.fix = fix
        super().__init__(what if fix is None else f"{what} Fix: {fix}")


def run_cli(main) -> None:
    """Run a stage or command; a SmearnetError becomes one paragraph on stderr and exit code 2."""
    import sys

    try:
        main()
    except SmearnetError as err:
        print(f"smearnet: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("smearnet: interrupted; outputs are written atomically, so re-run the stage to continue.",
              file=sys.stderr)
        sys.exit(130)
