"""The committed results belong to the committed code: dvc.lock and metrics/ are not stale.

`dvc status` compares every stage's dependencies with the hashes dvc.lock recorded when the stage last ran. A
changed code dependency (``src/``, ``pipeline/``), a changed parameter (a ``params.yaml`` entry) or a changed
stage command means the committed lock and metrics were produced by other code than the commit holds. Every
``metrics/**/*.json`` that dvc.lock lists as an output must have the md5 the lock records (DVC's hash of a single
file: the md5 of its bytes). Data, models and reports are not committed (a fresh clone has none of them), so
"deleted" data dependencies and outputs missing from the cache are not failures here.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import REPO_ROOT

CODE_PREFIXES = ("src/", "pipeline/")
FIX = "run `make repro` and commit dvc.lock and metrics/"


def _is_metrics_file(path: str) -> bool:
    return path.startswith("metrics/") and path.endswith(".json")


def _committed_dep(path: str) -> bool:
    """Code, the params file, or a committed metrics file (a later stage's input, e.g. report's)."""
    return path.startswith(CODE_PREFIXES) or path == "params.yaml" or _is_metrics_file(path)


def stale_dependencies(status: dict) -> dict[str, list[str]]:
    """Stage -> what changed since dvc.lock, from `dvc status --json`, ignoring uncommitted data and outputs."""
    stale: dict[str, list[str]] = {}
    for stage, entries in status.items():
        for entry in entries:
            if entry == "changed command":
                stale.setdefault(stage, []).append("command changed in dvc.yaml")
            if not isinstance(entry, dict):
                continue
            for path, change in entry.get("changed deps", {}).items():
                if isinstance(change, dict):  # a params file: {key: new | modified | deleted}
                    stale.setdefault(stage, []).extend(f"{path}: {key} {how}" for key, how in change.items())
                elif _committed_dep(path):
                    stale.setdefault(stage, []).append(f"{path} {change}")
    return stale


def stale_metrics(lock: dict) -> dict[str, list[str]]:
    """Stage -> its metrics/**/*.json outputs whose bytes are not the ones dvc.lock records."""
    stale: dict[str, list[str]] = {}
    for stage, entry in (lock.get("stages") or {}).items():
        for out in entry.get("outs", []):
            path = out["path"]
            if not _is_metrics_file(path):
                continue
            file = REPO_ROOT / path
            if not file.is_file():
                stale.setdefault(stage, []).append(f"{path} missing")
            elif hashlib.md5(file.read_bytes()).hexdigest() != out.get("md5"):
                stale.setdefault(stage, []).append(f"{path} differs from its md5 in dvc.lock")
    return stale


def test_committed_dvc_lock_and_metrics_match_the_code_and_params():
    if not (REPO_ROOT / ".git").exists():
        pytest.skip(f"{REPO_ROOT} is not a git checkout: no committed results to check")
    pytest.importorskip("dvc", reason="dvc is not importable: install the project (`make install`)",
                        exc_type=ImportError)
    if not (REPO_ROOT / ".dvc").is_dir():
        pytest.skip(f"{REPO_ROOT} is not a DVC repository (no .dvc/)")
    lock_file = REPO_ROOT / "dvc.lock"
    assert lock_file.is_file(), f"dvc.lock is missing: {FIX}"

    result = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120, env=dict(os.environ, DVC_NO_ANALYTICS="1"))
    if result.returncode != 0 and "Unable to acquire lock" in result.stderr:
        pytest.skip("another dvc command (e.g. `make repro`) holds the repository lock")
    assert result.returncode == 0, f"`dvc status --json` failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
    status = json.loads(result.stdout or "{}")

    stale = stale_dependencies(status)
    for stage, changes in stale_metrics(yaml.safe_load(lock_file.read_text())).items():
        stale.setdefault(stage, []).extend(changes)
    assert not stale, (
        "dvc.lock and metrics/ are stale against the code and params: "
        + "; ".join(f"{stage} ({', '.join(changes)})" for stage, changes in sorted(stale.items()))
        + f". To fix: {FIX}."
    )
