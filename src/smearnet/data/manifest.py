"""Read a dataset manifest CSV into a validated, fully-resolved DataFrame.

A manifest is the one contract every dataset follows: a UTF-8, comma-separated
CSV with the required columns ``path, label, patient_id`` and the optional
columns ``smear_id, site, cohort``. Relative paths resolve against the CSV's
folder, read by the rules of :mod:`smearnet.data.paths` (a backslash in a
relative path is a folder separator, as on Windows). Reading is structural only
(columns, cohort values); image files are checked later by
:func:`smearnet.data.ingest.validate_manifest`.
"""

from __future__ import annotations

import csv
import os
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from smearnet.data.paths import with_forward_slashes
from smearnet.errors import SmearnetError

REQUIRED_COLUMNS: tuple[str, ...] = ("path", "label", "patient_id")
OPTIONAL_COLUMNS: tuple[str, ...] = ("smear_id", "site", "cohort")
#: Columns smearnet adds to smear tables and reads back (composed smears: `part`, `cell_index`; the gate's
#: `smear_key`): a manifest column of that name would be taken for smearnet's own, so it is refused.
RESERVED_COLUMNS: tuple[str, ...] = ("part", "cell_index", "smear_key")
#: What spreadsheets and data-frame libraries write for a missing value (R's write.csv writes NA, pandas' astype(str)
#: nan, Excel #N/A): read as a patient id, every such row would join one pooled "patient".
MISSING_ID_PLACEHOLDERS = frozenset({"nan", "na", "n/a", "#n/a", "null", "none", "unknown", "-", "?"})
COHORTS: tuple[str, ...] = ("development", "assessment")
DEFAULT_SITE = "default"
DEFAULT_COHORT = "development"
#: Identifier columns compared as text: read in Unicode NFC, so "Müller" typed on macOS (decomposed) and on
#: Windows (composed) is one patient, not two that the split could put on both sides.
IDENTIFIER_COLUMNS: tuple[str, ...] = ("patient_id", "smear_id", "site")

#: The folder a row's relative path resolves against (the CSV's folder): what ``data.confine`` confines to.
FOLDER_COLUMN = "manifest_folder"
# Columns read_manifest adds; if a CSV already has them (e.g. an ingest output
# fed back in) they are recomputed, not trusted.
DERIVED_COLUMNS: tuple[str, ...] = ("row", "source_path", FOLDER_COLUMN)

_MAX_ROWS_IN_MESSAGE = 5


def read_manifest(csv_path: Path) -> pd.DataFrame:
    """Read ``csv_path`` as strings and return one row per image.

    Adds ``row`` (1-based CSV line number; the header is line 1, so the first
    data row is 2), ``source_path`` (the path cell as written, surrounding
    whitespace stripped) and ``manifest_folder`` (the CSV's absolute folder), and
    rewrites ``path`` to an absolute path (a backslash in a relative path is a
    folder separator: ``images\cell1.jpg`` is ``images/cell1.jpg``). Line ends
    may be LF or CRLF, and a UTF-8 byte-order mark is ignored. Missing or
    empty optional columns are filled: ``smear_id`` := patient_id,
    ``site`` := "default", ``cohort`` := "development". Cohort values are
    matched case-insensitively; header names naming a required or optional column are matched ignoring case,
    spaces, ``_`` and ``-`` (`column_name`). Header names and every cell except ``label``
    are stripped of surrounding whitespace (``label`` is normalised later, so
    the ingest report can count fixed labels); ``patient_id``, ``smear_id`` and
    ``site`` are read in Unicode NFC. Blank lines and a leading Excel ``sep=,``
    line are skipped; columns with an empty header (trailing commas) are
    ignored; unknown columns are kept as they are.

    Raises SmearnetError for a missing/unreadable/non-UTF-8 file, an empty
    manifest, missing/duplicated columns, rows with the wrong number of fields,
    and unknown cohort values.
    """
    csv_path = Path(csv_path)
    header, records = _read_csv_records(csv_path)
    columns = _check_header(csv_path, header)
    if not records:
        raise SmearnetError(
            f"Manifest {csv_path} has a header but no data rows, so there is nothing to ingest.",
            "add one row per image (path, label, patient_id) or point the pipeline at the right manifest.",
        )

    kept_indices = [i for i, name in enumerate(header) if name.strip()]
    data: dict[str, list[object]] = {name: [] for name in columns}
    line_numbers: list[int] = []
    for line_number, fields in records:
        if len(fields) != len(header):
            raise SmearnetError(
                f"Manifest {csv_path} line {line_number} has {len(fields)} fields but the header has "
                f"{len(header)} ({', '.join(repr(h) for h in header)}).",
                'quote any value that contains a comma ("my, file.jpg") and make every row have one value '
                "per header column.",
            )
        for name, index in zip(columns, kept_indices, strict=True):
            value = fields[index]
            data[name].append(value if name == "label" else identifier(value) if name in IDENTIFIER_COLUMNS
                              else value.strip())
        line_numbers.append(line_number)

    manifest = pd.DataFrame(data, dtype=str)
    fill_optional_columns(manifest)
    _check_cohorts(csv_path, manifest, line_numbers)

    csv_folder = os.path.dirname(os.path.abspath(csv_path))
    manifest["row"] = pd.Series(line_numbers, dtype="int64")
    manifest["source_path"] = manifest["path"]
    manifest["path"] = [_resolve(csv_folder, written) for written in manifest["source_path"]]
    manifest[FOLDER_COLUMN] = csv_folder
    manifest.attrs["manifest_path"] = os.path.abspath(csv_path)
    return manifest


def read_configured_manifest(data_config: Mapping[str, Any]) -> pd.DataFrame:
    """Read the manifest named by the ``data`` config section (``data.manifest``), for any ``data.source``.

    ``data=synthetic`` points at the generated cohort's CSV; ``data=manifest``
    needs ``data.manifest`` set to the user's CSV.
    """
    source = str(data_config.get("source") or "manifest")
    manifest = data_config.get("manifest")  # DictConfig.get returns None for a missing '???' value
    if manifest is None or str(manifest).strip() in ("", "???"):
        raise SmearnetError(
            "Config key data.manifest is not set, so there is no dataset to ingest.",
            "point it at your CSV: `dvc exp run -S data=manifest -S data.manifest=<path/to/manifest.csv>` "
            "(or keep the default data=synthetic).",
        )
    csv_path = Path(str(manifest))
    if source == "synthetic" and not csv_path.exists():
        raise SmearnetError(
            f"The synthetic cohort's manifest {csv_path} does not exist yet.",
            "run the generate stage first (`dvc repro generate`, or `make repro` for the whole pipeline).",
        )
    return read_manifest(csv_path)


def _read_csv_records(csv_path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Return the header and (line number, fields) for every non-blank record."""
    if not csv_path.exists():
        raise SmearnetError(
            f"Manifest {csv_path} does not exist.",
            "check the dataset path in the config (relative paths are resolved from the working directory).",
        )
    if csv_path.is_dir():
        raise SmearnetError(
            f"Manifest {csv_path} is a directory, not a CSV file.",
            "point the config at the manifest CSV inside that folder.",
        )
    if csv_path.stat().st_size == 0:
        raise SmearnetError(
            f"Manifest {csv_path} is empty (0 bytes).",
            f"write a header line '{','.join(REQUIRED_COLUMNS)}' followed by one row per image.",
        )
    try:
        with open(csv_path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            header: list[str] | None = None
            records: list[tuple[int, list[str]]] = []
            while True:
                start_line = reader.line_num + 1
                try:
                    fields = next(reader)
                except StopIteration:
                    break
                if not fields or all(not field.strip() for field in fields):
                    continue
                if header is None and [field.strip().casefold() for field in fields] == ["sep=", ""]:
                    continue  # Excel's "sep=," hint line (some export tools write it first)
                if header is None:
                    header = fields
                else:
                    records.append((start_line, fields))
    except PermissionError:
        raise SmearnetError(
            f"Manifest {csv_path} cannot be read (permission denied).",
            "give the pipeline user read permission on the file.",
        ) from None
    except UnicodeDecodeError as exc:
        raise SmearnetError(
            f"Manifest {csv_path} is not valid UTF-8 text (byte {exc.start} cannot be decoded).",
            "re-save the CSV with UTF-8 encoding (in Excel: 'CSV UTF-8 (Comma delimited)').",
        ) from None
    except csv.Error as exc:
        raise SmearnetError(
            f"Manifest {csv_path} is not a well-formed CSV near line {reader.line_num}: {exc}.",
            "check for an unmatched double quote or a stray NUL byte on that line.",
        ) from None
    if header is None:
        raise SmearnetError(
            f"Manifest {csv_path} contains only blank lines.",
            f"write a header line '{','.join(REQUIRED_COLUMNS)}' followed by one row per image.",
        )
    return header, records


def column_name(written: str) -> str:
    """The manifest column a header cell names: a required or optional column however it is cased and spaced
    (``Cohort``, ``Patient ID``, ``smear-id``, ``SmearID``), else the cell as written, stripped.

    Matching the optional columns loosely matters most: a ``Cohort`` column left unread would silently make every
    assessment patient a development one (trained on), a ``Smear_ID`` one would merge each patient's smears."""
    stripped = written.strip()
    return _KNOWN_BY_KEY.get(_column_key(stripped), stripped)


def _column_key(name: str) -> str:
    return "".join(ch for ch in name.casefold() if ch.isalnum())


_KNOWN_BY_KEY = {_column_key(name): name for name in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS)}


def is_missing_id(value: str) -> bool:
    """Whether an id cell holds no id: empty, or a missing-value placeholder (`MISSING_ID_PLACEHOLDERS`)."""
    return not value.strip() or value.strip().casefold() in MISSING_ID_PLACEHOLDERS


def identifier(value: str) -> str:
    """An id cell as every reader compares it: Unicode NFC (macOS and Windows spell "Müller" alike), stripped."""
    return unicodedata.normalize("NFC", value).strip()


def canonical_columns(source: Path, header: Sequence[str]) -> list[str]:
    """`column_name` of each non-empty header cell of the CSV `source`; raises for two spellings of one column and
    for the columns smearnet adds itself (`RESERVED_COLUMNS`)."""
    written = [str(name).strip() for name in header if str(name).strip()]
    columns = [column_name(name) for name in written]
    duplicated = sorted({name for name in columns if columns.count(name) > 1})
    if duplicated:
        spelled = "; ".join(f"{name}: " + ", ".join(repr(w) for w, c in zip(written, columns, strict=True) if c == name)
                            for name in duplicated)
        raise SmearnetError(
            f"Manifest {source} has the column(s) {', '.join(duplicated)} more than once ({spelled}).",
            "keep one column of each name (column names are matched ignoring case, spaces, '_' and '-').",
        )
    reserved = [name for name in columns if name in RESERVED_COLUMNS]
    if reserved:
        raise SmearnetError(
            f"Manifest {source} has the column(s) {', '.join(reserved)}, which smearnet adds to its smear tables "
            "itself; read from the manifest they would be taken for smearnet's own.",
            f"rename or drop them (reserved: {', '.join(RESERVED_COLUMNS)}).",
        )
    return columns


def _check_header(csv_path: Path, header: list[str]) -> list[str]:
    """Return the column names (`canonical_columns`), or raise for missing, duplicated or reserved ones."""
    columns = canonical_columns(csv_path, header)
    missing = [name for name in REQUIRED_COLUMNS if name not in columns]
    if missing:
        hints: list[str] = []
        if len(columns) == 1 and (";" in columns[0] or "\t" in columns[0]):
            hints.append("the file looks semicolon- or tab-separated, but a comma-separated CSV is required")
        found = ", ".join(repr(name) for name in columns) or "none"
        hint_text = f" ({'; '.join(hints)})" if hints else ""
        raise SmearnetError(
            f"Manifest {csv_path} is missing the required column(s) {', '.join(missing)}; "
            f"columns found: {found}{hint_text}.",
            f"make the header contain {', '.join(REQUIRED_COLUMNS)} (optional: {', '.join(OPTIONAL_COLUMNS)}).",
        )
    return columns


def fill_optional_columns(manifest: pd.DataFrame) -> None:
    """Add absent optional columns and fill empty cells with their defaults, in place."""
    if "smear_id" not in manifest:
        manifest["smear_id"] = manifest["patient_id"]
    else:
        empty = manifest["smear_id"] == ""
        manifest.loc[empty, "smear_id"] = manifest.loc[empty, "patient_id"]
    if "site" not in manifest:
        manifest["site"] = DEFAULT_SITE
    else:
        manifest.loc[manifest["site"] == "", "site"] = DEFAULT_SITE
    if "cohort" not in manifest:
        manifest["cohort"] = DEFAULT_COHORT
    else:
        manifest["cohort"] = [value.casefold() or DEFAULT_COHORT for value in manifest["cohort"]]


def shared_smear_ids(rows: pd.DataFrame) -> pd.Series:
    """Per row, whether its smear_id is written for more than one patient."""
    return rows.groupby("smear_id")["patient_id"].transform("nunique") > 1


def one_patient_per_smear(rows: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Rows whose smear_id was written for more than one patient (smears numbered per patient: 1, 2, ...) get
    ``patient_id::smear_id`` instead, and how many such ids there were. A smear is one patient's: every stage
    groups cells by smear_id, and a shared id would merge several patients' smears into one, called positive
    when any of them is."""
    shared = shared_smear_ids(rows)
    if not shared.any():
        return rows, 0
    rows = rows.copy()
    count = int(rows.loc[shared, "smear_id"].nunique())
    rows.loc[shared, "smear_id"] = rows.loc[shared, "patient_id"] + "::" + rows.loc[shared, "smear_id"]
    return rows, count


def _check_cohorts(csv_path: Path, manifest: pd.DataFrame, line_numbers: list[int]) -> None:
    """Raise one error listing the rows whose cohort is not an allowed value."""
    bad = [(line, value) for line, value in zip(line_numbers, manifest["cohort"], strict=True) if value not in COHORTS]
    if not bad:
        return
    shown = "; ".join(f"row {line}: {value!r}" for line, value in bad[:_MAX_ROWS_IN_MESSAGE])
    more = f"; and {len(bad) - _MAX_ROWS_IN_MESSAGE} more" if len(bad) > _MAX_ROWS_IN_MESSAGE else ""
    raise SmearnetError(
        f"Manifest {csv_path} has {len(bad)} row(s) with an unknown cohort ({shown}{more}); "
        f"allowed values: {', '.join(COHORTS)}.",
        f"set the cohort column to {' or '.join(COHORTS)} (or leave it empty for {DEFAULT_COHORT}).",
    )


def _resolve(csv_folder: str, written_path: str) -> str:
    """Absolute, normalised path; relative paths resolve against the CSV's folder (backslashes read as '/').

    Symlinks are deliberately not resolved, so a symlink loop is reported per
    row by ingest instead of failing here.
    """
    expanded = os.path.expanduser(with_forward_slashes(written_path))
    return os.path.normpath(os.path.join(csv_folder, expanded))
