"""Build the bad-input corpus for ingest tests on the fly (no committed binaries).

Every ``make_*`` function writes one case into ``folder`` and returns the path
to put in a manifest. ``write_manifest`` writes a CSV; ``snapshot`` records a
folder tree so tests can prove ingest never modifies, creates or deletes inputs.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import struct
import tempfile
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms

CLASSES = ("covid_rl", "normal")
GOOD_SIZE = (96, 80)  # width, height: above the default min_size of 64


# --------------------------------------------------------------------------- good images


def make_rgb_jpeg(folder: Path, name: str = "good.jpg", *, size: tuple[int, int] = GOOD_SIZE, seed: int = 0) -> Path:
    """A valid RGB JPEG with seeded noise (different seeds give different bytes)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, "JPEG", quality=90)
    return path


def make_png_with_alpha(folder: Path) -> Path:
    """RGBA PNG: left half fully transparent, right half opaque (10, 20, 30)."""
    pixels = np.zeros((80, 96, 4), dtype=np.uint8)
    pixels[:, 48:] = (10, 20, 30, 255)
    path = folder / "alpha.png"
    Image.fromarray(pixels).save(path)
    return path


def make_palette_with_transparency(folder: Path) -> Path:
    """P-mode PNG whose palette index 0 is transparent (left half) and index 1 is red (right half)."""
    indices = np.zeros((80, 96), dtype=np.uint8)
    indices[:, 48:] = 1
    image = Image.fromarray(indices).convert("P")
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    path = folder / "palette_transparent.png"
    image.save(path, transparency=0)
    return path


def make_16bit_png(folder: Path) -> Path:
    """16-bit grayscale PNG (I;16): thirds at 0, 32896 (=128*257) and 65535."""
    pixels = np.zeros((80, 96), dtype=np.uint16)
    pixels[:, 32:64] = 32896
    pixels[:, 64:] = 65535
    path = folder / "sixteen_bit.png"
    Image.fromarray(pixels).save(path)
    return path


def make_grayscale(folder: Path) -> Path:
    """8-bit grayscale (L) PNG filled with 77."""
    path = folder / "gray.png"
    Image.new("L", GOOD_SIZE, 77).save(path)
    return path


def make_cmyk_jpeg(folder: Path) -> Path:
    """CMYK JPEG of pure cyan (C=255), which is (0, 255, 255) in RGB."""
    path = folder / "cmyk.jpg"
    Image.new("CMYK", GOOD_SIZE, (255, 0, 0, 0)).save(path, "JPEG", quality=95)
    return path


def make_large(folder: Path, side: int = 3000) -> Path:
    """A side x side PNG (9 Mpx for 3000): fine by default, too large under a low max_pixels."""
    path = folder / "large.png"
    Image.new("RGB", (side, side), (120, 30, 60)).save(path, compress_level=1)
    return path


def make_tiny(folder: Path) -> Path:
    """A valid 10x10 JPEG (too small for min_size 64)."""
    return make_rgb_jpeg(folder, "tiny.jpg", size=(10, 10))


def make_exif_rotated(folder: Path) -> Path:
    """Stored 120x80 with a red top stripe and EXIF Orientation=6.

    Orientation 6 means "stored row 0 is the visual right-hand side", so after
    exif_transpose the image is 80 wide x 120 high with the red stripe on the right.
    """
    pixels = np.zeros((80, 120, 3), dtype=np.uint8)
    pixels[:12, :] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = folder / "exif_rotated.jpg"
    Image.fromarray(pixels).save(path, "JPEG", quality=95, exif=exif.tobytes())
    return path


def make_non_ascii_name(folder: Path) -> Path:
    """A valid JPEG under a folder and file name with spaces and non-ASCII characters."""
    return make_rgb_jpeg(folder, "Blut ausstrich/Zelle ü ñ 01 – 血液.jpg", seed=11)


# --------------------------------------------------------------------------- bad files


def make_zero_byte(folder: Path) -> Path:
    path = folder / "empty.jpg"
    path.write_bytes(b"")
    return path


def make_truncated_jpeg(folder: Path) -> Path:
    """A noisy 200x200 JPEG cut to 60% of its bytes."""
    buffer = io.BytesIO()
    noise = np.random.default_rng(3).integers(0, 256, size=(200, 200, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    path = folder / "truncated.jpg"
    path.write_bytes(data[: int(len(data) * 0.6)])
    return path


def make_text_as_jpg(folder: Path) -> Path:
    path = folder / "notes.jpg"
    path.write_text("this is a lab note, not an image\n", encoding="utf-8")
    return path


def make_huge_file(folder: Path, size: int = 17 * 2**20) -> Path:
    """A sparse 17 MiB file named .jpg (too big for any image under a low max_pixels)."""
    path = folder / "video.jpg"
    with open(path, "wb") as handle:
        handle.truncate(size)
    return path


def make_directory(folder: Path) -> Path:
    path = folder / "a_folder.jpg"
    path.mkdir()
    return path


def make_symlink_loop(folder: Path) -> Path:
    """loop_a.jpg -> loop_b.jpg -> loop_a.jpg."""
    first, second = folder / "loop_a.jpg", folder / "loop_b.jpg"
    os.symlink(second.name, first)
    os.symlink(first.name, second)
    return first


def make_missing(folder: Path) -> Path:
    return folder / "never_written.jpg"


def make_unreadable(folder: Path) -> Path:
    """A valid JPEG with mode 000 (root can still read it; see the tests)."""
    path = make_rgb_jpeg(folder, "locked.jpg", seed=21)
    path.chmod(0)
    return path


def permissions_are_enforced() -> bool:
    """False when this process can read a chmod 000 file (root with CAP_DAC_OVERRIDE)."""
    with tempfile.TemporaryDirectory() as folder:
        probe = Path(folder, "probe")
        probe.write_bytes(b"x")
        probe.chmod(0)
        try:
            probe.read_bytes()
        except PermissionError:
            return True
        finally:
            probe.chmod(0o600)
    return False


def make_bomb_png(folder: Path, width: int = 20_000, height: int = 20_000, name: str = "bomb.png") -> Path:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb shape)."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8), 0).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    ihdr_start = 8 + 8  # signature, then chunk length + type
    data[ihdr_start : ihdr_start + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12 : ihdr_start + 13]))
    data[ihdr_start + 13 : ihdr_start + 17] = struct.pack(">I", crc)
    path = folder / name
    path.write_bytes(bytes(data))
    return path


# --------------------------------------------------------------------------- formats and pictures smearnet refuses


def _two_frames() -> list[Image.Image]:
    return [Image.new("RGB", GOOD_SIZE, (200, 30, 30)), Image.new("RGB", GOOD_SIZE, (30, 200, 30))]


def _one_picture_as(path: Path, image_format: str) -> Path:
    """One plain picture saved at `path` in `image_format`, whatever the file name says."""
    _two_frames()[0].save(path, image_format)
    return path


def make_gif(folder: Path) -> Path:
    """A single-frame GIF: a valid image in a format outside the allowlist."""
    return _one_picture_as(folder / "cell.gif", "GIF")


def make_pdf_as_jpg(folder: Path) -> Path:
    """A one-page PDF renamed .jpg (what a scanner's "save as PDF" and a rename produce)."""
    return _one_picture_as(folder / "scan.jpg", "PDF")


def make_eps(folder: Path) -> Path:
    """An EPS file named .jpg: Pillow would hand it to Ghostscript if the format were allowed."""
    return _one_picture_as(folder / "figure.jpg", "EPS")


def make_ppm(folder: Path) -> Path:
    """A PPM (Netpbm) image: Pillow reads it, smearnet does not."""
    return _one_picture_as(folder / "cell.ppm", "PPM")


def make_dicom_as_jpg(folder: Path) -> Path:
    """The start of a DICOM file (128-byte preamble, then DICM), named .jpg as a PACS export might."""
    path = folder / "study.jpg"
    path.write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00" + bytes(64))
    return path


def make_apng(folder: Path) -> Path:
    """An animated PNG (two frames) in an allowed format."""
    path = folder / "animated.png"
    first, second = _two_frames()
    first.save(path, "PNG", save_all=True, append_images=[second])
    return path


def make_multipage_tiff(folder: Path) -> Path:
    """A two-page TIFF (a stack, or a whole-slide pyramid)."""
    path = folder / "stack.tif"
    first, second = _two_frames()
    first.save(path, "TIFF", save_all=True, append_images=[second])
    return path


def make_mpo(folder: Path) -> Path:
    """A multi-picture JPEG (MPO, as stereo or preview-carrying cameras write), named .jpg."""
    path = folder / "multi_picture.jpg"
    first, second = _two_frames()
    first.save(path, "MPO", save_all=True, append_images=[second])
    return path


# --------------------------------------------------------------------------- odd but usable images


def make_invalid_orientation(folder: Path) -> Path:
    """A JPEG whose EXIF Orientation is 9 (valid values are 1-8)."""
    exif = Image.Exif()
    exif[0x0112] = 9
    path = folder / "bad_orientation.jpg"
    rng = np.random.default_rng(31)
    Image.fromarray(rng.integers(0, 256, size=(80, 120, 3), dtype=np.uint8)).save(path, "JPEG", exif=exif.tobytes())
    return path


def make_lab_tiff(folder: Path) -> Path:
    """A CIELAB TIFF of pure sRGB red (as some microscope cameras write)."""
    to_lab = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")
    path = folder / "lab.tif"
    ImageCms.applyTransform(Image.new("RGB", GOOD_SIZE, (255, 0, 0)), to_lab).save(path, "TIFF")
    return path


def make_16bit_rgb_tiff(folder: Path, pixels: np.ndarray, name: str = "rgb16.tif") -> Path:
    """An uncompressed little-endian TIFF of 16-bit RGB ``pixels`` (h, w, 3), as microscope cameras write them;
    Pillow cannot write one, so the bytes are laid out here: header, BitsPerSample values, pixels, one IFD."""
    height, width, _ = pixels.shape
    data = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    bits_at, data_at = 8, 14
    ifd_at = data_at + len(data)
    short, long = 3, 4
    entries = [(256, short, 1, width), (257, short, 1, height), (258, short, 3, bits_at), (259, short, 1, 1),
               (262, short, 1, 2), (273, long, 1, data_at), (277, short, 1, 3), (278, short, 1, height),
               (279, long, 1, len(data)), (284, short, 1, 1)]
    out = b"II*\x00" + struct.pack("<I", ifd_at) + struct.pack("<3H", 16, 16, 16) + data
    out += struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        inline = kind == short and count == 1
        out += struct.pack("<HHIHH", tag, kind, count, value, 0) if inline else struct.pack("<HHII", tag, kind, count,
                                                                                             value)
    path = folder / name
    path.write_bytes(out + struct.pack("<I", 0))
    return path


def make_16bit_rgb_png(folder: Path, pixels: np.ndarray, name: str = "rgb16.png") -> Path:
    """A PNG of 16-bit RGB ``pixels`` (h, w, 3), chunk by chunk (Pillow cannot write one)."""
    height, width, _ = pixels.shape
    big_endian = np.ascontiguousarray(pixels, dtype=">u2")
    scanlines = b"".join(b"\x00" + big_endian[row].tobytes() for row in range(height))  # filter 0 on every line

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)  # 16 bits, colour type 2 (RGB)
    path = folder / name
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(scanlines))
                     + chunk(b"IEND", b""))
    return path


def make_foreign_profile_jpeg(folder: Path) -> Path:
    """A JPEG carrying an ICC profile that is not sRGB (here: Lab identity)."""
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    path = folder / "profiled.jpg"
    rng = np.random.default_rng(32)
    Image.fromarray(rng.integers(0, 256, size=(80, 96, 3), dtype=np.uint8)).save(path, "JPEG", icc_profile=profile)
    return path


def make_one_pixel_high(folder: Path) -> Path:
    """A 96x1 PNG."""
    path = folder / "line.png"
    Image.new("RGB", (96, 1), (10, 20, 30)).save(path)
    return path


def make_zero_width_bmp(folder: Path) -> Path:
    """A BMP whose header says 0x0 pixels."""
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, "BMP")
    data = bytearray(buffer.getvalue())
    data[18:26] = struct.pack("<ii", 0, 0)
    path = folder / "zero.bmp"
    path.write_bytes(bytes(data))
    return path


# --------------------------------------------------------------------------- manifests and snapshots


def write_manifest(
    csv_path: Path,
    rows: Iterable[Mapping[str, str]],
    columns: Sequence[str] = ("path", "label", "patient_id"),
) -> Path:
    """Write a manifest CSV with ``columns``; row values default to ''."""
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([row.get(column, "") for column in columns])
    return csv_path


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (symlinks not followed) -> kind plus content hash / link target / mode."""
    entries: dict[str, str] = {}
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in sorted(dirs + files):
            path = Path(root, name)
            relative = str(path.relative_to(folder))
            info = path.lstat()
            if path.is_symlink():
                entries[relative] = f"link:{os.readlink(path)}"
            elif path.is_dir():
                entries[relative] = f"dir:{oct(info.st_mode)}"
            else:
                try:
                    digest = hashlib.sha256(path.read_bytes()).hexdigest()
                except PermissionError:
                    digest = "unreadable"
                entries[relative] = f"file:{digest}:{oct(info.st_mode)}:{info.st_mtime_ns}"
    return entries
