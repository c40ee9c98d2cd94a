"""Validate every image a manifest names; accept or quarantine each row.

``load_rgb`` is the single decode routine for the whole pipeline: ingest
validates images with exactly the code later stages use to read them, so an
accepted image always decodes the same way downstream. The report and the
output files are built by `smearnet.data.ingest_report`.

Each rejected row gets a stable ``check`` key (used for counts in the report)
and a human-readable ``reason`` that starts with a stable prefix:

==================== ==========================================================
check                reason
==================== ==========================================================
empty_path           ``empty path``
absolute_path        ``absolute path (...)`` (only with ``confine``)
outside_folder       ``path leaves the manifest's folder ...`` (only with ``confine``)
file_missing         ``file missing`` (+ a hint if only the letter case differs,
                     or if the path is a Windows absolute path)
is_directory         ``path is a directory``
not_regular_file     ``not a regular file`` (FIFO, device, socket)
unreadable           ``unreadable (permission denied)`` / ``unreadable (<OS error>)``
symlink_loop         ``symlink loop``
zero_byte            ``zero-byte file``
not_image            ``not an image (not a JPEG, PNG, BMP or TIFF file)``
format_not_allowed   ``format not allowed (GIF; allowed: JPEG, PNG, BMP, TIFF)``
multi_frame          ``more than one picture in the file (N frames of PNG; ...)``
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
``on_bad_row``. Path cells are read by the rules of `smearnet.data.paths`
(Windows separators, Unicode forms, confinement). Reports and error messages
identify rows by row number and file name only, never by patient_id.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from smearnet.data.decode import FILE_MISSING
from smearnet.data.file_checks import FileCheck, run_file_checks
from smearnet.data.ingest_report import IngestResult, build_report, lost_to_quarantine, redact, row_file
from smearnet.data.labels import alias_lookup, canonical_label, class_lookup
from smearnet.data.manifest import (FOLDER_COLUMN, REQUIRED_COLUMNS, fill_optional_columns, is_missing_id,
                                    one_patient_per_smear)
from smearnet.data.paths import confinement_problem, existing_unicode_form, is_windows_absolute
from smearnet.errors import SmearnetError

POLICIES: tuple[str, ...] = ("error", "quarantine")

EMPTY_PATH = "empty_path"
EMPTY_PATIENT_ID = "empty_patient_id"
UNKNOWN_LABEL = "unknown_label"
DUPLICATE = "duplicate"
CONFLICTING_LABELS = "conflicting_labels"
DUPLICATE_CHECKS: frozenset[str] = frozenset({DUPLICATE, CONFLICTING_LABELS})

_IMAGE_COLUMNS: tuple[str, ...] = ("label_raw", "sha256", "width", "height", "mode")
_VERDICT_COLUMNS: tuple[str, ...] = ("check", "reason")
_MAX_ROWS_IN_MESSAGE = 5

Verdict = tuple[str, str] | None


def validate_manifest(
    manifest: pd.DataFrame,
    classes: Sequence[str],
    *,
    min_size: int = 64,
    max_pixels: int = 40_000_000,
    on_bad_row: str = "error",
    label_aliases: Mapping[str, str] | None = None,
    duplicates: str = "error",
    confine: bool = False,
    workers: int = 2,
    progress: bool = True,
) -> IngestResult:
    """Check every row of a manifest (from ``read_manifest``) and split it into accepted / quarantined.

    Labels match ``classes`` after strip + casefold (+ Unicode NFC), or via
    ``label_aliases`` (alias -> class, matched the same way). Files are read
    once, hashed (sha256) and fully decoded with the same code as ``load_rgb``.
    With ``confine`` every path must stay inside its manifest's folder (no
    absolute paths, no ``..`` out of it, no symlink out of it); such rows are
    never opened. Under a policy of ``"error"`` one SmearnetError lists the
    first bad rows and the total; under ``"quarantine"`` bad rows go to
    ``quarantined``. The input DataFrame and the files are never modified.
    """
    _check_options(on_bad_row, duplicates, min_size, max_pixels, workers)
    class_by_key = class_lookup(classes)
    alias_by_key = alias_lookup(label_aliases, class_by_key)
    manifest_path = manifest.attrs.get("manifest_path")
    rows, folders = _prepare_rows(manifest, manifest_path)
    if confine and not all(folders):
        raise SmearnetError(
            "Ingest was asked to confine paths to their manifest's folder (data.confine), but some rows were not "
            "read from a manifest CSV, so there is no folder to confine them to.",
            "use data.confine with data=manifest (rows read by smearnet.data.manifest.read_manifest), or set "
            "data.confine=false.",
        )
    notes_by_row, paths_fixed = _apply_path_rules(rows)
    path_verdicts = _path_verdicts(rows, folders, confine)

    paths = rows["path"].tolist()
    to_open = [verdict is None for verdict in path_verdicts]
    unique_paths = list(dict.fromkeys(path for path, opened in zip(paths, to_open, strict=True) if opened))
    checked = run_file_checks(unique_paths, min_size, max_pixels, workers, progress)
    check_by_path = dict(zip(unique_paths, checked, strict=True))
    file_checks = [check_by_path[path] if opened else None for path, opened in zip(paths, to_open, strict=True)]

    labels = [canonical_label(raw, class_by_key, alias_by_key) for raw in rows["label"]]
    allowed = ", ".join(class_by_key.values())
    verdicts: list[Verdict] = []
    for path_verdict, file_check, label, raw_label, patient_id in zip(
        path_verdicts, file_checks, labels, rows["label"], rows["patient_id"], strict=True
    ):
        if path_verdict is not None:
            verdicts.append(path_verdict)
        elif file_check is not None and file_check.check is not None:
            verdicts.append((file_check.check, file_check.reason or file_check.check))
        elif not patient_id.strip():
            verdicts.append((EMPTY_PATIENT_ID, "empty patient_id"))
        elif is_missing_id(patient_id):
            verdicts.append((EMPTY_PATIENT_ID, "patient_id is a missing-value placeholder, not an id"))
        elif label is None:
            verdicts.append((UNKNOWN_LABEL, f"label {raw_label!r} not in classes (allowed: {allowed})"))
        else:
            verdicts.append(None)

    row_numbers = rows["row"].tolist()
    for row, file_check in zip(row_numbers, file_checks, strict=True):
        if file_check is not None and file_check.notes:
            notes_by_row.setdefault(row, []).extend(file_check.notes)
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
    lost = lost_to_quarantine(accepted, quarantined)  # on the ids as written, before any smear id is renamed
    accepted, shared_smear_ids = one_patient_per_smear(accepted)  # judged on the rows kept: a rejected row renames none
    accepted["width"] = accepted["width"].astype("int64")
    accepted["height"] = accepted["height"].astype("int64")

    report = build_report(
        accepted=accepted,
        quarantined=quarantined,
        classes=list(class_by_key.values()),
        policy={
            "on_bad_row": on_bad_row,
            "duplicates": duplicates,
            "min_size": int(min_size),
            "max_pixels": int(max_pixels),
            "confine": bool(confine),
            "classes": list(class_by_key.values()),
            "label_aliases": dict(label_aliases or {}),
        },
        duplicate_stats=duplicate_stats,
        manifest_path=manifest_path,
        total_rows=len(rows),
        notes_by_row=notes_by_row,
        paths_fixed=paths_fixed,
        shared_smear_ids=shared_smear_ids,
        lost=lost,
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


def _prepare_rows(manifest: pd.DataFrame, manifest_path: str | None) -> tuple[pd.DataFrame, list[str]]:
    """Copy of the manifest, sorted by row, with string columns and optional columns filled; and each row's
    manifest folder ('' when unknown), taken out of the rows so the outputs do not carry it."""
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
    if FOLDER_COLUMN not in rows.columns:
        rows[FOLDER_COLUMN] = os.path.dirname(manifest_path) if manifest_path else ""
    rows["row"] = pd.to_numeric(rows["row"]).astype("int64")
    rows = rows.sort_values("row", kind="stable").reset_index(drop=True)
    for name in rows.columns:
        if name != "row":
            rows[name] = rows[name].fillna("").astype(str)
    rows["path"] = [os.path.abspath(path) if path else path for path in rows["path"]]
    fill_optional_columns(rows)
    folders = rows.pop(FOLDER_COLUMN).tolist()
    return rows, folders


def _apply_path_rules(rows: pd.DataFrame) -> tuple[dict[int, list[str]], dict[str, int]]:
    """Use a file's other Unicode form when only that exists (in place); count the rows each path rule read.

    Returns notes by row number and the counts for the report's ``paths_fixed``.
    """
    notes: dict[int, list[str]] = {}
    backslashes = unicode_forms = 0
    fixed_paths = []
    for row, written, path in zip(rows["row"], rows["source_path"], rows["path"], strict=True):
        if "\\" in written and not os.path.isabs(written) and not is_windows_absolute(written):
            backslashes += 1
        other_form = existing_unicode_form(path) if path else None
        if other_form is not None:
            unicode_forms += 1
            notes.setdefault(int(row), []).append("file name found in another Unicode form (NFC/NFD) than written")
        fixed_paths.append(other_form or path)
    rows["path"] = fixed_paths
    return notes, {"backslash_separators": backslashes, "unicode_form": unicode_forms}


def _path_verdicts(rows: pd.DataFrame, folders: list[str], confine: bool) -> list[Verdict]:
    """Verdicts decided from the path cell alone (empty, outside the folder, Windows absolute), else None."""
    verdicts: list[Verdict] = []
    for written, path, folder in zip(rows["source_path"], rows["path"], folders, strict=True):
        if not written:
            verdicts.append((EMPTY_PATH, "empty path"))
        elif confine and (problem := confinement_problem(written, folder, opened=path)) is not None:
            verdicts.append(problem)
        elif is_windows_absolute(written) and not os.path.lexists(path):
            verdicts.append((FILE_MISSING, "file missing (a Windows absolute path, which cannot be opened here; "
                                           "write paths relative to the manifest's folder)"))
        else:
            verdicts.append(None)
    return verdicts


def _mark_duplicates(
    verdicts: list[Verdict],
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


def _raise_for_error_policy(
    rows: pd.DataFrame,
    verdicts: list[Verdict],
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
        written = row_file(str(rows.at[index, "source_path"]), patient_id)  # the file name: folders may name people
        shown.append(f"row {rows['row'].iloc[index]} ({written}): {redact(reason, patient_id)}")
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
