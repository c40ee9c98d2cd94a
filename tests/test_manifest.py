"""read_manifest: the dataset contract (columns, defaults, row numbers, path resolution, errors)."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest
from bad_inputs import permissions_are_enforced, snapshot, write_manifest
from omegaconf import OmegaConf

from smearnet.errors import SmearnetError
from smearnet.data.manifest import OPTIONAL_COLUMNS, REQUIRED_COLUMNS, read_configured_manifest, read_manifest


def _error(csv_path: Path) -> str:
    """read_manifest's error message for ``csv_path``; asserts it is one paragraph with a fix."""
    before = snapshot(csv_path.parent)
    with pytest.raises(SmearnetError) as caught:
        read_manifest(csv_path)
    assert snapshot(csv_path.parent) == before
    message = str(caught.value)
    assert "\n" not in message and "Fix:" in message and caught.value.fix
    return message


def test_contract_constants() -> None:
    assert REQUIRED_COLUMNS == ("path", "label", "patient_id")
    assert OPTIONAL_COLUMNS == ("smear_id", "site", "cohort")


def test_minimal_manifest_gets_defaults_rows_and_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    csv_path = write_manifest(
        data / "manifest.csv",
        [
            {"path": "img/a.jpg", "label": "normal", "patient_id": "007"},
            {"path": "/abs/b.jpg", "label": " Covid_RL ", "patient_id": "NA"},
        ],
    )
    before = snapshot(data)
    monkeypatch.chdir(tmp_path)  # relative paths must resolve against the CSV folder, not the cwd

    manifest = read_manifest(Path("data/manifest.csv"))

    assert snapshot(data) == before
    assert manifest["row"].tolist() == [2, 3]
    assert manifest["source_path"].tolist() == ["img/a.jpg", "/abs/b.jpg"]
    assert manifest["path"].tolist() == [str(data / "img" / "a.jpg"), "/abs/b.jpg"]
    assert manifest["patient_id"].tolist() == ["007", "NA"]  # strings, no NA conversion
    assert manifest["label"].tolist() == ["normal", " Covid_RL "]  # normalised later, by ingest
    assert manifest["smear_id"].tolist() == ["007", "NA"]
    assert manifest["site"].tolist() == ["default", "default"]
    assert manifest["cohort"].tolist() == ["development", "development"]
    assert manifest.attrs["manifest_path"] == str(csv_path)


def test_optional_columns_are_kept_and_empty_cells_defaulted(tmp_path: Path) -> None:
    csv_path = write_manifest(
        tmp_path / "m.csv",
        [
            {
                "path": "a.jpg",
                "label": "normal",
                "patient_id": "p1",
                "smear_id": "s9",
                "site": "north",
                "cohort": "Assessment",
            },
            {"path": "b.jpg", "label": "normal", "patient_id": "p2", "smear_id": "", "site": "", "cohort": ""},
        ],
        columns=("path", "label", "patient_id", "smear_id", "site", "cohort", "scanner"),
    )
    manifest = read_manifest(csv_path)
    assert manifest["smear_id"].tolist() == ["s9", "p2"]
    assert manifest["site"].tolist() == ["north", "default"]
    assert manifest["cohort"].tolist() == ["assessment", "development"]
    assert "scanner" in manifest.columns  # unknown columns pass through


def test_header_whitespace_bom_blank_lines_quotes_and_trailing_comma(tmp_path: Path) -> None:
    csv_path = tmp_path / "m.csv"
    csv_path.write_text(
        '\ufeff path , label ,patient_id,\na.jpg,normal,p1,\n\n"my, file.jpg",normal, p2 ,\n',
        encoding="utf-8",
    )
    manifest = read_manifest(csv_path)
    assert list(manifest.columns[:3]) == ["path", "label", "patient_id"]
    assert manifest["row"].tolist() == [2, 4]  # line numbers, blank line 3 skipped
    assert manifest["source_path"].tolist() == ["a.jpg", "my, file.jpg"]
    assert manifest["patient_id"].tolist() == ["p1", "p2"]


def test_windows_export_crlf_sep_line_and_backslash_paths(tmp_path: Path) -> None:
    """Excel / hospital exports on Windows: CRLF line ends, a leading `sep=,` hint line, `images\\x.jpg` paths."""
    csv_path = tmp_path / "m.csv"
    csv_path.write_bytes(b"\xef\xbb\xbfsep=,\r\npath,label,patient_id\r\nimages\\a.jpg,normal,p1\r\n"
                         b"/abs/b\\c.jpg,normal,p2\r\n")
    manifest = read_manifest(csv_path)
    assert manifest["row"].tolist() == [3, 4]  # CSV line numbers: the sep line is line 1
    assert manifest["source_path"].tolist() == ["images\\a.jpg", "/abs/b\\c.jpg"]
    assert manifest["path"].tolist() == [str(tmp_path / "images" / "a.jpg"), "/abs/b\\c.jpg"]  # absolute: as written
    assert manifest["manifest_folder"].tolist() == [str(tmp_path)] * 2


def test_identifiers_typed_in_either_unicode_form_are_one_patient(tmp_path: Path) -> None:
    composed, decomposed = (unicodedata.normalize(form, "Müller-01") for form in ("NFC", "NFD"))
    csv_path = write_manifest(tmp_path / "m.csv", [
        {"path": "a.jpg", "label": "normal", "patient_id": composed, "site": "Zürich"},
        {"path": "b.jpg", "label": "normal", "patient_id": decomposed, "site": unicodedata.normalize("NFD", "Zürich")},
    ], columns=("path", "label", "patient_id", "site"))
    manifest = read_manifest(csv_path)
    assert manifest["patient_id"].nunique() == 1 and manifest["smear_id"].nunique() == 1
    assert manifest["site"].tolist() == [unicodedata.normalize("NFC", "Zürich")] * 2


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SmearnetError, match=r"does not exist") as caught:
        read_manifest(tmp_path / "nope.csv")
    assert "nope.csv" in str(caught.value)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(SmearnetError, match=r"is a directory"):
        read_manifest(tmp_path)


def test_zero_byte_manifest(tmp_path: Path) -> None:
    csv_path = tmp_path / "empty.csv"
    csv_path.write_bytes(b"")
    message = _error(csv_path)
    assert "empty.csv" in message and "empty (0 bytes)" in message and "path,label,patient_id" in message


def test_header_only_manifest(tmp_path: Path) -> None:
    csv_path = write_manifest(tmp_path / "header_only.csv", [])
    message = _error(csv_path)
    assert "header_only.csv" in message and "no data rows" in message


def test_blank_lines_only_manifest(tmp_path: Path) -> None:
    csv_path = tmp_path / "blank.csv"
    csv_path.write_text("\n\n  \n", encoding="utf-8")
    assert "only blank lines" in _error(csv_path)


def test_missing_column_names_missing_and_found(tmp_path: Path) -> None:
    csv_path = write_manifest(tmp_path / "m.csv", [{"path": "a.jpg", "label": "normal"}], columns=("path", "label"))
    message = _error(csv_path)
    assert "m.csv" in message
    assert "missing the required column(s) patient_id" in message
    assert "columns found: 'path', 'label'" in message


def test_column_names_are_matched_ignoring_case_spaces_and_separators(tmp_path: Path) -> None:
    # An optional column left unread is silent: `Cohort` unread would train on every assessment patient.
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("Path, Label ,Patient ID,Smear-ID,SITE,Cohort,notes\n"
                        "a.jpg,normal,p1,s1,h1,Assessment,x\n", encoding="utf-8")
    manifest = read_manifest(csv_path)
    assert list(manifest.columns[:7]) == ["path", "label", "patient_id", "smear_id", "site", "cohort", "notes"]
    assert manifest.loc[0, "cohort"] == "assessment" and manifest.loc[0, "smear_id"] == "s1"
    assert manifest.loc[0, "site"] == "h1" and manifest.loc[0, "patient_id"] == "p1"


def test_two_spellings_of_one_column_are_refused(tmp_path: Path) -> None:
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("path,label,patient_id,cohort,Cohort\na.jpg,normal,p1,development,assessment\n",
                        encoding="utf-8")
    message = _error(csv_path)
    assert "column(s) cohort more than once" in message and "'cohort', 'Cohort'" in message


@pytest.mark.parametrize("reserved", ["part", "cell_index", "smear_key"])
def test_columns_smearnet_adds_itself_are_refused(tmp_path: Path, reserved: str) -> None:
    csv_path = tmp_path / "m.csv"
    csv_path.write_text(f"path,label,patient_id,{reserved}\na.jpg,normal,p1,0\n", encoding="utf-8")
    assert "which smearnet adds to its smear tables itself" in _error(csv_path)


def test_semicolon_separated_hint(tmp_path: Path) -> None:
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("path;label;patient_id\na.jpg;normal;p1\n", encoding="utf-8")
    assert "semicolon" in _error(csv_path)


def test_duplicated_column(tmp_path: Path) -> None:
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("path,label,patient_id,label \na.jpg,normal,p1,x\n", encoding="utf-8")
    assert "column(s) label more than once" in _error(csv_path)


def test_wrong_number_of_fields_names_the_line(tmp_path: Path) -> None:
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("path,label,patient_id\na.jpg,normal,p1\nmy, file.jpg,normal,p2\n", encoding="utf-8")
    message = _error(csv_path)
    assert "line 3 has 4 fields but the header has 3" in message and "quote" in message


def test_not_utf8(tmp_path: Path) -> None:
    csv_path = tmp_path / "m.csv"
    csv_path.write_bytes("path,label,patient_id\nZelle_\u00fc.jpg,normal,p1\n".encode("cp1252"))
    assert "not valid UTF-8" in _error(csv_path)


def test_unknown_cohort_names_row_and_allowed_values(tmp_path: Path) -> None:
    csv_path = write_manifest(
        tmp_path / "m.csv",
        [
            {"path": "a.jpg", "label": "normal", "patient_id": "p1", "cohort": "development"},
            {"path": "b.jpg", "label": "normal", "patient_id": "secret-patient", "cohort": "assesment"},
        ],
        columns=("path", "label", "patient_id", "cohort"),
    )
    message = _error(csv_path)
    assert "row 3: 'assesment'" in message and "allowed values: development, assessment" in message
    assert "secret-patient" not in message


@pytest.mark.skipif(not permissions_are_enforced(), reason="root can read a chmod 000 file")
def test_unreadable_manifest(tmp_path: Path) -> None:
    csv_path = write_manifest(tmp_path / "m.csv", [{"path": "a.jpg", "label": "normal", "patient_id": "p1"}])
    csv_path.chmod(0)
    try:
        assert "permission denied" in _error(csv_path)
    finally:
        csv_path.chmod(0o644)


def test_read_configured_manifest_reads_data_manifest(tmp_path: Path) -> None:
    csv_path = write_manifest(tmp_path / "m.csv", [{"path": "a.jpg", "label": "normal", "patient_id": "p1"}])
    data_config = OmegaConf.create({"source": "manifest", "manifest": str(csv_path), "classes": ["normal"]})
    assert read_configured_manifest(data_config)["row"].tolist() == [2]


@pytest.mark.parametrize("value", ["???", "", None])
def test_read_configured_manifest_requires_data_manifest(value: str | None) -> None:
    data_config = OmegaConf.create({"source": "manifest", "manifest": value})
    with pytest.raises(SmearnetError, match=r"data\.manifest is not set.*-S data\.manifest="):
        read_configured_manifest(data_config)


def test_read_configured_manifest_synthetic_not_generated(tmp_path: Path) -> None:
    data_config = {"source": "synthetic", "manifest": str(tmp_path / "synthetic" / "manifest.csv")}
    with pytest.raises(SmearnetError, match=r"does not exist yet.*generate stage"):
        read_configured_manifest(data_config)
