"""Small, atomic file writers shared by the stages (a killed stage never leaves a half-written output).

Temporary folders are hidden siblings of their output named ``.<name>.<purpose>-<pid>-<8 hex>`` (the
scheme `smearnet.data.synthetic.generate_cohort` uses too), so the next run can recognise and delete the
ones a killed process (``kill -9``, OOM killer, power loss) left behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import sys
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from smearnet.errors import SmearnetError

#: Manifest columns holding file paths: written relative to the CSV's folder, read back absolute.
PATH_COLUMNS = ("path", "augmented_from")
_SIBLING_PURPOSES = ("partial", "old")


def json_safe(value: Any) -> Any:
    """The one JSON cleaner: numpy scalars/arrays and paths made plain, nan/inf replaced by None (strict JSON)."""
    if isinstance(value, Mapping):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def file_sha256(path: Path) -> str:
    """The sha256 (hex) of a file, read in blocks: packaged engine files (serving.json), starting weights."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(data: Mapping, path: Path) -> Path:
    """Write `data` as pretty, strict JSON (through `json_safe`) via a temporary file and an atomic rename."""
    return write_text(json.dumps(json_safe(data), indent=2, sort_keys=True, allow_nan=False) + "\n", path)


def read_json(path: Path, default: Any = None) -> Any:
    """The JSON document at `path`, or `default` when the file does not exist."""
    path = Path(path)
    if not path.is_file():
        return default
    return json.loads(path.read_text(encoding="utf-8"))


def write_text(text: str, path: Path) -> Path:
    """Write `text` through `atomic_file` (a flushed temporary file and an atomic rename; the umask's mode)."""
    path = Path(path)
    with atomic_file(path) as partial:
        partial.write_text(text, encoding="utf-8")
    return path


def write_manifest(manifest: pd.DataFrame, csv_path: Path) -> Path:
    """Write a manifest whose path columns (`PATH_COLUMNS`) are relative to the CSV's folder.

    Relative paths keep the file valid in any clone and byte-identical between checkouts at
    different locations; empty values (e.g. `augmented_from` of an original image) stay empty.
    """
    csv_path = Path(csv_path)
    out = manifest.copy()
    folder = csv_path.parent.resolve()
    for column in PATH_COLUMNS:
        if column in out.columns:
            out[column] = [os.path.relpath(Path(p).resolve(), folder) if p else p for p in out[column]]
    return write_text(out.to_csv(index=False), csv_path)


def read_table(csv_path: Path) -> pd.DataFrame:
    """Read a manifest written by `write_manifest`, resolving its path columns against the CSV's folder."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise SmearnetError(
            f"{csv_path} does not exist (working directory {Path.cwd()}).",
            "run the stage that writes it first (`dvc repro` runs the stages in order), from the project root.",
        )
    table = pd.read_csv(csv_path, dtype={column: str for column in ("patient_id", "smear_id", "label",
                                                                    *PATH_COLUMNS)}, keep_default_na=False)
    if "path" not in table.columns:
        raise SmearnetError(f"{csv_path} has no `path` column; its columns are {list(table.columns)}.",
                            "re-run the stage that writes it (the file is not a smearnet manifest).")
    folder = csv_path.parent.resolve()
    for column in PATH_COLUMNS:
        if column in table.columns:
            table[column] = [str((folder / p).resolve()) if p and not os.path.isabs(p) else p
                             for p in table[column]]
    return table


@contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """The one atomic file write: yield a unique temporary sibling of `final` (``.<stem>.<pid>-<hex>.partial<suffix>``,
    same folder, same suffix for writers that look at it) for a writer (text, an exporter, a quantiser) to
    create.  When the block succeeds the file is given the umask's mode, flushed to disk and renamed over
    `final`; when it fails the temporary file is deleted.  `final` is never half-written, and two writers never
    share a temporary file.  `stale_partials(final)` lists what killed writers left behind."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_name(f".{final.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial{final.suffix}")
    try:
        yield partial
        os.chmod(partial, 0o666 & ~_UMASK)  # mkstemp-style 0o600 would hide metrics from the rest of the team
        with partial.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)
    with suppress(OSError):  # the rename itself on disk (a folder fsync; not every filesystem allows it)
        folder = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def stale_partials(final: Path) -> list[Path]:
    """Temporary files `atomic_file` writers of `final` left behind when killed (delete them under a lock)."""
    final = Path(final)
    return sorted(final.parent.glob(f".{final.stem}.*.partial{final.suffix}"))


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary sibling directory that replaces `final` only when the block succeeds.

    `final` is at every instant either absent, its complete previous version, or the complete new
    one: the old folder is first renamed aside, the new one renamed into place, then the old deleted.
    Temporary siblings left by killed runs are deleted first (see `remove_stale_siblings`).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(final)
    tmp = _fresh_sibling(final, "partial")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists() or final.is_symlink():
        retired = _fresh_sibling(final, "old")
        os.replace(final, retired / final.name)
        os.replace(tmp, final)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(tmp, final)


def remove_stale_siblings(final: Path) -> list[Path]:
    """Delete `.<name>.partial-<pid>-*` / `.<name>.old-<pid>-*` siblings of `final` whose process is gone.

    Folders of a process that is still running (another run of the same stage) are left alone.
    Returns the folders removed and says so on stderr.
    """
    final = Path(final)
    if not final.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.(?:{'|'.join(_SIBLING_PURPOSES)})-(\d+)-[0-9a-f]{{8}}$")
    removed = []
    for sibling in sorted(final.parent.iterdir()):
        match = pattern.match(sibling.name)
        if match and sibling.is_dir() and not sibling.is_symlink() and not _process_alive(int(match.group(1))):
            shutil.rmtree(sibling, ignore_errors=True)
            removed.append(sibling)
    if removed:
        print(f"smearnet: removed {len(removed)} temporary folder(s) left by an interrupted run: "
              f"{', '.join(str(p) for p in removed)}", file=sys.stderr)
    return removed


def _fresh_sibling(final: Path, purpose: str) -> Path:
    """A new hidden folder next to `final` (same filesystem, so `os.replace` is atomic), honouring the umask."""
    sibling = final.parent / f".{final.name}.{purpose}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    sibling.mkdir()
    return sibling


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask is not thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()

