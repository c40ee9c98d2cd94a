"""validate_manifest / load_rgb / write_ingest_outputs against the generated bad-input corpus.

Every ingest run goes through ``_run``, which also proves the input folder is
byte-for-byte unchanged afterwards (no file modified, created or deleted).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bad_inputs as corpus
import numpy as np
import pandas as pd
import pytest
from PIL import EpsImagePlugin, GifImagePlugin, Image, ImageFile

from smearnet.errors import SmearnetError
from smearnet.data.decode import decode_image_bytes, load_rgb
from smearnet.data.ingest import validate_manifest
from smearnet.data.ingest_report import IngestResult, render_report_markdown, write_ingest_outputs
from smearnet.io import read_table
from smearnet.data.manifest import read_manifest

CLASSES = corpus.CLASSES
QUIET: dict[str, Any] = {"workers": 1, "progress": False}


def _run(
    data: Path, rows: list[dict[str, str]], columns: tuple[str, ...] = ("path", "label", "patient_id"), **options: Any
) -> IngestResult:
    """Write data/manifest.csv, ingest it, and assert that nothing under ``data`` changed."""
    csv_path = corpus.write_manifest(data / "manifest.csv", rows, columns)
    before = corpus.snapshot(data)
    try:
        return validate_manifest(read_manifest(csv_path), CLASSES, **{**QUIET, **options})
    finally:
        assert corpus.snapshot(data) == before


def _run_error(data: Path, rows: list[dict[str, str]], **options: Any) -> str:
    """Like _run but expects one SmearnetError; returns its single-paragraph message."""
    with pytest.raises(SmearnetError) as caught:
        _run(data, rows, **options)
    message = str(caught.value)
    assert "\n" not in message and "Fix:" in message
    return message


def _good_row(data: Path) -> dict[str, str]:
    corpus.make_rgb_jpeg(data, "good.jpg", seed=1)
    return {"path": "good.jpg", "label": "normal", "patient_id": "patient-good"}


def _reason(result: IngestResult, row: int) -> str:
    return str(result.quarantined.set_index("row").at[row, "reason"])


# --------------------------------------------------------------------------- one bad row, both policies


@dataclass(frozen=True)
class BadCase:
    make: Callable[[Path], Path | str]
    check: str
    reason: str  # the exact reason, or its stable prefix when it ends with decoder details
    label: str = "normal"
    patient_id: str = "patient-bad"
    options: Mapping[str, Any] = field(default_factory=dict)


def _made(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


BAD_CASES: dict[str, BadCase] = {
    "zero_byte": BadCase(corpus.make_zero_byte, "zero_byte", "zero-byte file"),
    "truncated_jpeg": BadCase(
        corpus.make_truncated_jpeg, "corrupt", "truncated or corrupt image (OSError: image file is truncated"
    ),
    "text_named_jpg": BadCase(
        corpus.make_text_as_jpg, "not_image", "not an image (not a JPEG, PNG, BMP or TIFF file)"
    ),
    "directory": BadCase(corpus.make_directory, "is_directory", "path is a directory"),
    "symlink_loop": BadCase(corpus.make_symlink_loop, "symlink_loop", "symlink loop"),
    "missing_file": BadCase(corpus.make_missing, "file_missing", "file missing"),
    "too_small_10x10": BadCase(
        corpus.make_tiny, "too_small", "too small (10x10 px; both sides must be at least 64 px)"
    ),
    "too_large_3000x3000": BadCase(
        corpus.make_large,
        "too_large",
        "too large (3000x3000 = 9,000,000 px > max_pixels 1,000,000)",
        options={"max_pixels": 1_000_000},
    ),
    "bomb_header_400mpx": BadCase(corpus.make_bomb_png, "too_large", "too large (more than max_pixels 40,000,000 px)"),
    "bomb_header_100mpx": BadCase(
        lambda folder: corpus.make_bomb_png(folder, 10_000, 10_000),
        "too_large",
        "too large (more than max_pixels 40,000,000 px)",
    ),
    "huge_file": BadCase(
        corpus.make_huge_file,
        "too_large",
        "too large (file is 17.0 MiB, more than an image of max_pixels 10,000 can be)",
        options={"max_pixels": 10_000},
    ),
    "unknown_label": BadCase(
        lambda folder: corpus.make_rgb_jpeg(folder, "cell.jpg", seed=5),
        "unknown_label",
        "label 'eosinophil' not in classes (allowed: covid_rl, normal)",
        label="eosinophil",
    ),
    "empty_patient_id": BadCase(
        lambda folder: corpus.make_rgb_jpeg(folder, "cell.jpg", seed=5),
        "empty_patient_id",
        "empty patient_id",
        patient_id="  ",
    ),
    # R writes a missing id as NA, pandas' astype(str) as nan: such rows must not pool into one "patient".
    **{f"placeholder_patient_id_{written}": BadCase(
        lambda folder: corpus.make_rgb_jpeg(folder, "cell.jpg", seed=5), "empty_patient_id",
        "patient_id is a missing-value placeholder", patient_id=written) for written in ("NA", "nan", " #N/A ")},
    "patient_folder_in_path": BadCase(  # an error message names the file, not the folders (they may name people)
        lambda folder: corpus.make_zero_byte(_made(folder / "Doe_Jane_MRN123")), "zero_byte", "zero-byte file"),
    "empty_path": BadCase(lambda folder: "", "empty_path", "empty path"),
    # Only JPEG, PNG, BMP and TIFF reach a parser; other formats are named from their signature.
    "gif": BadCase(corpus.make_gif, "format_not_allowed", "format not allowed (GIF; allowed: JPEG, PNG, BMP, TIFF)"),
    "pdf_named_jpg": BadCase(
        corpus.make_pdf_as_jpg, "format_not_allowed", "format not allowed (PDF; allowed: JPEG, PNG, BMP, TIFF)"
    ),
    "eps_named_jpg": BadCase(
        corpus.make_eps, "format_not_allowed", "format not allowed (PostScript/EPS; allowed: JPEG, PNG, BMP, TIFF)"
    ),
    "ppm": BadCase(corpus.make_ppm, "format_not_allowed",
                   "format not allowed (Netpbm PBM/PGM/PPM; allowed: JPEG, PNG, BMP, TIFF)"),
    "dicom_named_jpg": BadCase(
        corpus.make_dicom_as_jpg, "format_not_allowed", "format not allowed (DICOM; allowed: JPEG, PNG, BMP, TIFF)"
    ),
    # More than one picture in a file: never silently reduced to the first frame.
    "animated_png": BadCase(
        corpus.make_apng, "multi_frame",
        "more than one picture in the file (2 frames of PNG; smearnet reads one picture per file)",
    ),
    "multipage_tiff": BadCase(
        corpus.make_multipage_tiff, "multi_frame",
        "more than one picture in the file (2 frames of TIFF; smearnet reads one picture per file)",
    ),
    "multi_picture_jpeg": BadCase(
        corpus.make_mpo, "multi_frame",
        "more than one picture in the file (2 frames of MPO; smearnet reads one picture per file)",
    ),
    "one_pixel_high": BadCase(
        corpus.make_one_pixel_high, "too_small", "too small (96x1 px; both sides must be at least 64 px)"
    ),
    "zero_by_zero_bmp": BadCase(
        corpus.make_zero_width_bmp, "corrupt", "truncated or corrupt image (a BMP file whose header cannot be read)"
    ),
}


def _bad_case_rows(data: Path, case: BadCase) -> tuple[list[dict[str, str]], str]:
    data.mkdir(parents=True, exist_ok=True)
    good = _good_row(data)
    made = case.make(data)
    written = os.path.relpath(made, data) if made else ""
    return [good, {"path": written, "label": case.label, "patient_id": case.patient_id}], written


@pytest.mark.parametrize("name", list(BAD_CASES))
def test_bad_row_is_quarantined(tmp_path: Path, name: str) -> None:
    case = BAD_CASES[name]
    rows, written = _bad_case_rows(tmp_path / "data", case)

    result = _run(tmp_path / "data", rows, on_bad_row="quarantine", **case.options)

    assert result.accepted["row"].tolist() == [2]
    assert result.quarantined["row"].tolist() == [3]
    assert result.quarantined.at[0, "check"] == case.check
    assert str(result.quarantined.at[0, "reason"]).startswith(case.reason)
    assert result.report["per_reason"] == {case.check: 1}
    assert result.report["counts"] == {"rows": 2, "accepted": 1, "quarantined": 1}
    [listed] = result.report["quarantined_rows"]
    assert listed["row"] == 3 and listed["file"] == (os.path.basename(written) or "<empty path>")
    assert listed["reason"].startswith(case.reason)
    assert "patient-bad" not in json.dumps(result.report)


@pytest.mark.parametrize("name", list(BAD_CASES))
def test_bad_row_raises_under_error_policy(tmp_path: Path, name: str) -> None:
    case = BAD_CASES[name]
    rows, written = _bad_case_rows(tmp_path / "data", case)

    message = _run_error(tmp_path / "data", rows, on_bad_row="error", **case.options)

    assert f"1 bad row(s) out of 2 in manifest {tmp_path / 'data' / 'manifest.csv'}" in message
    assert f"row 3 ({os.path.basename(written) or '<empty path>'}): {case.reason}" in message  # the file name
    assert "ingest.on_bad_row=quarantine" in message
    assert "patient-bad" not in message
    assert not os.path.dirname(written) or os.path.dirname(written) not in message


# --------------------------------------------------------------------------- unreadable files (we run as root)


def test_permission_denied_on_open_is_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    data.mkdir()
    good = _good_row(data)
    locked = corpus.make_rgb_jpeg(data, "locked.jpg", seed=2)
    real_open = os.open

    def open_denying_locked(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_denying_locked)
    row = {"path": "locked.jpg", "label": "normal", "patient_id": "p2"}

    result = _run(data, [good, row], on_bad_row="quarantine")
    assert result.quarantined.at[0, "check"] == "unreadable"
    assert _reason(result, 3) == "unreadable (permission denied)"

    message = _run_error(data, [good, row])
    assert "row 3 (locked.jpg): unreadable (permission denied)" in message


@pytest.mark.skipif(
    not corpus.permissions_are_enforced(), reason="root reads chmod 000 files; see the monkeypatched test"
)
def test_chmod_000_is_unreadable(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    good = _good_row(data)
    locked = corpus.make_unreadable(data)
    try:
        result = _run(
            data, [good, {"path": locked.name, "label": "normal", "patient_id": "p2"}], on_bad_row="quarantine"
        )
        assert _reason(result, 3) == "unreadable (permission denied)"
    finally:
        locked.chmod(0o644)


def test_missing_file_hints_at_case_mismatch(tmp_path: Path) -> None:
    data = tmp_path / "data"
    corpus.make_rgb_jpeg(data, "Cell_01.JPG")
    result = _run(data, [{"path": "cell_01.jpg", "label": "normal", "patient_id": "p1"}], on_bad_row="quarantine")
    assert _reason(result, 2).startswith("file missing (but 'Cell_01.JPG' exists in the same folder")


# --------------------------------------------------------------------------- accepted conversions


def _rgb(image: Image.Image, x: int, y: int) -> tuple[int, int, int]:
    red, green, blue = image.getpixel((x, y))  # type: ignore[misc]
    return int(red), int(green), int(blue)


def _accept_one(data: Path, path: Path, label: str = "normal", **options: Any) -> tuple[pd.Series, Image.Image]:
    """Ingest a single image that must be accepted; return its accepted row and load_rgb output."""
    result = _run(data, [{"path": os.path.relpath(path, data), "label": label, "patient_id": "p1"}], **options)
    assert result.quarantined.empty, result.quarantined.to_dict("records")
    accepted = result.accepted.iloc[0]
    image = load_rgb(Path(accepted["path"]))
    assert image.mode == "RGB" and image.size == (accepted["width"], accepted["height"])
    return accepted, image


def test_png_with_alpha_is_composited_on_white(tmp_path: Path) -> None:
    accepted, image = _accept_one(tmp_path / "data", corpus.make_png_with_alpha(_mkdir(tmp_path / "data")))
    assert accepted["mode"] == "RGBA"
    assert _rgb(image, 10, 40) == (255, 255, 255)
    assert _rgb(image, 80, 40) == (10, 20, 30)


def test_palette_with_transparency_is_composited_on_white(tmp_path: Path) -> None:
    accepted, image = _accept_one(tmp_path / "data", corpus.make_palette_with_transparency(_mkdir(tmp_path / "data")))
    assert accepted["mode"] == "P"
    assert _rgb(image, 10, 40) == (255, 255, 255)
    assert _rgb(image, 80, 40) == (255, 0, 0)


def test_16bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    accepted, image = _accept_one(tmp_path / "data", corpus.make_16bit_png(_mkdir(tmp_path / "data")))
    assert accepted["mode"] == "I;16"
    assert [_rgb(image, x, 40) for x in (10, 40, 80)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


@pytest.mark.parametrize("dtype, name", [(np.uint16, "twelve_bit.png"), (np.int32, "twelve_bit.tif")])  # I;16, I
def test_a_16bit_image_using_12_bits_is_accepted_with_a_note_saying_it_reads_dark(tmp_path: Path, dtype,
                                                                                  name: str) -> None:
    data = _mkdir(tmp_path / "data")
    pixels = np.zeros((80, 96), dtype=dtype)
    pixels[:, 48:] = 4000  # a 12-bit camera's bright half
    Image.fromarray(pixels).save(data / name)
    result = _run(data, [{"path": name, "label": "normal", "patient_id": "p1"}])
    assert len(result.accepted) == 1 and load_rgb(Path(result.accepted.at[0, "path"])).getpixel((60, 40))[0] == 16
    [noted] = result.report["accepted_with_notes"]
    assert noted["note"].startswith("16-bit image whose brightest pixel is 4000 of 65535")


@pytest.mark.parametrize("bright, dark", [(4000, True), (60000, False)])
@pytest.mark.parametrize("make, name, kind", [(corpus.make_16bit_rgb_tiff, "rgb16.tif", "TIFF"),
                                              (corpus.make_16bit_rgb_png, "rgb16.png", "PNG")])
def test_a_16bit_colour_image_is_accepted_with_a_note_that_pillow_read_it_as_8_bits(
        tmp_path: Path, make: Callable[..., Path], name: str, kind: str, bright: int, dark: bool) -> None:
    # Pillow keeps each sample's high byte: a 12-bit camera's 4000 becomes 15 of 255, an almost black cell.
    data = _mkdir(tmp_path / "data")
    pixels = np.zeros((80, 96, 3), dtype=np.uint16)
    pixels[:, 48:] = bright
    make(data, pixels)
    result = _run(data, [{"path": name, "label": "normal", "patient_id": "p1"}])
    assert load_rgb(Path(result.accepted.at[0, "path"])).getpixel((60, 40)) == (bright >> 8,) * 3
    [noted] = result.report["accepted_with_notes"]
    assert noted["note"].startswith(f"16-bit RGB {kind}, read as 8 bits (Pillow keeps each sample's high byte): "
                                    f"brightest value {bright >> 8} of 255")
    assert ("dark" in noted["note"]) is dark


@pytest.mark.parametrize("name", ["rgb8.tif", "rgb8.png", "rgba8.png"])
def test_an_8bit_colour_image_has_no_bit_depth_note(tmp_path: Path, name: str) -> None:
    data = _mkdir(tmp_path / "data")
    pixels = np.zeros((80, 96, 4 if name.startswith("rgba") else 3), dtype=np.uint8)
    pixels[:, 48:, :3] = (200, 10, 10)  # two colours: a blank image has a note of its own
    pixels[..., 3:] = 255
    Image.fromarray(pixels).save(data / name)
    result = _run(data, [{"path": name, "label": "normal", "patient_id": "p1"}])
    assert len(result.accepted) == 1 and result.report["accepted_with_notes"] == []


def test_grayscale_becomes_rgb(tmp_path: Path) -> None:
    accepted, image = _accept_one(tmp_path / "data", corpus.make_grayscale(_mkdir(tmp_path / "data")))
    assert accepted["mode"] == "L" and _rgb(image, 5, 5) == (77, 77, 77)


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    accepted, image = _accept_one(tmp_path / "data", corpus.make_cmyk_jpeg(_mkdir(tmp_path / "data")))
    assert accepted["mode"] == "CMYK"
    red, green, blue = _rgb(image, 40, 40)
    assert red < 20 and green > 235 and blue > 235  # cyan


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    accepted, image = _accept_one(tmp_path / "data", corpus.make_exif_rotated(_mkdir(tmp_path / "data")))
    assert (accepted["width"], accepted["height"]) == (80, 120)  # stored 120x80, Orientation=6
    right_red, _, _ = _rgb(image, 76, 60)
    left_red, _, _ = _rgb(image, 3, 60)
    top_red, _, _ = _rgb(image, 40, 3)
    assert right_red > 200 and left_red < 50 and top_red < 50


def test_3000x3000_is_accepted_under_default_max_pixels(tmp_path: Path) -> None:
    accepted, _ = _accept_one(tmp_path / "data", corpus.make_large(_mkdir(tmp_path / "data")))
    assert (accepted["width"], accepted["height"]) == (3000, 3000)


def test_non_ascii_path_with_spaces_is_accepted(tmp_path: Path) -> None:
    path = corpus.make_non_ascii_name(_mkdir(tmp_path / "data"))
    accepted, _ = _accept_one(tmp_path / "data", path)
    assert accepted["source_path"] == "Blut ausstrich/Zelle ü ñ 01 – 血液.jpg"
    assert accepted["path"] == str(path)


def test_label_case_and_spaces_are_normalised_and_counted(tmp_path: Path) -> None:
    data = _mkdir(tmp_path / "data")
    corpus.make_rgb_jpeg(data, "a.jpg", seed=1)
    corpus.make_rgb_jpeg(data, "b.jpg", seed=2)
    rows = [
        {"path": "a.jpg", "label": " Covid_RL ", "patient_id": "p1"},
        {"path": "b.jpg", "label": "normal", "patient_id": "p2"},
    ]
    result = _run(data, rows)
    assert result.accepted["label"].tolist() == ["covid_rl", "normal"]
    assert result.accepted["label_raw"].tolist() == [" Covid_RL ", "normal"]
    assert result.report["labels_fixed"] == {
        "rows": 1,
        "mapping": [{"label_as_written": " Covid_RL ", "label": "covid_rl", "rows": 1}],
    }


def test_label_aliases(tmp_path: Path) -> None:
    data = _mkdir(tmp_path / "data")
    corpus.make_rgb_jpeg(data, "a.jpg")
    result = _run(
        data, [{"path": "a.jpg", "label": "Healthy", "patient_id": "p1"}], label_aliases={"healthy": "normal"}
    )
    assert result.accepted["label"].tolist() == ["normal"]
    message = _run_error(data, [{"path": "a.jpg", "label": "x", "patient_id": "p1"}], label_aliases={"x": "lymphocyte"})
    assert "ingest.label_aliases maps 'x' to 'lymphocyte'" in message


def test_modes_are_counted_in_report(tmp_path: Path) -> None:
    data = _mkdir(tmp_path / "data")
    files = [corpus.make_grayscale(data), corpus.make_cmyk_jpeg(data), corpus.make_rgb_jpeg(data, "rgb.jpg")]
    rows = [{"path": f.name, "label": "normal", "patient_id": f"p{i}"} for i, f in enumerate(files)]
    result = _run(data, rows)
    assert result.report["modes"] == {"CMYK": 1, "L": 1, "RGB": 1}
    assert result.report["converted_to_rgb"] == 2


# --------------------------------------------------------------------------- duplicates


def test_same_content_same_label_keeps_the_first(tmp_path: Path) -> None:
    data = _mkdir(tmp_path / "data")
    first = corpus.make_rgb_jpeg(data, "first.jpg")
    shutil.copyfile(first, data / "copy.jpg")
    rows = [
        {"path": "first.jpg", "label": "normal", "patient_id": "p1"},
        {"path": "copy.jpg", "label": "Normal", "patient_id": "p1"},
    ]
    result = _run(data, rows, duplicates="quarantine")
    assert result.accepted["row"].tolist() == [2]
    assert _reason(result, 3) == "duplicate of row 2"
    assert result.report["duplicates"]["duplicate_rows"] == 1

    message = _run_error(data, rows, on_bad_row="quarantine")  # duplicates defaults to "error"
    assert "row 3 (copy.jpg): duplicate of row 2" in message and "ingest.duplicates=quarantine" in message


def test_same_path_listed_twice_is_a_duplicate(tmp_path: Path) -> None:
    data = _mkdir(tmp_path / "data")
    corpus.make_rgb_jpeg(data, "a.jpg")
    row = {"path": "a.jpg", "label": "normal", "patient_id": "p1"}
    result = _run(data, [row, row], duplicates="quarantine")
    assert _reason(result, 3) == "duplicate of row 2"
    assert result.report["duplicates"]["same_path_rows"] == 1
    assert "row 3 (a.jpg): duplicate of row 2" in _run_error(data, [row, row], duplicates="error")


def test_same_image_under_two_labels_quarantines_all_involved_rows(tmp_path: Path) -> None:
    data = _mkdir(tmp_path / "data")
    original = corpus.make_rgb_jpeg(data, "a.jpg")
    shutil.copyfile(original, data / "b.jpg")
    corpus.make_rgb_jpeg(data, "other.jpg", seed=9)
    rows = [
        {"path": "a.jpg", "label": "covid_rl", "patient_id": "p1"},
        {"path": "other.jpg", "label": "normal", "patient_id": "p2"},
        {"path": "b.jpg", "label": "normal", "patient_id": "p1"},
    ]
    result = _run(data, rows, duplicates="quarantine")
    assert result.accepted["row"].tolist() == [3]
    expected = "same image under labels covid_rl and normal (rows 2, 4)"
    assert _reason(result, 2) == expected and _reason(result, 4) == expected
    assert result.report["duplicates"]["conflicting_label_groups"] == 1

    message = _run_error(data, rows)
    assert "2 bad row(s) out of 3" in message and expected in message


def test_duplicates_follow_their_own_policy(tmp_path: Path) -> None:
    data = _mkdir(tmp_path / "data")
    corpus.make_rgb_jpeg(data, "a.jpg")
    row = {"path": "a.jpg", "label": "normal", "patient_id": "p1"}
    result = _run(data, [row, row], on_bad_row="error", duplicates="quarantine")
    assert result.quarantined["check"].tolist() == ["duplicate"]


# --------------------------------------------------------------------------- policy and options


@pytest.mark.parametrize("key", ["on_bad_row", "duplicates"])
def test_unknown_policy_names_the_key_and_allowed_values(tmp_path: Path, key: str) -> None:
    data = _mkdir(tmp_path / "data")
    message = _run_error(data, [_good_row(data)], **{key: "skip"})
    assert f"ingest.{key} is 'skip'" in message and "allowed: error, quarantine" in message


@pytest.mark.parametrize("key", ["min_size", "max_pixels", "workers"])
def test_invalid_numbers_name_the_key(tmp_path: Path, key: str) -> None:
    data = _mkdir(tmp_path / "data")
    assert f"ingest.{key} is 0" in _run_error(data, [_good_row(data)], **{key: 0})


def test_error_lists_first_rows_and_total(tmp_path: Path) -> None:
    data = _mkdir(tmp_path / "data")
    rows = [{"path": f"missing_{i}.jpg", "label": "normal", "patient_id": f"patient-{i}"} for i in range(8)]
    message = _run_error(data, rows)
    assert "8 bad row(s) out of 8" in message and "(file_missing 8)" in message
    assert "row 2 (missing_0.jpg): file missing" in message and "row 6 (missing_4.jpg)" in message
    assert "missing_5.jpg" not in message and "and 3 more" in message
    assert "patient-" not in message


def test_patient_id_in_file_name_is_redacted(tmp_path: Path) -> None:
    data = _mkdir(tmp_path / "data")
    rows = [{"path": "PAT-0042_cell.jpg", "label": "normal", "patient_id": "PAT-0042"}]
    assert "PAT-0042" not in _run_error(data, rows)
    result = _run(data, rows, on_bad_row="quarantine")
    assert result.report["quarantined_rows"][0]["file"] == "<patient_id>_cell.jpg"


def test_dataframe_built_in_code_is_accepted(tmp_path: Path) -> None:
    data = _mkdir(tmp_path / "data")
    image = corpus.make_rgb_jpeg(data, "a.jpg")
    frame = pd.DataFrame([{"path": str(image), "label": "normal", "patient_id": "p1"}] * 2)
    result = validate_manifest(frame, CLASSES, duplicates="quarantine", **QUIET)
    assert result.accepted["row"].tolist() == [2] and _reason(result, 3) == "duplicate of row 2"
    assert result.accepted.at[0, "site"] == "default" and result.accepted.at[0, "smear_id"] == "p1"
    with pytest.raises(SmearnetError, match=r"lacks the required column\(s\) patient_id; columns found: 'path'"):
        validate_manifest(frame[["path", "label"]], CLASSES, **QUIET)


# --------------------------------------------------------------------------- input safety: formats, frames, paths


@pytest.mark.parametrize(("make", "reason"), [
    (corpus.make_gif, "format not allowed (GIF; allowed: JPEG, PNG, BMP, TIFF)"),
    (corpus.make_pdf_as_jpg, "format not allowed (PDF; allowed: JPEG, PNG, BMP, TIFF)"),
    (corpus.make_apng, "more than one picture in the file (2 frames of PNG"),
    (corpus.make_multipage_tiff, "more than one picture in the file (2 frames of TIFF"),
])
def test_predict_and_serving_refuse_what_ingest_refuses(tmp_path: Path, make: Callable[[Path], Path],
                                                        reason: str) -> None:
    """load_rgb (training, predict) and decode_image_bytes (serving) are the same decoder as ingest."""
    path = make(tmp_path)
    with pytest.raises(SmearnetError, match=rf"Cannot load image .*{re.escape(path.name)}: {re.escape(reason)}"):
        load_rgb(path)
    with pytest.raises(SmearnetError, match=rf"Cannot decode image: {re.escape(reason)}") as caught:
        decode_image_bytes(path.read_bytes())
    assert caught.value.fix == "send one picture as a JPEG, PNG, BMP or TIFF file."


def test_a_refused_format_never_reaches_its_parser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EPS goes to Ghostscript in Pillow; with the allowlist Pillow's EPS (and GIF) code is never called."""
    opened: list[str] = []
    for plugin, image_class in ((EpsImagePlugin, "EpsImageFile"), (GifImagePlugin, "GifImageFile")):
        monkeypatch.setattr(getattr(plugin, image_class), "_open", lambda self, name=image_class: opened.append(name))
    data = _mkdir(tmp_path / "data")
    rows = [{"path": corpus.make_eps(data).name, "label": "normal", "patient_id": "p1"},
            {"path": corpus.make_gif(data).name, "label": "normal", "patient_id": "p2"}]
    result = _run(data, rows, on_bad_row="quarantine")
    assert result.quarantined["check"].tolist() == ["format_not_allowed"] * 2 and opened == []


def _confinement_corpus(tmp_path: Path) -> tuple[Path, list[dict[str, str]]]:
    """A manifest folder with one good row and three rows that leave it (file names hold the patient ids)."""
    data = _mkdir(tmp_path / "site")
    elsewhere = _mkdir(tmp_path / "elsewhere")
    corpus.make_rgb_jpeg(elsewhere, "patient-31_cell.jpg", seed=31)
    corpus.make_rgb_jpeg(elsewhere, "patient-32_cell.jpg", seed=32)
    os.symlink(elsewhere / "patient-33_cell.jpg", data / "patient-33_cell.jpg")
    corpus.make_rgb_jpeg(elsewhere, "patient-33_cell.jpg", seed=33)
    return data, [
        _good_row(data),
        {"path": str(elsewhere / "patient-31_cell.jpg"), "label": "normal", "patient_id": "patient-31"},
        {"path": "../elsewhere/patient-32_cell.jpg", "label": "normal", "patient_id": "patient-32"},
        {"path": "patient-33_cell.jpg", "label": "normal", "patient_id": "patient-33"},
    ]


def test_confine_refuses_absolute_dotdot_and_symlinked_paths_row_by_row(tmp_path: Path) -> None:
    data, rows = _confinement_corpus(tmp_path)
    assert len(_run(data, rows).accepted) == 4  # not confined: the files are read where they are

    result = _run(data, rows, on_bad_row="quarantine", confine=True)
    assert result.accepted["row"].tolist() == [2]
    assert result.quarantined["check"].tolist() == ["absolute_path", "outside_folder", "outside_folder"]
    assert _reason(result, 3) == "absolute path (paths must be relative to the manifest's folder)"
    assert _reason(result, 4) == "path leaves the manifest's folder through '..'"
    assert _reason(result, 5) == "path leads outside the manifest's folder through a symlink"
    assert result.quarantined["sha256"].isna().all()  # never opened
    assert result.report["policy"]["confine"] is True
    report_text = json.dumps(result.report)
    assert all(f"patient-3{n}" not in report_text for n in (1, 2, 3))
    assert [row["file"] for row in result.report["quarantined_rows"]] == ["<patient_id>_cell.jpg"] * 3

    message = _run_error(data, rows, confine=True)
    assert "3 bad row(s) out of 4" in message and "(absolute_path 1, outside_folder 2)" in message
    assert "row 3 (" in message and "row 4 (" in message and "row 5 (" in message
    assert "through a symlink" in message and all(f"patient-3{n}" not in message for n in (1, 2, 3))


def test_confine_keeps_symlinks_inside_the_folder(tmp_path: Path) -> None:
    data = _mkdir(tmp_path / "site")
    corpus.make_rgb_jpeg(_mkdir(data / "store"), "cell.jpg")
    os.symlink("store/cell.jpg", data / "linked.jpg")
    result = _run(data, [{"path": "linked.jpg", "label": "normal", "patient_id": "p1"}], confine=True)
    assert len(result.accepted) == 1


def test_confine_needs_rows_read_from_a_manifest(tmp_path: Path) -> None:
    frame = pd.DataFrame([{"path": str(corpus.make_rgb_jpeg(tmp_path)), "label": "normal", "patient_id": "p1"}])
    with pytest.raises(SmearnetError, match=r"no folder to confine them to"):
        validate_manifest(frame, CLASSES, confine=True, **QUIET)


def test_windows_manifest_crlf_and_backslashes_read_as_on_windows(tmp_path: Path) -> None:
    data = _mkdir(tmp_path / "data")
    corpus.make_rgb_jpeg(_mkdir(data / "images" / "smear 1"), "cell1.jpg", seed=1)
    corpus.make_rgb_jpeg(_mkdir(data / "images"), "cell2.jpg", seed=2)
    (data / "manifest.csv").write_bytes(
        "path,label,patient_id\r\nimages\\smear 1\\cell1.jpg,normal,p1\r\n.\\images\\cell2.jpg,covid_rl,p2\r\n"
        "C:\\export\\cell3.jpg,normal,p3\r\n".encode())
    before = corpus.snapshot(data)
    result = validate_manifest(read_manifest(data / "manifest.csv"), CLASSES, on_bad_row="quarantine",
                               confine=False, **QUIET)
    assert corpus.snapshot(data) == before
    assert result.accepted["path"].tolist() == [str(data / "images" / "smear 1" / "cell1.jpg"),
                                                str(data / "images" / "cell2.jpg")]
    assert result.accepted["source_path"].tolist() == ["images\\smear 1\\cell1.jpg", ".\\images\\cell2.jpg"]
    assert result.report["paths_fixed"] == {"backslash_separators": 2, "unicode_form": 0}
    assert _reason(result, 4).startswith("file missing (a Windows absolute path")
    assert result.report["quarantined_rows"][0]["file"] == "cell3.jpg"
    confined = validate_manifest(read_manifest(data / "manifest.csv"), CLASSES, on_bad_row="quarantine",
                                 confine=True, **QUIET)
    assert len(confined.accepted) == 2 and confined.quarantined["check"].tolist() == ["absolute_path"]


def test_file_name_in_the_other_unicode_form_is_found_and_noted(tmp_path: Path) -> None:
    data = _mkdir(tmp_path / "data")
    decomposed = unicodedata.normalize("NFD", "Zelle_ü.jpg")  # as macOS writes it
    corpus.make_rgb_jpeg(data, decomposed)
    result = _run(data, [{"path": unicodedata.normalize("NFC", "Zelle_ü.jpg"), "label": "normal", "patient_id": "p1"}])
    assert result.accepted["path"].tolist() == [str(data / decomposed)]
    assert result.report["paths_fixed"]["unicode_form"] == 1
    [noted] = result.report["accepted_with_notes"]
    assert noted["row"] == 2 and "another Unicode form" in noted["note"]


def test_odd_but_usable_images_are_accepted_with_a_note(tmp_path: Path) -> None:
    data = _mkdir(tmp_path / "data")
    made = [corpus.make_invalid_orientation(data), corpus.make_foreign_profile_jpeg(data), corpus.make_grayscale(data)]
    rows = [{"path": path.name, "label": "normal", "patient_id": f"p{index}"} for index, path in enumerate(made)]
    result = _run(data, rows)
    assert len(result.accepted) == 3
    assert (result.accepted.at[0, "width"], result.accepted.at[0, "height"]) == (120, 80)  # used as stored
    notes = {item["row"]: item["note"] for item in result.report["accepted_with_notes"]}
    assert notes[2] == "invalid EXIF orientation 9 ignored (valid: 1-8); image used as stored"
    assert notes[3] == "embedded colour profile 'Lab identity built-in' ignored; pixels read as sRGB"
    assert notes[4].startswith("blank image")
    markdown = render_report_markdown(result.report)
    assert "## Accepted with a note" in markdown and "| 2 | bad_orientation.jpg | invalid EXIF orientation 9" in markdown


def test_cielab_tiff_is_converted_by_colour_not_by_channel(tmp_path: Path) -> None:
    accepted, image = _accept_one(tmp_path / "data", corpus.make_lab_tiff(_mkdir(tmp_path / "data")))
    red, green, blue = _rgb(image, 10, 10)
    assert accepted["mode"] == "LAB" and red > 240 and green < 20 and blue < 20  # pure red, not (L, a, b)


def test_one_pixel_high_image_is_accepted_when_min_size_allows(tmp_path: Path) -> None:
    data = _mkdir(tmp_path / "data")
    result = _run(data, [{"path": corpus.make_one_pixel_high(data).name, "label": "normal", "patient_id": "p1"}],
                  min_size=1)
    assert (result.accepted.at[0, "width"], result.accepted.at[0, "height"]) == (96, 1)


# --------------------------------------------------------------------------- report content


def test_patient_in_two_sites_is_accepted_but_flagged(tmp_path: Path) -> None:
    data = _mkdir(tmp_path / "data")
    corpus.make_rgb_jpeg(data, "a.jpg", seed=1)
    corpus.make_rgb_jpeg(data, "b.jpg", seed=2)
    rows = [
        {"path": "a.jpg", "label": "normal", "patient_id": "patient-77", "site": "north"},
        {"path": "b.jpg", "label": "covid_rl", "patient_id": "patient-77", "site": "south"},
    ]
    result = _run(data, rows, columns=("path", "label", "patient_id", "site"))
    assert len(result.accepted) == 2
    assert result.report["patients_in_multiple_sites"] == 1
    assert result.report["per_site"] == {"north": 1, "south": 1}
    assert any("more than one site" in message for message in result.report["warnings"])
    assert "patient-77" not in json.dumps(result.report)


def test_patient_in_both_cohorts_is_flagged(tmp_path: Path) -> None:
    data = _mkdir(tmp_path / "data")
    corpus.make_rgb_jpeg(data, "a.jpg", seed=1)
    corpus.make_rgb_jpeg(data, "b.jpg", seed=2)
    rows = [
        {"path": "a.jpg", "label": "normal", "patient_id": "p1", "cohort": "development"},
        {"path": "b.jpg", "label": "normal", "patient_id": "p1", "cohort": "assessment"},
    ]
    result = _run(data, rows, columns=("path", "label", "patient_id", "cohort"))
    assert result.report["patients_in_multiple_cohorts"] == 1


def test_classes_without_images_are_listed(tmp_path: Path) -> None:
    data = _mkdir(tmp_path / "data")
    result = _run(data, [_good_row(data)])
    assert result.report["per_class"] == {"covid_rl": 0, "normal": 1}
    assert result.report["empty_classes"] == ["covid_rl"]


# --------------------------------------------------------------------------- the whole corpus at once


def _whole_corpus(data: Path) -> list[dict[str, str]]:
    rows = []
    for index, (name, case) in enumerate(BAD_CASES.items()):
        if case.options:
            continue
        folder = _mkdir(data / name)
        made = case.make(folder)
        written = os.path.relpath(made, data) if made else ""
        rows.append({"path": written, "label": case.label, "patient_id": case.patient_id or f"p{index}"})
    for index, make in enumerate(
        [
            corpus.make_png_with_alpha,
            corpus.make_16bit_png,
            corpus.make_grayscale,
            corpus.make_cmyk_jpeg,
            corpus.make_exif_rotated,
            corpus.make_non_ascii_name,
            corpus.make_large,
            corpus.make_invalid_orientation,
            corpus.make_lab_tiff,
            corpus.make_foreign_profile_jpeg,
        ]
    ):
        made = make(_mkdir(data / f"good_{index}"))
        rows.append({"path": os.path.relpath(made, data), "label": "covid_rl", "patient_id": f"good-{index}"})
    return rows


def test_process_pool_gives_the_same_result_as_in_process(tmp_path: Path) -> None:
    data = _mkdir(tmp_path / "data")
    rows = _whole_corpus(data)
    serial = _run(data, rows, on_bad_row="quarantine", workers=1)
    pooled = _run(data, rows, on_bad_row="quarantine", workers=2)
    pd.testing.assert_frame_equal(serial.accepted, pooled.accepted)
    pd.testing.assert_frame_equal(serial.quarantined, pooled.quarantined)
    assert serial.report == pooled.report
    assert len(serial.accepted) == 10 and len(serial.quarantined) == len(rows) - 10
    assert len(serial.report["accepted_with_notes"]) == 6  # orientation, profile, 4 blank (flat) images
    assert serial.quarantined["row"].is_monotonic_increasing
    assert Image.MAX_IMAGE_PIXELS == 89_478_485 and not ImageFile.LOAD_TRUNCATED_IMAGES  # globals restored


# --------------------------------------------------------------------------- load_rgb


def test_load_rgb_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(SmearnetError, match=r"Cannot load image .*nothing\.jpg: file missing\. Fix: re-run the ingest"):
        load_rgb(tmp_path / "nothing.jpg")
    truncated = corpus.make_truncated_jpeg(tmp_path)
    with pytest.raises(SmearnetError, match=r"truncated\.jpg: truncated or corrupt image"):
        load_rgb(truncated)


def test_load_rgb_refuses_load_truncated_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(SmearnetError, match=r"LOAD_TRUNCATED_IMAGES is True"):
        load_rgb(corpus.make_rgb_jpeg(tmp_path))


def test_load_rgb_respects_max_pixels(tmp_path: Path) -> None:
    path = corpus.make_rgb_jpeg(tmp_path, size=(100, 100))
    assert load_rgb(path, max_pixels=10_000).size == (100, 100)
    with pytest.raises(SmearnetError, match=r"too large \(100x100 = 10,000 px > max_pixels 9,999\)"):
        load_rgb(path, max_pixels=9_999)


# --------------------------------------------------------------------------- write_ingest_outputs


def test_write_ingest_outputs_writes_four_files_without_patient_ids(tmp_path: Path) -> None:
    data = _mkdir(tmp_path / "data")
    rows = _whole_corpus(data)
    result = _run(data, rows, on_bad_row="quarantine")
    out = tmp_path / "out"
    before = corpus.snapshot(data)

    write_ingest_outputs(result, out)
    write_ingest_outputs(result, out)  # re-running replaces the outputs

    assert corpus.snapshot(data) == before
    assert sorted(os.listdir(out)) == ["manifest.csv", "quarantine.csv", "validation.json", "validation.md"]
    report_text = (out / "validation.json").read_text(encoding="utf-8")
    markdown = (out / "validation.md").read_text(encoding="utf-8")
    assert json.loads(report_text) == result.report
    assert "# Ingest validation report" in markdown and "| symlink_loop | 1 |" in markdown
    assert "symlink loop" in markdown and "loop_a.jpg" in markdown
    for patient_id in {row["patient_id"] for row in rows if len(row["patient_id"].strip()) >= 3}:
        assert patient_id not in report_text and patient_id not in markdown
    quarantine = pd.read_csv(out / "quarantine.csv", dtype=str, keep_default_na=False)
    assert quarantine["reason"].tolist() == result.quarantined["reason"].tolist()

    written_paths = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)["path"]
    assert not any(os.path.isabs(path) for path in written_paths)  # portable: relative to the output folder
    assert read_table(out / "manifest.csv")["path"].tolist() == result.accepted["path"].tolist()
    reread = read_manifest(out / "manifest.csv")  # the accepted manifest is itself a valid manifest
    assert reread["path"].tolist() == result.accepted["path"].tolist()
    again = validate_manifest(reread, CLASSES, **QUIET)
    assert again.accepted["sha256"].tolist() == result.accepted["sha256"].tolist()


def test_write_ingest_outputs_refuses_to_overwrite_the_input_manifest(tmp_path: Path) -> None:
    data = _mkdir(tmp_path / "data")
    result = _run(data, [_good_row(data)])
    before = corpus.snapshot(data)
    with pytest.raises(SmearnetError, match=r"would overwrite the input file .*manifest\.csv"):
        write_ingest_outputs(result, data)
    assert corpus.snapshot(data) == before


def test_write_ingest_outputs_leaves_no_temporary_files_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _mkdir(tmp_path / "data")
    result = _run(data, [_good_row(data)])
    out = _mkdir(tmp_path / "out")

    def failing_replace(source: str, target: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(SmearnetError, match=r"Cannot write the ingest outputs .*No space left on device"):
        write_ingest_outputs(result, out)
    assert os.listdir(out) == []


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------- smears are one patient's


def test_a_smear_id_written_for_several_patients_is_read_per_patient(tmp_path: Path) -> None:
    # Smears numbered per patient (1, 2, ...): grouped by smear_id alone, patient-a's and patient-b's smear "1"
    # would be one smear, called positive when either is.
    data = _mkdir(tmp_path / "data")
    rows = []
    for index, (patient, smear) in enumerate([("patient-a", "1"), ("patient-a", "1"), ("patient-b", "1"),
                                              ("patient-b", "2"), ("patient-c", "only-c")]):
        corpus.make_rgb_jpeg(data, f"cell{index}.jpg", seed=index)
        rows.append({"path": f"cell{index}.jpg", "label": "normal", "patient_id": patient, "smear_id": smear})
    result = _run(data, rows, columns=("path", "label", "patient_id", "smear_id"))
    assert result.accepted["smear_id"].tolist() == ["patient-a::1", "patient-a::1", "patient-b::1", "2", "only-c"]
    assert result.accepted.groupby("smear_id")["patient_id"].nunique().max() == 1
    assert result.report["smears_with_multiple_patients"] == 1
    assert any("read as a smear of their own" in w for w in result.report["warnings"])
    assert "patient-a" not in json.dumps(result.report)


def _a_good_cell_and_a_missing_one(tmp_path: Path, missing_patient: str) -> IngestResult:
    """patient-a's readable cell of smear "1", and a row of `missing_patient` in the same smear whose file does
    not exist, ingested under on_bad_row=quarantine."""
    data = _mkdir(tmp_path / "data")
    corpus.make_rgb_jpeg(data, "cell.jpg", seed=1)
    rows = [{"path": "cell.jpg", "label": "normal", "patient_id": "patient-a", "smear_id": "1"},
            {"path": "missing.jpg", "label": "normal", "patient_id": missing_patient, "smear_id": "1"}]
    return _run(data, rows, columns=("path", "label", "patient_id", "smear_id"), on_bad_row="quarantine")


def test_a_rejected_row_does_not_rename_another_patients_smear(tmp_path: Path) -> None:
    # The stray row (no such file) shares smear "1" with patient-a's good cell: only kept rows are judged.
    result = _a_good_cell_and_a_missing_one(tmp_path, "patient-b")
    assert result.accepted["smear_id"].tolist() == ["1"] and result.report["smears_with_multiple_patients"] == 0


def test_a_smear_whose_every_row_is_quarantined_is_counted_not_lost_silently(tmp_path: Path) -> None:
    # patient-b's only smear and patient-a's smear "2" have no readable cell; patient-a's smear "1" keeps one.
    data = _mkdir(tmp_path / "data")
    corpus.make_rgb_jpeg(data, "cell.jpg", seed=1)
    rows = [{"path": "cell.jpg", "label": "normal", "patient_id": "patient-a", "smear_id": "1", "cohort": ""},
            {"path": "gone1.jpg", "label": "normal", "patient_id": "patient-a", "smear_id": "1", "cohort": ""},
            {"path": "gone2.jpg", "label": "normal", "patient_id": "patient-a", "smear_id": "2", "cohort": ""},
            {"path": "gone3.jpg", "label": "normal", "patient_id": "patient-b", "smear_id": "1",
             "cohort": "assessment"},
            {"path": "gone4.jpg", "label": "normal", "patient_id": "NA", "smear_id": "9", "cohort": ""}]
    result = _run(data, rows, columns=("path", "label", "patient_id", "smear_id", "cohort"), on_bad_row="quarantine")
    assert result.report["lost_to_quarantine"] == {"smears_by_cohort": {"assessment": 1, "development": 1},
                                                   "patients": 1}
    assert any("2 smear id(s) (assessment 1, development 1) and 1 patient id(s) had every row quarantined" in w
               for w in result.report["warnings"])
    assert "patient-b" not in json.dumps(result.report)


def test_nothing_is_counted_lost_when_every_smear_keeps_a_cell(tmp_path: Path) -> None:
    result = _a_good_cell_and_a_missing_one(tmp_path, "patient-a")
    assert result.report["lost_to_quarantine"] == {"smears_by_cohort": {}, "patients": 0}
    assert not any("every row quarantined" in w for w in result.report["warnings"])
