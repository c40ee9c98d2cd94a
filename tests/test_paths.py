"""The path rules of manifests (smearnet.data.paths): Windows separators, Windows absolute paths, confinement."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from smearnet.data.paths import confinement_problem, is_windows_absolute, with_forward_slashes


@pytest.mark.parametrize(("written", "read"), [
    ("images\\cell1.jpg", "images/cell1.jpg"),
    (".\\a\\b.png", "./a/b.png"),
    ("images/cell1.jpg", "images/cell1.jpg"),
    ("/data/odd\\name.jpg", "/data/odd\\name.jpg"),  # absolute POSIX: a backslash may be part of a name
    ("C:\\export\\cell.jpg", "C:\\export\\cell.jpg"),  # Windows absolute: reported, not guessed at
    ("\\\\server\\share\\cell.jpg", "\\\\server\\share\\cell.jpg"),
])
def test_backslash_is_a_separator_in_relative_paths_only(written: str, read: str) -> None:
    assert with_forward_slashes(written) == read


@pytest.mark.parametrize(("written", "windows_absolute"), [
    ("C:\\x.jpg", True), ("c:/x.jpg", True), ("\\\\srv\\x.jpg", True), ("\\x.jpg", True), ("x\\y.jpg", False),
    ("/x.jpg", False), ("C_x.jpg", False),
])
def test_windows_absolute_paths_are_recognised(written: str, windows_absolute: bool) -> None:
    assert is_windows_absolute(written) is windows_absolute


@pytest.mark.parametrize(("written", "check"), [
    ("a.jpg", None), ("sub/../a.jpg", None), ("sub\\a.jpg", None), ("", None),
    ("/etc/passwd", "absolute_path"), ("~/a.jpg", "absolute_path"), ("C:\\a.jpg", "absolute_path"),
    ("../a.jpg", "outside_folder"), ("sub/../../a.jpg", "outside_folder"), ("..\\a.jpg", "outside_folder"),
])
def test_confinement_without_symlinks(tmp_path: Path, written: str, check: str | None) -> None:
    problem = confinement_problem(written, str(tmp_path / "site"))
    assert (problem[0] if problem else None) == check


def test_confinement_follows_symlinks_of_folders_too(tmp_path: Path) -> None:
    (tmp_path / "site").mkdir()
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", tmp_path / "site" / "linked_folder")
    assert confinement_problem("linked_folder/a.jpg", str(tmp_path / "site"))[0] == "outside_folder"
    os.symlink(tmp_path / "site", tmp_path / "site_alias")  # the folder itself reached through a link: fine
    assert confinement_problem("a.jpg", str(tmp_path / "site_alias")) is None
