"""Small, atomic file writers shared by the stages (a killed stage never leaves a half-written output)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd


def write_json(data: dict, path: Path) -> Path:
    """Write `data` as pretty JSON through a temporary file and an atomic rename."""
    return write_text(json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n", path)


def write_text(text: str, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False, encoding="utf-8") as tmp:
        tmp.write(text)
    os.replace(tmp.name, path)
    return path


def write_manifest(manifest: pd.DataFrame, csv_path: Path) -> Path:
    """Write a manifest whose `path` column is made relative to the CSV's folder (portable clones)."""
    csv_path = Path(csv_path)
    out = manifest.copy()
    folder = csv_path.parent.resolve()
    out["path"] = [os.path.relpath(Path(p).resolve(), folder) for p in out["path"]]
    return write_text(out.to_csv(index=False), csv_path)


def read_table(csv_path: Path) -> pd.DataFrame:
    """Read a manifest written by `write_manifest`, resolving `path` against the CSV's folder."""
    csv_path = Path(csv_path)
    table = pd.read_csv(csv_path, dtype={"patient_id": str, "smear_id": str, "label": str, "path": str},
                        keep_default_na=False)
    folder = csv_path.parent.resolve()
    table["path"] = [str((folder / p).resolve()) if not os.path.isabs(p) else p for p in table["path"]]
    return table


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces `final` only when the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")
