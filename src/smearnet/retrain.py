"""`smearnet retrain` (`make retrain`, CI): pull data, optionally add a site, reproduce, gate, push, summarise.

Steps: `dvc pull` (skipped with a note when no DVC remote is configured), `smearnet ingest-site` when a new
site folder is given, `dvc repro` (its `register` stage is the promotion gate), `dvc push`, then
`dvc metrics diff`, `dvc params diff` and `dvc plots diff` against the base revision and the gate decision,
appended to `$GITHUB_STEP_SUMMARY` when set (else printed).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from smearnet.data.sites import ingest_site
from smearnet.errors import SmearnetError

DECISION_MD = Path("reports/register/decision.md")


def dvc(args: list[str], project: Path, *, check: bool = True, capture: bool = False) -> subprocess.CompletedProcess:
    """Run the environment's DVC in `project` with the environment's `python` first on PATH."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    print(f"$ dvc {' '.join(args)}", flush=True)
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env, text=True,
                            capture_output=capture)
    if check and result.returncode != 0:
        detail = f"\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}" if capture else ""
        raise SmearnetError(f"`dvc {' '.join(args)}` failed with exit code {result.returncode}.{detail}",
                            "read the DVC output above; fix and re-run `make retrain`.")
    return result


def has_remote(project: Path) -> bool:
    """Whether a DVC remote is configured (a default or any named one)."""
    return bool(dvc(["remote", "list"], project, capture=True).stdout.strip())


def retrain(project: Path = Path("."), *, base: str = "main", site_folder: Path | None = None,
            site: str | None = None, summary: Path | None = None) -> str:
    """Run the retraining steps in `project`; return the Markdown summary (also appended to `summary`)."""
    project = Path(project)
    remote = has_remote(project)
    if remote:
        dvc(["pull", "--allow-missing"], project)
    else:
        print("retrain: note: no DVC remote configured; skipping `dvc pull` and `dvc push` "
              "(see deploy/README.md to add one).", flush=True)
    if site_folder is not None:
        if not site:
            raise SmearnetError("--site-folder needs --site <name>.", "name the new site, e.g. --site hospital_b.")
        result = ingest_site(site_folder, site, project=project)
        print(f"retrain: added site {site}: {result.images} images, {result.patients} patients", flush=True)
    dvc(["repro"], project)
    if remote:
        dvc(["push"], project)
    text = summary_markdown(project, base)
    target = summary or (Path(os.environ["GITHUB_STEP_SUMMARY"]) if os.environ.get("GITHUB_STEP_SUMMARY") else None)
    if target is not None:
        with open(target, "a", encoding="utf-8") as handle:
            handle.write(text)
        print(f"retrain: summary appended to {target}")
    else:
        print(text)
    return text


def summary_markdown(project: Path, base: str) -> str:
    """Metrics, params and plots diffs against `base` and the gate decision, as Markdown."""
    sections = [f"# Retraining against `{base}`", ""]
    for title, args in (("Metrics", ["metrics", "diff", base, "--md"]), ("Params", ["params", "diff", base, "--md"])):
        result = dvc(args, project, check=False, capture=True)
        body = result.stdout.strip() if result.returncode == 0 else f"(`dvc {' '.join(args)}` failed: " \
            f"{result.stderr.strip().splitlines()[-1] if result.stderr.strip() else 'no output'})"
        sections += [f"## {title} diff", "", body or "(no changes)", ""]
    plots = dvc(["plots", "diff", base, "-o", "dvc_plots/retrain"], project, check=False, capture=True)
    rendered = plots.stdout.strip() if plots.returncode == 0 else f"failed: {plots.stderr.strip()[-300:]}"
    sections += ["## Plots diff", "", f"`dvc plots diff {base}` rendered to `dvc_plots/retrain/index.html` "
                 f"({rendered}); CI uploads it as the `retrain-plots` artifact.", ""]
    decision = project / DECISION_MD
    sections += [decision.read_text().replace("# Registry gate", "## Registry gate", 1) if decision.is_file()
                 else "## Registry gate\n\n(no decision: the register stage did not run)\n", ""]
    return "\n".join(sections)
