"""The ingest stage's outcome: the report dict, its Markdown rendering, and the four output files.

Reports and messages identify rows by row number and file name only, never by patient_id (a patient_id
inside a file name is replaced by ``<patient_id>``).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from smearnet.data.manifest import is_missing_id
from smearnet.errors import SmearnetError
from smearnet.io import atomic_file, json_safe

REPORT_SCHEMA_VERSION = 1
OUTPUT_FILES: tuple[str, ...] = ("manifest.csv", "quarantine.csv", "validation.json", "validation.md")

# Patient ids shorter than this are not redacted from file names (too many false hits, not identifying).
_MIN_REDACTED_ID_LENGTH = 3
# validation.md lists at most this many noted rows (validation.json has them all).
_MAX_NOTES_IN_MARKDOWN = 200


@dataclass
class IngestResult:
    """Outcome of ``smearnet.data.ingest.validate_manifest``.

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


def redact(text: str, patient_id: str) -> str:
    """Replace the row's own patient_id inside ``text`` (e.g. a file name like P0042_cell.jpg)."""
    patient_id = patient_id.strip()
    if len(patient_id) >= _MIN_REDACTED_ID_LENGTH and patient_id in text:
        return text.replace(patient_id, "<patient_id>")
    return text


def row_file(written: str, patient_id: str) -> str:
    """How a report names a row's file: the written path's last part, patient_id redacted."""
    return redact(os.path.basename(written.replace("\\", "/")), patient_id) or "<empty path>"


def _count(values: Any) -> dict[str, int]:
    return {str(key): int(count) for key, count in sorted(Counter(values).items())}


def lost_to_quarantine(accepted: pd.DataFrame, quarantined: pd.DataFrame) -> dict[str, Any]:
    """The smears and patients that had rows but kept none: every later stage (split, smear figures) never sees
    them, so the report counts them, smears per cohort. Rows without a patient id cannot be attributed."""
    attributed = quarantined[~quarantined["patient_id"].map(is_missing_id).astype(bool)]
    kept_smears = set(zip(accepted["patient_id"], accepted["smear_id"], strict=True))
    lost_smears = {(patient, smear): cohort for patient, smear, cohort in zip(
        attributed["patient_id"], attributed["smear_id"], attributed["cohort"], strict=True)
        if (patient, smear) not in kept_smears}
    lost_patients = set(attributed["patient_id"]) - set(accepted["patient_id"])
    return {"smears_by_cohort": _count(lost_smears.values()), "patients": len(lost_patients)}


def build_report(
    *,
    accepted: pd.DataFrame,
    quarantined: pd.DataFrame,
    classes: list[str],
    policy: dict[str, Any],
    duplicate_stats: dict[str, int],
    manifest_path: str | None,
    total_rows: int,
    notes_by_row: Mapping[int, list[str]],
    paths_fixed: dict[str, int],
    shared_smear_ids: int,
    lost: Mapping[str, Any],
) -> dict[str, Any]:
    """JSON-serialisable summary; rows are identified by row number and file name only.

    ``notes_by_row`` (row number -> notes) lists what was accepted but not used as stored (an invalid EXIF
    orientation, an ignored colour profile, a file name matched in another Unicode form); ``paths_fixed``
    counts path cells read by the Windows and Unicode rules of smearnet.data.paths; ``shared_smear_ids`` counts
    smear ids written for more than one patient, read per patient (``smearnet.data.manifest.one_patient_per_smear``);
    ``lost`` counts the smears and patients none of whose rows were accepted (``lost_to_quarantine``).
    """
    per_class = {name: 0 for name in classes}
    per_class.update(_count(accepted["label"]))
    fixed = accepted[accepted["label"] != accepted["label_raw"]]
    fixed_mapping = [
        {"label_as_written": raw, "label": label, "rows": int(count)}
        for (raw, label), count in sorted(Counter(zip(fixed["label_raw"], fixed["label"], strict=True)).items())
    ]
    patients_in_multiple_sites = int((accepted.groupby("patient_id")["site"].nunique() > 1).sum())
    patients_in_multiple_cohorts = int((accepted.groupby("patient_id")["cohort"].nunique() > 1).sum())
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
    if shared_smear_ids:
        warning_messages.append(
            f"{shared_smear_ids} smear_id(s) were written for more than one patient; a smear is one patient's, so "
            "each patient's cells under such an id were read as a smear of their own (patient_id::smear_id)."
        )
    lost_smears = sum(lost["smears_by_cohort"].values())
    if lost_smears:
        by_cohort = ", ".join(f"{cohort} {count}" for cohort, count in lost["smears_by_cohort"].items())
        warning_messages.append(
            f"{lost_smears} smear id(s) ({by_cohort}) and {lost['patients']} patient id(s) had every row quarantined "
            "(bad files, labels or duplicates), so no later stage sees them: the split, the cell figures and the "
            "smear figures are over the rest (where each image is its own patient, as in class folders, these are "
            "the quarantined images). The rows are listed under Quarantined rows."
        )
    empty_classes = [name for name, count in per_class.items() if count == 0]
    if empty_classes:
        warning_messages.append(f"No accepted images for class(es): {', '.join(empty_classes)}.")
    quarantined_rows = [
        {"row": int(row), "file": row_file(written, patient_id), "check": check,
         "reason": redact(reason, patient_id)}
        for row, written, patient_id, check, reason in zip(
            quarantined["row"], quarantined["source_path"], quarantined["patient_id"], quarantined["check"],
            quarantined["reason"], strict=True,
        )
    ]
    noted_rows = [
        {"row": int(row), "file": row_file(written, patient_id), "note": redact(note, patient_id)}
        for row, written, patient_id in zip(accepted["row"], accepted["source_path"], accepted["patient_id"],
                                            strict=True)
        for note in notes_by_row.get(int(row), ())
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
        "paths_fixed": dict(paths_fixed),
        "duplicates": duplicate_stats,
        "patients_in_multiple_sites": patients_in_multiple_sites,
        "patients_in_multiple_cohorts": patients_in_multiple_cohorts,
        "smears_with_multiple_patients": shared_smear_ids,  # written so; now read per patient
        "lost_to_quarantine": dict(lost),
        "empty_classes": empty_classes,
        "warnings": warning_messages,
        "accepted_with_notes": noted_rows,
        "quarantined_rows": quarantined_rows,
    }


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
        f"min_size={policy['min_size']}, max_pixels={policy['max_pixels']:,}, confine={policy.get('confine', False)}",
        "",
    ]
    if report["warnings"]:
        lines += ["## Warnings", "", *(f"- {message}" for message in report["warnings"]), ""]
    fixed = [
        (repr(item["label_as_written"]), item["label"], item["rows"]) for item in report["labels_fixed"]["mapping"]
    ]
    noted = report.get("accepted_with_notes", [])
    noted_shown = [(item["row"], item["file"], item["note"]) for item in noted[:_MAX_NOTES_IN_MARKDOWN]]
    if len(noted) > _MAX_NOTES_IN_MARKDOWN:
        noted_shown.append(("...", f"{len(noted) - _MAX_NOTES_IN_MARKDOWN} more in validation.json", ""))
    quarantined = [(item["row"], item["file"], item["reason"]) for item in report["quarantined_rows"]]
    paths_fixed = [(kind, rows) for kind, rows in report.get("paths_fixed", {}).items() if rows]
    sections: list[tuple[str, tuple[str, ...], list[tuple[Any, ...]]]] = [
        ("Accepted images per class", ("class", "images"), list(report["per_class"].items())),
        ("Accepted images per site", ("site", "images"), list(report["per_site"].items())),
        ("Accepted images per cohort", ("cohort", "images"), list(report["per_cohort"].items())),
        ("Original image modes (all converted to RGB)", ("mode", "images"), list(report["modes"].items())),
        ("Labels fixed by normalisation or alias", ("label as written", "label", "rows"), fixed),
        ("Paths read by the Windows / Unicode rules", ("rule", "rows"), paths_fixed),
        ("Accepted with a note", ("row", "file", "note"), noted_shown),
        ("Duplicates", ("kind", "rows"), list(report["duplicates"].items())),
        ("Quarantined rows by reason", ("check", "rows"), list(report["per_reason"].items())),
        ("Quarantined rows", ("row", "file", "reason"), quarantined),
    ]
    for title, header, table_rows in sections:
        lines += [f"## {title}", "", *table(header, table_rows)]
    return "\n".join(lines)


def write_ingest_outputs(result: IngestResult, out_dir: Path) -> None:
    """Write manifest.csv (accepted), quarantine.csv, validation.json and validation.md into ``out_dir``.

    In the CSVs, ``path`` is relative to ``out_dir`` (read_manifest and
    smearnet.io.read_table resolve it back), like smearnet.io.write_manifest.

    Each file replaces its previous version atomically (smearnet.io.atomic_file), so readers never see a
    half-written file; to replace all four together, write into a smearnet.io.atomic_directory as the
    ingest stage does. Refuses to overwrite the input manifest or any input image.
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
        "validation.json": json.dumps(json_safe(result.report), indent=2, ensure_ascii=False, allow_nan=False) + "\n",
        "validation.md": render_report_markdown(result.report),
    }
    try:
        for name, text in contents.items():
            with atomic_file(out_dir / name) as partial, open(partial, "w", encoding="utf-8", newline="") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
    except OSError as exc:
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
