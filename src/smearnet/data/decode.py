"""The one image decoder: every stage, `smearnet predict` and the served model read images through it.

``load_rgb`` (files) and ``decode_image_bytes`` (bytes) decode exactly alike, so an image the ingest stage
accepted decodes the same way downstream.  A file that cannot be used raises ``ImageProblem`` with a stable
``check`` key and a human-readable ``reason`` (see `smearnet.data.ingest` for the table of checks). Only the
formats of `smearnet.data.formats.ALLOWED_FORMATS` are parsed at all.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import threading
import unicodedata
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageFile, ImageOps, UnidentifiedImageError

from smearnet.data.formats import ALLOWED_FORMATS, ALLOWED_FORMATS_TEXT, allowed_signature, sniff_format
from smearnet.errors import SmearnetError

#: File name suffixes smearnet treats as cell images when it lists a folder.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")

FILE_MISSING = "file_missing"
IS_DIRECTORY = "is_directory"
NOT_REGULAR_FILE = "not_regular_file"
UNREADABLE = "unreadable"
SYMLINK_LOOP = "symlink_loop"
ZERO_BYTE = "zero_byte"
NOT_IMAGE = "not_image"
FORMAT_NOT_ALLOWED = "format_not_allowed"
MULTI_FRAME = "multi_frame"
CORRUPT = "corrupt"
TOO_LARGE = "too_large"

# Modes with an alpha channel; composited on white (see _to_rgb).
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_MAX_DECODER_MESSAGE = 200
# Image.open mutates nothing, but we briefly change PIL's bomb limit and the warnings filter around it.
_PIL_OPEN_LOCK = threading.Lock()
_EXIF_ORIENTATION = 0x0112
_VALID_ORIENTATIONS = range(1, 9)


class ImageProblem(Exception):
    """Why a file cannot be used, as a (check, reason) pair."""

    def __init__(self, check: str, reason: str):
        super().__init__(reason)
        self.check = check
        self.reason = reason


@dataclass(frozen=True)
class DecodedImage:
    """A fully decoded image: 8-bit RGB pixels, the file's own PIL mode, and notes on what was ignored.

    ``notes`` name what the decoder accepted but did not use (an invalid EXIF orientation, an embedded
    colour profile other than sRGB); ingest lists them in its report.
    """

    rgb: Image.Image
    mode: str
    notes: tuple[str, ...] = ()


def load_rgb(path: Path, *, max_pixels: int = 40_000_000) -> Image.Image:
    """Decode ``path`` fully and return an 8-bit RGB image, the way every stage must.

    - EXIF orientation is applied (``ImageOps.exif_transpose``), so width and
      height may be swapped relative to the stored pixels.
    - RGBA / LA / PA / P-with-transparency are alpha-composited on white
      (slide background), not alpha-dropped, so transparent areas never turn black.
    - 16-bit ``I;16*`` images (and ``I`` images within 0..65535) are scaled
      linearly by 1/257 (0..65535 -> 0..255); no per-image contrast stretch, so
      intensities stay comparable across images. Other ``I``/``F`` data is
      min-max scaled per image (``F`` within 0..1 is scaled by 255).
    - CIELAB (LAB TIFFs) is converted to sRGB colourimetrically; L, 1, P, CMYK,
      YCbCr, ... are converted with PIL's ``convert("RGB")``. Embedded ICC profiles
      are not applied (pixels are read as sRGB; ingest notes non-sRGB profiles).
    - Only JPEG, PNG, BMP and TIFF are parsed (``ALLOWED_FORMATS``); any other
      format is refused, naming it when its signature is known.
    - Files holding more than one picture (an animated PNG, a multi-page TIFF, a
      multi-picture JPEG) are refused: which frame is "the cell" is not ours to guess.
    - More than ``max_pixels`` pixels is refused before decoding (decompression
      bomb guard); truncated files are refused (``LOAD_TRUNCATED_IMAGES`` must
      stay False).

    Raises SmearnetError naming the file and the reason.
    """
    try:
        rgb, _original_mode = decode_rgb(read_image_bytes(os.fspath(path), max_pixels), max_pixels)
    except ImageProblem as problem:
        raise SmearnetError(
            f"Cannot load image {path}: {problem.reason}.",
            "re-run the ingest stage so the manifest only lists images that decode; if this file was accepted "
            "before, it has changed or been replaced since.",
        ) from None
    return rgb


def _max_file_bytes(max_pixels: int) -> int:
    """Largest plausible file for ``max_pixels`` (16 bytes/pixel uncompressed + 16 MiB metadata)."""
    return max_pixels * 16 + 16 * 2**20


def read_image_bytes(path: str, max_pixels: int) -> bytes:
    """Return the file's bytes, or raise ImageProblem with the file-level reason.

    Files bigger than any image of ``max_pixels`` could be are refused before
    being read into memory (e.g. a video or archive misnamed .jpg).
    """
    try:
        file_stat = os.stat(path)
    except FileNotFoundError:
        raise ImageProblem(FILE_MISSING, "file missing" + _case_mismatch_hint(path)) from None
    except PermissionError:
        raise ImageProblem(UNREADABLE, "unreadable (permission denied)") from None
    except OSError as exc:
        raise _os_error_problem(exc) from None
    if stat.S_ISDIR(file_stat.st_mode):
        raise ImageProblem(IS_DIRECTORY, "path is a directory")
    if not stat.S_ISREG(file_stat.st_mode):
        raise ImageProblem(NOT_REGULAR_FILE, "not a regular file (FIFO, device or socket)")
    if file_stat.st_size == 0:
        raise ImageProblem(ZERO_BYTE, "zero-byte file")
    if file_stat.st_size > _max_file_bytes(max_pixels):
        raise ImageProblem(
            TOO_LARGE,
            f"too large (file is {file_stat.st_size / 2**20:,.1f} MiB, more than an image of max_pixels "
            f"{max_pixels:,} can be)",
        )
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except PermissionError:
        raise ImageProblem(UNREADABLE, "unreadable (permission denied)") from None
    except OSError as exc:
        raise _os_error_problem(exc) from None
    try:
        with os.fdopen(descriptor, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise _os_error_problem(exc) from None
    if not data:
        raise ImageProblem(ZERO_BYTE, "zero-byte file")
    return data


def _os_error_problem(exc: OSError) -> ImageProblem:
    """Map an OSError from stat/open/read to a row reason (without the path in it)."""
    if exc.errno == errno.ELOOP:
        return ImageProblem(SYMLINK_LOOP, "symlink loop")
    if exc.errno == errno.ENOTDIR:
        return ImageProblem(FILE_MISSING, "file missing (a parent folder in the path is a file)")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return ImageProblem(UNREADABLE, "unreadable (permission denied)")
    return ImageProblem(UNREADABLE, f"unreadable ({exc.strerror or type(exc).__name__})")


def _case_mismatch_hint(path: str) -> str:
    """' (a file named X exists ...)' when only letter case / Unicode form differs, else ''."""
    folder, name = os.path.split(path)
    candidates = folder_names_by_key(folder).get(_name_key(name), ())
    if not candidates:
        return ""
    return f" (but {candidates[0]!r} exists in the same folder: paths are case-sensitive here)"


@lru_cache(maxsize=64)
def folder_names_by_key(folder: str) -> dict[str, tuple[str, ...]]:
    """File names in ``folder`` keyed by their case/Unicode-insensitive form (empty if unreadable).

    Cached; call ``folder_names_by_key.cache_clear()`` before a new pass over files that may have changed."""
    try:
        names = os.listdir(folder)
    except OSError:
        return {}
    grouped: dict[str, list[str]] = {}
    for name in sorted(names):
        grouped.setdefault(_name_key(name), []).append(name)
    return {key: tuple(value) for key, value in grouped.items()}


def _name_key(name: str) -> str:
    return unicodedata.normalize("NFC", name).casefold()


@contextmanager
def _bomb_guard(max_pixels: int) -> Iterator[None]:
    """Make PIL's decompression-bomb warning an error and keep its limit >= max_pixels.

    PIL's own limit stays as a backstop; our explicit size check (with a clear
    message) runs right after the header is parsed. The global limit is only
    raised, never lowered, and restored afterwards.
    """
    with _PIL_OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        saved_limit = Image.MAX_IMAGE_PIXELS
        if saved_limit is not None and saved_limit < max_pixels:
            Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved_limit


def decode_rgb(data: bytes, max_pixels: int) -> tuple[Image.Image, str]:
    """Fully decode ``data``; return (oriented RGB image, original PIL mode)."""
    decoded = decode_image(data, max_pixels)
    return decoded.rgb, decoded.mode


def decode_image(data: bytes, max_pixels: int) -> DecodedImage:
    """Fully decode ``data`` (see load_rgb for the rules); raise ImageProblem when it cannot be used."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise SmearnetError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process, so truncated images would be "
            "silently accepted with grey areas.",
            "remove the code (or library setting) that sets ImageFile.LOAD_TRUNCATED_IMAGES = True.",
        )
    try:
        with _bomb_guard(max_pixels):
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise _unidentified_problem(data) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageProblem(TOO_LARGE, f"too large (more than max_pixels {max_pixels:,} px)") from None
    except Exception as exc:
        raise ImageProblem(CORRUPT, f"truncated or corrupt image ({short_message(exc)})") from None

    try:
        frames = int(getattr(image, "n_frames", 1))
    except Exception as exc:  # counting a TIFF's pages walks every page header
        raise ImageProblem(CORRUPT, f"truncated or corrupt image ({short_message(exc)})") from None
    if frames > 1:
        raise ImageProblem(MULTI_FRAME, f"more than one picture in the file ({frames} frames of {image.format}; "
                                        "smearnet reads one picture per file)")
    width, height = image.size
    if width * height > max_pixels:
        raise ImageProblem(
            TOO_LARGE, f"too large ({width}x{height} = {width * height:,} px > max_pixels {max_pixels:,})"
        )
    original_mode = image.mode
    try:
        reduced = _reduced_to_8_bits(image)  # the tile says so, and load() drops the tile
        image.load()
        notes = _decode_notes(image, reduced)
        ImageOps.exif_transpose(image, in_place=True)
        rgb = _to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageProblem(TOO_LARGE, f"too large (more than max_pixels {max_pixels:,} px)") from None
    except Exception as exc:
        raise ImageProblem(CORRUPT, f"truncated or corrupt image ({short_message(exc)})") from None
    return DecodedImage(rgb, original_mode, notes)


def _unidentified_problem(data: bytes) -> ImageProblem:
    """Why no allowed format's parser accepted ``data``: a broken header, another format, or no image at all."""
    allowed = allowed_signature(data)
    if allowed is not None:
        return ImageProblem(CORRUPT, f"truncated or corrupt image (a {allowed} file whose header cannot be read)")
    named = sniff_format(data)
    if named is not None:
        return ImageProblem(FORMAT_NOT_ALLOWED, f"format not allowed ({named}; allowed: {ALLOWED_FORMATS_TEXT})")
    return ImageProblem(NOT_IMAGE, "not an image (not a JPEG, PNG, BMP or TIFF file)")


_TWELVE_BIT_MAX = 4095


def _decode_notes(image: Image.Image, reduced_to_8_bits: bool) -> tuple[str, ...]:
    """Notes on metadata the decoder does not apply: an invalid EXIF orientation, a non-sRGB ICC profile, a
    16-bit image that uses 12 bits or fewer (it is read on the 16-bit scale, hence dark), a 16-bit colour image
    (PNG, TIFF: Pillow reads it as 8 bits, ``reduced_to_8_bits``)."""
    notes = []
    orientation = image.getexif().get(_EXIF_ORIENTATION)
    if orientation is not None and orientation not in _VALID_ORIENTATIONS:
        notes.append(f"invalid EXIF orientation {orientation!r} ignored (valid: 1-8); image used as stored")
    profile = image.info.get("icc_profile")
    if profile and image.mode != "LAB":  # LAB pixels are converted colourimetrically (see _to_rgb)
        try:
            description = ImageCms.ImageCmsProfile(io.BytesIO(profile)).profile.profile_description or ""
        except Exception:  # noqa: BLE001 - any unreadable profile is ignored the same way
            description = "unreadable"
        if "srgb" not in description.casefold():
            notes.append(f"embedded colour profile {description.strip()[:60]!r} ignored; pixels read as sRGB")
    if (image.mode.startswith("I;16") and not image.mode.startswith("I;16S")) or image.mode == "I":
        darkest, brightest = (int(v) for v in image.getextrema())
        if darkest >= 0 and 0 < brightest <= _TWELVE_BIT_MAX:  # 10/12-bit data in 16 bits, read on the 16-bit scale
            notes.append(f"16-bit image whose brightest pixel is {brightest} of 65535: read on the 16-bit scale it "
                         f"is at most {round(brightest / 257)} of 255 (dark); if the camera has 12 bits or fewer, "
                         "convert such files to 8 bits first")
    if reduced_to_8_bits:
        extrema = image.getextrema()
        brightest = max(high for _, high in (extrema[:3] if image.mode == "RGBA" else extrema))  # not alpha
        notes.append(f"16-bit {image.mode} {image.format}, read as 8 bits (Pillow keeps each sample's high byte): "
                     f"brightest value {brightest} of 255"
                     + ("; dark, as 12-bit or fewer camera data in 16 bits are: convert such files to 8 bits first"
                        if brightest <= _TWELVE_BIT_MAX >> 8 else ""))
    return tuple(notes)


def _reduced_to_8_bits(image: Image.Image) -> bool:
    """Whether Pillow will read 16-bit samples of a colour image (RGB, RGBA, CMYK; PNG or TIFF) as 8 bits: its
    raw mode (``RGB;16B``, ``RGB;16L``, ...) says so, its mode does not. Grey 16-bit images keep their mode (I;16)."""
    if image.mode.startswith(("I", "F")):
        return False
    raw_modes = [tile.args if isinstance(tile.args, str) else (tile.args or ("",))[0] for tile in image.tile]
    return any(";16" in str(raw_mode) for raw_mode in raw_modes)


def short_message(exc: BaseException) -> str:
    """A decoder's exception as one short line (type and message, at most 200 characters)."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text if len(text) <= _MAX_DECODER_MESSAGE else text[: _MAX_DECODER_MESSAGE - 3] + "..."


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (see load_rgb for the rules)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        return _high_bit_depth_to_l(image).convert("RGB")
    if mode == "LAB":  # PIL's convert() would copy L, a and b into R, G and B
        lab_to_srgb = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"),
                                              "LAB", "RGB")  # built per image: rare, and not shared by threads
        return ImageCms.applyTransform(image, lab_to_srgb)
    if mode in _ALPHA_MODES or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    """Scale a 16/32-bit integer or float single-channel image to 8-bit ``L``."""
    values = np.asarray(image).astype(np.float64)
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    unsigned_16 = image.mode.startswith("I;16") and not image.mode.startswith("I;16S")
    if unsigned_16 or (image.mode == "I" and low >= 0 and high <= 65535):
        scaled = values / 257.0
    elif image.mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255.0
    elif high > low:
        scaled = (values - low) / (high - low) * 255.0
    else:
        scaled = np.zeros_like(values)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))



def decode_image_bytes(data: bytes, *, max_pixels: int = 40_000_000) -> Image.Image:
    """Decode image bytes to 8-bit RGB exactly as `load_rgb` decodes files (for predict and serving).

    Raises SmearnetError with the reason (not an image, truncated, too large, ...).
    """
    if not data:
        raise SmearnetError("Cannot decode image: zero bytes.", "send the image file's bytes, base64-encoded.")
    try:
        return decode_rgb(data, max_pixels)[0]
    except ImageProblem as problem:
        raise SmearnetError(f"Cannot decode image: {problem.reason}.",
                            "send one picture as a JPEG, PNG, BMP or TIFF file.") from None
