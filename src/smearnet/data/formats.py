"""Which image formats smearnet decodes, and what a refused file is (named from its first bytes).

Only the allowed formats' parsers ever see a file (``Image.open(..., formats=ALLOWED_FORMATS)``): Pillow
also reads EPS (through Ghostscript), PDF-like, GIF, ICO, PSD and dozens of rarer formats, each a parser
that a crafted file could attack, and none of which a blood-smear scanner writes. A file in any other
format is refused; ``sniff_format`` names the common ones from their signature so the reason says what the
file is, without handing it to a parser.
"""

from __future__ import annotations

#: The formats the one decoder (ingest, predict, serving) accepts, as Pillow names them.
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "BMP", "TIFF")
#: The allowed formats in a sentence, for reasons and fixes.
ALLOWED_FORMATS_TEXT = ", ".join(ALLOWED_FORMATS)

_ALLOWED_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"BM", "BMP"),
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"II+\x00", "TIFF"), (b"MM\x00+", "TIFF"),
)

# (offset, signature, name): signatures of formats a hospital export or a misnamed file may hold.
_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"%PDF", "PDF"),
    (0, b"%!PS", "PostScript/EPS"),
    (0, b"\xc5\xd0\xd3\xc6", "EPS"),
    (0, b"GIF87a", "GIF"),
    (0, b"GIF89a", "GIF"),
    (0, b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (0, b"\xff\x4f\xff\x51", "JPEG 2000"),
    (0, b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
    (0, b"\xff\x0a", "JPEG XL"),
    (128, b"DICM", "DICOM"),
    (0, b"8BPS", "Photoshop PSD"),
    (0, b"\x00\x00\x01\x00", "ICO"),
    (0, b"PK\x03\x04", "ZIP archive"),
    (0, b"<svg", "SVG"),
    (0, b"<?xml", "XML/SVG"),
)
_HEIF_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"mif1": "HEIF", b"msf1": "HEIF", b"avif": "AVIF"}


def allowed_signature(data: bytes) -> str | None:
    """The allowed format whose signature ``data`` starts with (its header may still be broken), or None."""
    for signature, name in _ALLOWED_SIGNATURES:
        if data.startswith(signature):
            return name
    return None


def sniff_format(data: bytes) -> str | None:
    """The name of a non-allowed format recognised from ``data``'s signature, or None (unknown bytes)."""
    if data[:1] == b"P" and data[1:2] in (b"1", b"2", b"3", b"4", b"5", b"6", b"7") and data[2:3] in b" \t\r\n":
        return "Netpbm PBM/PGM/PPM"
    for offset, signature, name in _SIGNATURES:
        if data[offset:offset + len(signature)] == signature:
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        return _HEIF_BRANDS[data[8:12]]
    return None
