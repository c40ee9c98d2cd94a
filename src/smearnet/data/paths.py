"""How a manifest's path cell becomes a file: Windows separators, Unicode forms, confinement to a folder.

The rules, in the order they apply:

1. **Windows separators.** A backslash in a *relative* path is a folder separator, as on the Windows
   machine that wrote the manifest: ``images\\cell1.jpg`` is ``images/cell1.jpg``. Absolute POSIX paths are
   taken as written. Windows absolute paths (``C:\\...``, ``\\\\server\\share\\...``, ``\\images\\...``) cannot be
   opened here and are reported as such by ingest.
2. **Unicode form.** macOS writes accented file names decomposed (NFD), most other tools composed (NFC); a
   manifest written on one system and files copied from another differ only in that invisible form. When
   the path as written does not exist but its NFC or NFD form does, that file is used (and counted in the
   ingest report).
3. **Confinement** (``smearnet ingest-site`` always; ``data=manifest`` when ``data.confine: true``). A path
   must be relative, must not climb out of the manifest's folder with ``..``, and must still lie inside
   that folder once every symlink is followed.
"""

from __future__ import annotations

import os
import re
import unicodedata

# C:\ or C:/ (drive), \\server or //server (UNC), or a leading backslash (root of the current drive).
_WINDOWS_ABSOLUTE = re.compile(r"^(?:[A-Za-z]:[\\/]|\\\\|//|\\)")

ABSOLUTE_PATH = "absolute_path"
OUTSIDE_FOLDER = "outside_folder"
#: Confinement check keys (``absolute_path``, ``outside_folder``), for the table of checks in smearnet.data.ingest.
CONFINEMENT_CHECKS = (ABSOLUTE_PATH, OUTSIDE_FOLDER)


def is_windows_absolute(written: str) -> bool:
    """Whether ``written`` is an absolute Windows path (drive letter, UNC share or leading backslash)."""
    return bool(_WINDOWS_ABSOLUTE.match(written))


def with_forward_slashes(written: str) -> str:
    """``written`` with backslashes read as folder separators when it is a relative path (rule 1).

    Absolute paths, POSIX or Windows, are returned unchanged: a POSIX file name may hold a backslash, and a
    Windows absolute path is reported rather than guessed at.
    """
    if os.path.isabs(written) or written.startswith("~") or is_windows_absolute(written):
        return written
    return written.replace("\\", "/")


def existing_unicode_form(path: str) -> str | None:
    """The NFC or NFD spelling of ``path`` that exists when ``path`` itself does not (rule 2), else None."""
    if os.path.lexists(path):
        return None
    for form in ("NFC", "NFD"):
        candidate = unicodedata.normalize(form, path)
        if candidate != path and os.path.lexists(candidate):
            return candidate
    return None


def confinement_problem(written: str, folder: str, opened: str | None = None) -> tuple[str, str] | None:
    """Why the path cell ``written`` does not stay inside ``folder`` (rule 3), as (check, reason), or None.

    ``written`` is read as the manifest reader reads it (rule 1). The last test follows every symlink of
    ``opened`` (the file that would be read, by default ``written`` joined to ``folder``), so a link to
    ``/etc`` or to another hospital's folder is refused while links inside the folder are fine. Reasons
    never repeat the path (it may hold a patient's name).
    """
    if not written:
        return None
    if os.path.isabs(written) or written.startswith("~") or is_windows_absolute(written):
        return ABSOLUTE_PATH, "absolute path (paths must be relative to the manifest's folder)"
    relative = with_forward_slashes(written)
    folder = os.path.abspath(folder)
    joined = os.path.normpath(os.path.join(folder, relative))
    if not _is_inside(joined, folder):
        return OUTSIDE_FOLDER, "path leaves the manifest's folder through '..'"
    if not _is_inside(os.path.realpath(opened or joined), os.path.realpath(folder)):
        return OUTSIDE_FOLDER, "path leads outside the manifest's folder through a symlink"
    return None


def _is_inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)
