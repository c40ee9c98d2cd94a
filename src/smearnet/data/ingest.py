"""Validate every image a manifest names; accept or quarantine each row; write the ingest outputs.

``load_rgb`` is the single decode routine for the whole pipeline: ingest
validates images with exactly the code later stages use to read them, so an
accepted image always decodes the same way downstream.

Each rejected row gets a stable ``check`` key (used for counts in the report)
and a human-readable ``reason`` that starts with a stable prefix:

==================== ==========================================================
check                reason
==================== ==========================================================
empty_path           ``empty path``
file_missing         ``file missing`` (+ a hint if only the letter case differs)
is_directory         ``path is a directory``
not_regular_file     ``not a regular file`` (FIFO, device, socket)
unreadable           ``unreadable (permission denied)`` / ``unreadable (<OS error>)``
symlink_loop         ``symlink loop``
zero_byte            ``zero-byte file``
not_image            ``not an image (PIL cannot identify the file format)``
corrupt              ``truncated or corrupt image (<decoder message>)``
too_large            ``too large (WxH = N px > max_pixels M)``
too_small            ``too small (WxH px; both sides must be at least N px)``
empty_patient_id     ``empty patient_id``
unknown_label        ``label 'x' not in classes (allowed: a, b)``
duplicate            ``duplicate of row N``
conflicting_labels   ``same image under labels A and B (rows N, M)``
==================== ==========================================================

A row gets the first failing check in that order. ``duplicate`` and
``conflicting_labels`` follow the ``duplicates`` policy; all others follow
``on_bad_row``. Reports and error messages identify rows by row number and file
name only, never by patient_id.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from smearnet.data.decode import (TOO_LARGE, UNREADABLE, ImageProblem, decode_rgb, folder_names_by_key,
                                  read_image_bytes, short_message)
from smearnet.errors import SmearnetError
from smearnet.data.manifest import REQUIRED_COLUMNS, fill_optional_columns

POLICIES: tuple[str, ...] = ("error", "quarantine")
REPORT_SCHEMA_VERSION = 1
OUTPUT_FILES: tuple[str, ...] = ("manifest.csv", "quarantine.csv", "validation.json", "validation.md")

EMPTY_PATH = "empty_path"
TOO_SMALL = "too_small"
EMPTY_PATIENT_ID = "empty_patient_id"
UNKNOWN_LABEL = "unknown_label"
DUPLICATE = "duplicate"
CONFLICTING_LABELS = "conflicting_labels"
DUPLICATE_CHECKS: frozenset[str] = frozenset({DUPLICATE, CONFLICTING_LABELS})

_IMAGE_COLUMNS: tuple[str, ...] = ("label_raw", "sha256", "width", "height", "mode")
_VERDICT_COLUMNS: tuple[str, ...] = ("check", "reason")
_MAX_ROWS_IN_MESSAGE = 5
# Patient ids shorter than this are not redacted from file names (too many false hits, not identifying).
_MIN_REDACTED_ID_LENGTH = 3


@dataclass
class IngestResult:
    """Outcome of ``validate_manifest``.

    accepted: rows that passed, sorted by ``row``, with ``label`` set to the
        canonical class name and added columns ``label_raw`` (label as written),
        ``sha256``, ``width``/``height`` (after EXIF orientation, i.e. as
        ``load_rgb`` returns them) and ``mode`` (original PIL mode).
    quarantined: rows that failed, same columns plus ``check`` and ``reason``.
    report: JSON-serialisable summary; contains no patient_id values.
    """

    accepted: pd.DataFrame
    quarantined: pd.DataFrame
    report: dict[str, Any]


@dataclass(frozen=True)
class FileCheck:
    """Result of reading and decoding one file; ``check`` is None when the file is usable."""

    check: str | None
    reason: str | None
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    mode: str | None = None


def _check_file(task: tuple[str, int, int]) -> FileCheck:
    """Worker: read, hash, decode and size-check one file (top-level so it pickles)."""
    path, min_size, max_pixels = task
    try:
        data = read_image_bytes(path, max_pixels)
        rgb, original_mode = decode_rgb(data, max_pixels)
    except ImageProblem as problem:
        return FileCheck(problem.check, problem.reason)
    except SmearnetError:
        raise
    except MemoryError:
        return FileCheck(TOO_LARGE, "too large (out of memory while decoding)")
    except Exception as exc:
        return FileCheck(UNREADABLE, f"unreadable ({short_message(exc)})")
    digest = hashlib.sha256(data).hexdigest()
    width, height = rgb.size
    if min(width, height) < min_size:
        return FileCheck(
            TOO_SMALL,
            f"too small ({width}x{height} px; both sides must be at least {min_size} px)",
            digest,
            width,
            height,
            original_mode,
        )
    return FileCheck(None, None, digest, width, height, original_mode)


def _run_file_checks(paths: list[str], min_size: int, max_pixels: int, workers: int, progress: bool) -> list[FileCheck]:
    """Check every path, in order; a process pool when workers > 1, in-process otherwise."""
    tasks = [(path, min_size, max_pixels) for path in paths]
    folder_names_by_key.cache_clear()  # file-name hints must reflect the folders as they are now
    if workers == 1 or len(tasks) < 2:
        with tqdm(total=len(tasks), desc="Validating images", unit="img", disable=not progress) as bar:
            results = []
            for task in tasks:
                results.append(_check_file(task))
                bar.update()
            return results
    chunksize = max(1, min(64, len(tasks) // (workers * 8)))
    try:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            # map() submits everything (forking the workers) before tqdm starts its monitor thread.
            ordered_results = pool.map(_check_file, tasks, chunksize=chunksize)
            with tqdm(total=len(tasks), desc="Validating images", unit="img", disable=not progress) as bar:
                results = []
                for result in ordered_results:
                    results.append(result)
                    bar.update()
                return results
    except BrokenProcessPool:
        raise SmearnetError(
            "An image-validation worker process died during ingest (usually out of memory while decoding a "
            "very large image).",
            "lower ingest.workers or ingest.max_pixels and re-run.",
        ) from None


# --------------------------------------------------------------------------- validation


def validate_manifest(
    manifest: pd.DataFrame,
    classes: Sequence[str],
    *,
    min_size: int = 64,
    max_pixels: int = 40_000_000,
    on_bad_row: str = "error",
    label_aliases: Mapping[str, str] | None = None,
    duplicates: str = "error",
    workers: int = 2,
    progress: bool = True,
) -> IngestResult:
    """Check every row of a manifest (from ``read_manifest``) and split it into accepted / quarantined.

    Labels match ``classes`` after strip + casefold (+ Unicode NFC), or via
    ``label_aliases`` (alias -> class, matched the same way). Files are read
    once, hashed (sha256) and fully decoded with the same code as ``load_rgb``.
    Under a policy of ``"error"`` one SmearnetError lists the first bad rows and
    the total; under ``"quarantine"`` bad rows go to ``quarantined``. The input
    DataFrame and the files are never modified.
    """
    _check_options(on_bad_row, duplicates, min_size, max_pixels, workers)
    class_by_key = _class_lookup(classes)
    alias_by_key = _alias_lookup(label_aliases, class_by_key)
    manifest_path = manifest.attrs.get("manifest_path")
    rows = _prepare_rows(manifest, manifest_path)

    paths = rows["path"].tolist()
    unique_paths = list(
        dict.fromkeys(path for path, written in zip(paths, rows["source_path"], strict=True) if written)
    )
    checked = _run_file_checks(unique_paths, min_size, max_pixels, workers, progress)
    check_by_path = dict(zip(unique_paths, checked, strict=True))
    file_checks = [
        check_by_path.get(path) if written else None for path, written in zip(paths, rows["source_path"], strict=True)
    ]

    labels = [_canonical_label(raw, class_by_key, alias_by_key) for raw in rows["label"]]
    allowed = ", ".join(class_by_key.values())
    verdicts: list[tuple[str, str] | None] = []
    for file_check, label, raw_label, patient_id in zip(
        file_checks, labels, rows["label"], rows["patient_id"], strict=True
    ):
        if file_check is None:
            verdicts.append((EMPTY_PATH, "empty path"))
        elif file_check.check is not None:
            verdicts.append((file_check.check, file_check.reason or file_check.check))
        elif not patient_id.strip():
            verdicts.append((EMPTY_PATIENT_ID, "empty patient_id"))
        elif label is None:
            verdicts.append((UNKNOWN_LABEL, f"label {raw_label!r} not in classes (allowed: {allowed})"))
        else:
            verdicts.append(None)

    row_numbers = rows["row"].tolist()
    duplicate_stats = _mark_duplicates(
        verdicts, labels, [c.sha256 if c else None for c in file_checks], paths, row_numbers
    )
    _raise_for_error_policy(rows, verdicts, on_bad_row, duplicates, manifest_path)

    rows = _with_image_columns(rows, labels, file_checks)
    is_bad = [verdict is not None for verdict in verdicts]
    accepted = rows.loc[[not bad for bad in is_bad]].reset_index(drop=True)
    quarantined = rows.loc[is_bad].reset_index(drop=True)
    quarantined["check"] = pd.Series([v[0] for v in verdicts if v is not None], dtype=object)
    quarantined["reason"] = pd.Series([v[1] for v in verdicts if v is not None], dtype=object)
    accepted["width"] = accepted["width"].astype("int64")
    accepted["height"] = accepted["height"].astype("int64")

    report = _build_report(
        accepted=accepted,
        quarantined=quarantined,
        classes=list(class_by_key.values()),
        policy={
            "on_bad_row": on_bad_row,
            "duplicates": duplicates,
            "min_size": int(min_size),
            "max_pixels": int(max_pixels),
            "classes": list(class_by_key.values()),
            "label_aliases": dict(label_aliases or {}),
        },
        duplicate_stats=duplicate_stats,
        manifest_path=manifest_path,
        total_rows=len(rows),
    )
    return IngestResult(accepted=accepted, quarantined=quarantined, report=report)


def _check_options(on_bad_row: str, duplicates: str, min_size: int, max_pixels: int, workers: int) -> None:
    """Raise SmearnetError naming the config key of the first invalid option."""
    for key, value in (("ingest.on_bad_row", on_bad_row), ("ingest.duplicates", duplicates)):
        if value not in POLICIES:
            raise SmearnetError(
                f"Config key {key} is {value!r}, which is not an allowed value (allowed: {', '.join(POLICIES)}).",
                f"set {key} to 'error' (stop on the first bad rows) or 'quarantine' (set them aside and continue).",
            )
    for key, number in (("ingest.min_size", min_size), ("ingest.max_pixels", max_pixels), ("ingest.workers", workers)):
        if isinstance(number, bool) or not isinstance(number, (int, np.integer)) or number < 1:
            raise SmearnetError(
                f"Config key {key} is {number!r}, but it must be a whole number of at least 1.",
                f"set {key} to a positive integer.",
            )


def _label_key(label: str) -> str:
    return unicodedata.normalize("NFC", str(label)).strip().casefold()


def _class_lookup(classes: Sequence[str]) -> dict[str, str]:
    """Map normalised class name -> class name as configured; reject empty/colliding names."""
    if isinstance(classes, str) or not classes:
        raise SmearnetError(
            f"Config key classes must be a non-empty list of class names, got {classes!r}.",
            "list the class names, e.g. classes: [covid_rl, normal].",
        )
    class_by_key: dict[str, str] = {}
    for name in classes:
        key = _label_key(name)
        if not key:
            raise SmearnetError("Config key classes contains an empty class name.", "remove the empty entry.")
        if key in class_by_key:
            raise SmearnetError(
                f"Config key classes lists {class_by_key[key]!r} and {name!r}, which are the same class once "
                "case and surrounding spaces are ignored.",
                "keep one spelling of each class.",
            )
        class_by_key[key] = str(name).strip()
    return class_by_key


def _alias_lookup(label_aliases: Mapping[str, str] | None, class_by_key: dict[str, str]) -> dict[str, str]:
    """Map normalised alias -> canonical class; every alias must point at a configured class."""
    alias_by_key: dict[str, str] = {}
    for alias, target in (label_aliases or {}).items():
        alias_key, target_key = _label_key(alias), _label_key(target)
        if target_key not in class_by_key:
            raise SmearnetError(
                f"Config key ingest.label_aliases maps {alias!r} to {target!r}, which is not one of the classes "
                f"({', '.join(class_by_key.values())}).",
                "point every alias at one of the configured classes.",
            )
        if alias_key in class_by_key and alias_key != target_key:
            raise SmearnetError(
                f"Config key ingest.label_aliases maps {alias!r} to {target!r}, but {alias!r} is itself a class.",
                "remove that alias or rename the class.",
            )
        alias_by_key[alias_key] = class_by_key[target_key]
    return alias_by_key


def _canonical_label(raw_label: str, class_by_key: dict[str, str], alias_by_key: dict[str, str]) -> str | None:
    key = _label_key(raw_label)
    return alias_by_key.get(key) or class_by_key.get(key)


def _prepare_rows(manifest: pd.DataFrame, manifest_path: str | None) -> pd.DataFrame:
    """Copy of the manifest, sorted by row, with string columns and optional columns filled."""
    missing = [name for name in REQUIRED_COLUMNS if name not in manifest.columns]
    where = f"The manifest {manifest_path}" if manifest_path else "The manifest DataFrame"
    if missing:
        raise SmearnetError(
            f"{where} lacks the required column(s) {', '.join(missing)}; columns found: "
            f"{', '.join(repr(str(name)) for name in manifest.columns) or 'none'}.",
            f"give the manifest the columns {', '.join(REQUIRED_COLUMNS)} "
            "(read CSVs with smearnet.data.manifest.read_manifest).",
        )
    if manifest.empty:
        raise SmearnetError(f"{where} has no rows, so there is nothing to ingest.", "add one row per image.")
    derived = [name for name in (*_IMAGE_COLUMNS, *_VERDICT_COLUMNS) if name in manifest.columns]
    rows = manifest.drop(columns=derived)
    if "row" not in rows.columns:  # a DataFrame built in code: number rows as if written to a CSV
        rows["row"] = range(2, len(rows) + 2)
    if "source_path" not in rows.columns:
        rows["source_path"] = rows["path"]
    rows["row"] = pd.to_numeric(rows["row"]).astype("int64")
    rows = rows.sort_values("row", kind="stable").reset_index(drop=True)
    for name in rows.columns:
        if name != "row":
            rows[name] = rows[name].fillna("").astype(str)
    rows["path"] = [os.path.abspath(path) if path else path for path in rows["path"]]
    fill_optional_columns(rows)
    return rows


def _mark_duplicates(
    verdicts: list[tuple[str, str] | None],
    labels: list[str | None],
    sha_per_row: list[str | None],
    paths: list[str],
    row_numbers: list[int],
) -> dict[str, int]:
    """Set duplicate / conflicting-label verdicts (in place) among rows that passed every other check."""
    indices_by_sha: dict[str, list[int]] = {}
    for index, (verdict, digest) in enumerate(zip(verdicts, sha_per_row, strict=True)):
        if verdict is None and digest is not None:
            indices_by_sha.setdefault(digest, []).append(index)
    stats = {"duplicate_rows": 0, "same_path_rows": 0, "conflicting_label_rows": 0, "conflicting_label_groups": 0}
    for indices in indices_by_sha.values():
        if len(indices) < 2:
            continue
        group_labels = list(dict.fromkeys(labels[index] or "" for index in indices))
        if len(group_labels) > 1:
            row_list = ", ".join(str(row_numbers[index]) for index in indices)
            reason = f"same image under labels {_join_words(group_labels)} (rows {row_list})"
            for index in indices:
                verdicts[index] = (CONFLICTING_LABELS, reason)
            stats["conflicting_label_rows"] += len(indices)
            stats["conflicting_label_groups"] += 1
            continue
        first = indices[0]
        for index in indices[1:]:
            verdicts[index] = (DUPLICATE, f"duplicate of row {row_numbers[first]}")
            stats["duplicate_rows"] += 1
            stats["same_path_rows"] += paths[index] == paths[first]
    return stats


def _join_words(words: list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def _redact(text: str, patient_id: str) -> str:
    """Replace the row's own patient_id inside ``text`` (e.g. a file name like P0042_cell.jpg)."""
    patient_id = patient_id.strip()
    if len(patient_id) >= _MIN_REDACTED_ID_LENGTH and patient_id in text:
        return text.replace(patient_id, "<patient_id>")
    return text


def _raise_for_error_policy(
    rows: pd.DataFrame,
    verdicts: list[tuple[str, str] | None],
    on_bad_row: str,
    duplicates: str,
    manifest_path: str | None,
) -> None:
    """Raise one SmearnetError for all bad rows whose policy is "error"."""
    failing: list[tuple[int, tuple[str, str]]] = []
    for index, verdict in enumerate(verdicts):
        if verdict is None:
            continue
        policy = duplicates if verdict[0] in DUPLICATE_CHECKS else on_bad_row
        if policy == "error":
            failing.append((index, verdict))
    if not failing:
        return
    shown = []
    for index, (_check, reason) in failing[:_MAX_ROWS_IN_MESSAGE]:
        patient_id = str(rows.at[index, "patient_id"])
        written = _redact(str(rows.at[index, "source_path"]), patient_id) or "<empty>"
        shown.append(f"row {rows['row'].iloc[index]} ({written}): {_redact(reason, patient_id)}")
    more = f"; and {len(failing) - _MAX_ROWS_IN_MESSAGE} more" if len(failing) > _MAX_ROWS_IN_MESSAGE else ""
    by_check = ", ".join(f"{check} {count}" for check, count in sorted(Counter(v[0] for _, v in failing).items()))
    where = f"manifest {manifest_path}" if manifest_path else "the manifest"
    fixes = []
    if any(verdict[0] not in DUPLICATE_CHECKS for _, verdict in failing):
        fixes.append(
            "fix or remove those rows (or the files they point to) and re-run, or set ingest.on_bad_row=quarantine "
            "to move bad rows to quarantine.csv and continue"
        )
    if any(verdict[0] in DUPLICATE_CHECKS for _, verdict in failing):
        fixes.append(
            "remove the duplicate rows/images (an image under two labels needs a person to pick the right label), "
            "or set ingest.duplicates=quarantine to set them aside and continue"
        )
    raise SmearnetError(
        f"Ingest found {len(failing)} bad row(s) out of {len(rows)} in {where} ({by_check}): {'; '.join(shown)}{more}.",
        "; or ".join(fixes) + ".",
    )


def _with_image_columns(rows: pd.DataFrame, labels: list[str | None], checks: list[FileCheck | None]) -> pd.DataFrame:
    """Add label_raw, canonical label, sha256, width, height and original mode."""
    rows = rows.copy()
    rows["label_raw"] = rows["label"]
    rows["label"] = [label if label is not None else raw for label, raw in zip(labels, rows["label_raw"], strict=True)]
    rows["sha256"] = pd.Series([c.sha256 if c else None for c in checks], dtype=object)
    rows["width"] = pd.Series([c.width if c else None for c in checks], dtype="Int64")
    rows["height"] = pd.Series([c.height if c else None for c in checks], dtype="Int64")
    rows["mode"] = pd.Series([c.mode if c else None for c in checks], dtype=object)
    return rows


def _count(values: pd.Series) -> dict[str, int]:
    return {str(key): int(count) for key, count in sorted(Counter(values).items())}


def _build_report(
    *,
    accepted: pd.DataFrame,
    quarantined: pd.DataFrame,
    classes: list[str],
    policy: dict[str, Any],
    duplicate_stats: dict[str, int],
    manifest_path: str | None,
    total_rows: int,
) -> dict[str, Any]:
    """JSON-serialisable summary; rows are identified by row number and file name only."""
    per_class = {name: 0 for name in classes}
    per_class.update(_count(accepted["label"]))
    fixed = accepted[accepted["label"] != accepted["label_raw"]]
    fixed_mapping = [
        {"label_as_written": raw, "label": label, "rows": int(count)}
        for (raw, label), count in sorted(Counter(zip(fixed["label_raw"], fixed["label"], strict=True)).items())
    ]
    patients_in_multiple_sites = int((accepted.groupby("patient_id")["site"].nunique() > 1).sum())
    patients_in_multiple_cohorts = int((accepted.groupby("patient_id")["cohort"].nunique() > 1).sum())
    smears_with_multiple_patients = int((accepted.groupby("smear_id")["patient_id"].nunique() > 1).sum())
    warning_messages = []
    if patients_in_multiple_sites:
        warning_messages.append(
            f"{patients_in_multiple_sites} patient(s) have images from more than one site; allowed, but check that "
            "patient ids are not reused across sites for different people."
        )
    if patients_in_multiple_cohorts:
        warning_messages.append(
            f"{patients_in_multiple_cohorts} patient(s) appear in both development and assessment cohorts; "
            "this leaks patients into the assessment set."
        )
    if smears_with_multiple_patients:
        warning_messages.append(
            f"{smears_with_multiple_patients} smear_id(s) are shared by more than one patient; "
            "check the smear_id column."
        )
    empty_classes = [name for name, count in per_class.items() if count == 0]
    if empty_classes:
        warning_messages.append(f"No accepted images for class(es): {', '.join(empty_classes)}.")
    quarantined_rows = [
        {
            "row": int(row),
            "file": _redact(os.path.basename(written), patient_id) or "<empty path>",
            "check": check,
            "reason": _redact(reason, patient_id),
        }
        for row, written, patient_id, check, reason in zip(
            quarantined["row"],
            quarantined["source_path"],
            quarantined["patient_id"],
            quarantined["check"],
            quarantined["reason"],
            strict=True,
        )
    ]
    modes = _count(accepted["mode"])
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "manifest": manifest_path,
        "policy": policy,
        "counts": {"rows": total_rows, "accepted": len(accepted), "quarantined": len(quarantined)},
        "per_class": per_class,
        "per_site": _count(accepted["site"]),
        "per_cohort": _count(accepted["cohort"]),
        "per_reason": _count(quarantined["check"]),
        "modes": modes,
        "converted_to_rgb": sum(count for mode, count in modes.items() if mode != "RGB"),
        "labels_fixed": {"rows": len(fixed), "mapping": fixed_mapping},
        "duplicates": duplicate_stats,
        "patients_in_multiple_sites": patients_in_multiple_sites,
        "patients_in_multiple_cohorts": patients_in_multiple_cohorts,
        "smears_with_multiple_patients": smears_with_multiple_patients,
        "empty_classes": empty_classes,
        "warnings": warning_messages,
        "quarantined_rows": quarantined_rows,
    }


# --------------------------------------------------------------------------- outputs


def write_ingest_outputs(result: IngestResult, out_dir: Path) -> None:
    """Write manifest.csv (accepted), quarantine.csv, validation.json and validation.md into ``out_dir``.

    In the CSVs, ``path`` is relative to ``out_dir`` (read_manifest and
    smearnet.io.read_table resolve it back), like smearnet.io.write_manifest.

    Every file is written to a temporary file in ``out_dir`` and then moved into
    place with ``os.replace``, so readers never see a half-written file; the
    four renames happen only after all four temporary files are complete.
    Refuses to overwrite the input manifest or any input image.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise SmearnetError(
            f"Ingest output folder {out_dir} exists but is a file.", "choose a folder path for the outputs."
        )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SmearnetError(
            f"Cannot create the ingest output folder {out_dir} ({exc.strerror}).",
            "choose a writable location for the ingest outputs.",
        ) from None
    _refuse_overwriting_inputs(result, out_dir)
    contents = {
        "manifest.csv": _with_paths_relative_to(result.accepted, out_dir).to_csv(index=False),
        "quarantine.csv": _with_paths_relative_to(result.quarantined, out_dir).to_csv(index=False),
        "validation.json": json.dumps(result.report, indent=2, ensure_ascii=False, allow_nan=False) + "\n",
        "validation.md": render_report_markdown(result.report),
    }
    written: list[tuple[str, Path]] = []
    try:
        for name, text in contents.items():
            written.append((_write_temporary(out_dir, name, text), out_dir / name))
        for temporary, final in written:
            os.replace(temporary, final)
    except OSError as exc:
        for temporary, _final in written:
            if os.path.exists(temporary):
                os.unlink(temporary)
        raise SmearnetError(
            f"Cannot write the ingest outputs to {out_dir} ({exc.strerror or exc}).",
            "check free disk space and write permission on that folder, then re-run.",
        ) from None


def _with_paths_relative_to(frame: pd.DataFrame, out_dir: Path) -> pd.DataFrame:
    """Copy of ``frame`` with ``path`` relative to ``out_dir``, so the outputs survive moving the repo + data."""
    folder = os.path.abspath(out_dir)
    relative = frame.copy()
    relative["path"] = [os.path.relpath(path, folder) if path else path for path in frame["path"]]
    return relative


def _write_temporary(out_dir: Path, name: str, text: str) -> str:
    """Write ``text`` to a fsynced temporary file next to the final one; return its path."""
    descriptor, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=out_dir)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        os.unlink(temporary)
        raise
    return temporary


def _refuse_overwriting_inputs(result: IngestResult, out_dir: Path) -> None:
    """Raise if an output file would replace the input manifest or an input image."""
    targets = {os.path.realpath(out_dir / name): name for name in OUTPUT_FILES}
    inputs = [result.report.get("manifest")] if result.report.get("manifest") else []
    for frame in (result.accepted, result.quarantined):
        if "path" in frame.columns:
            inputs.extend(path for path in frame["path"] if os.path.basename(str(path)) in OUTPUT_FILES)
    for input_path in inputs:
        name = targets.get(os.path.realpath(str(input_path)))
        if name is not None:
            raise SmearnetError(
                f"Writing ingest outputs to {out_dir} would overwrite the input file {input_path} ({name}).",
                "choose an output folder that is not the dataset folder (e.g. data/ingest/).",
            )


def render_report_markdown(report: Mapping[str, Any]) -> str:
    """Human-readable validation.md for a report from validate_manifest."""

    def table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[str]:
        if not rows:
            return ["(none)", ""]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
        return [*lines, ""]

    counts = report["counts"]
    policy = report["policy"]
    lines = [
        "# Ingest validation report",
        "",
        f"- Manifest: `{report.get('manifest')}`",
        f"- Rows: {counts['rows']}; accepted: {counts['accepted']}; quarantined: {counts['quarantined']}",
        f"- Policy: on_bad_row={policy['on_bad_row']}, duplicates={policy['duplicates']}, "
        f"min_size={policy['min_size']}, max_pixels={policy['max_pixels']:,}",
        "",
    ]
    if report["warnings"]:
        lines += ["## Warnings", "", *(f"- {message}" for message in report["warnings"]), ""]
    fixed = [
        (repr(item["label_as_written"]), item["label"], item["rows"]) for item in report["labels_fixed"]["mapping"]
    ]
    quarantined = [(item["row"], item["file"], item["reason"]) for item in report["quarantined_rows"]]
    sections: list[tuple[str, tuple[str, ...], list[tuple[Any, ...]]]] = [
        ("Accepted images per class", ("class", "images"), list(report["per_class"].items())),
        ("Accepted images per site", ("site", "images"), list(report["per_site"].items())),
        ("Accepted images per cohort", ("cohort", "images"), list(report["per_cohort"].items())),
        ("Original image modes (all converted to RGB)", ("mode", "images"), list(report["modes"].items())),
        ("Labels fixed by normalisation or alias", ("label as written", "label", "rows"), fixed),
        ("Duplicates", ("kind", "rows"), list(report["duplicates"].items())),
        ("Quarantined rows by reason", ("check", "rows"), list(report["per_reason"].items())),
        ("Quarantined rows", ("row", "file", "reason"), quarantined),
    ]
    for title, header, table_rows in sections:
        lines += [f"## {title}", "", *table(header, table_rows)]
    return "\n".join(lines)
