"""One self-contained HTML page explaining smear calls to a pathologist.

``smear_report_html`` is a pure function of ``SmearExplanation`` values: computing the calls, probabilities
and heat maps is the caller's job, so the page can be tested without a model. The page is a single file
with images inline (``data:image/png;base64``), inline CSS, no scripts and no external URLs (a
Content-Security-Policy says so to the browser too): it can be archived with the case, mailed, or opened on
a workstation without network. Every piece of text goes through ``html.escape``: smear ids and file names
come from outside the project.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

import numpy as np
from PIL import Image

from smearnet.errors import SmearnetError

__all__ = ["CALLS", "CellExplanation", "SmearExplanation", "png_bytes", "smear_report_html"]

CALLS = ("positive", "negative", "undetermined")


@dataclass(frozen=True)
class CellExplanation:
    """One cell as shown: its photo, its heat map and what the model said about it.

    ``probability`` is the positive class's; ``weight`` the MIL attention weight (None for other scores);
    ``overlay_png`` None when no heat map was computed.
    """

    label: str
    predicted: str
    probability: float
    weight: float | None
    image_png: bytes
    overlay_png: bytes | None = None


@dataclass(frozen=True)
class SmearExplanation:
    """One smear's call, the score and threshold behind it, and the cells chosen to show (of ``n_cells``)."""

    smear_id: str
    score_name: str
    score: float
    threshold: float
    call: str
    n_cells: int
    cells: list[CellExplanation]

    def __post_init__(self) -> None:
        if self.call not in CALLS:
            raise SmearnetError(f"Smear {self.smear_id!r} has call {self.call!r}, not one of {', '.join(CALLS)}.",
                                "Pass the call of the smear rule (SmearRule.classify).")


def png_bytes(image: np.ndarray | Image.Image) -> bytes:
    """PNG encoding of a PIL image or an array (uint8, or float in [0, 1]; grey ``(H, W)`` or ``(H, W, 3|4)``).

    PNG because it is lossless: a heat map re-compressed as JPEG would blur the boundary the reader judges.
    """
    if not isinstance(image, Image.Image):
        array = np.asarray(image)
        if array.dtype != np.uint8:
            array = np.rint(np.clip(np.nan_to_num(array.astype(np.float64)), 0.0, 1.0) * 255).astype(np.uint8)
        image = Image.fromarray(array)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def smear_report_html(smears: Sequence[SmearExplanation], *, title: str, model: str, positive_class: str) -> str:
    """The whole page: a summary table of the calls, then one section per smear with its cell gallery."""
    body = [_page_header(title, model, positive_class), _summary(smears)]
    body += [_smear_section(index, smear, positive_class) for index, smear in enumerate(smears)]
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{escape(_CSP)}">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
            + "\n".join(body) + "\n</main>\n</body>\n</html>\n")


# --------------------------------------------------------------------------------------------- pieces

# Nothing may load or run: images only from data: URIs, styles only from the inline sheet.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d1d1f; margin: 0;
       background: #fafafa; }
main { max-width: 1140px; margin: 0 auto; padding: 20px 24px 48px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 0; overflow-wrap: anywhere; }
.meta, .note { color: #555; margin: 2px 0; }
table.summary { border-collapse: collapse; margin: 14px 0 8px; background: #fff; }
table.summary th, table.summary td { border-bottom: 1px solid #ddd; padding: 4px 12px; text-align: left; }
table.summary td.num { text-align: right; font-variant-numeric: tabular-nums; }
a { color: inherit; }
.smear { background: #fff; border: 1px solid #ddd; border-radius: 8px; margin: 18px 0; padding: 14px 16px; }
.smear-header { display: flex; flex-wrap: wrap; align-items: center; gap: 8px 18px; margin-bottom: 10px; }
.badge { display: inline-block; padding: 2px 10px; border-radius: 12px; color: #fff; font-weight: 600; }
.call-positive { background: #b2182b; }
.call-negative { background: #2166ac; }
.call-undetermined { background: #6b6b6b; }
.score { display: flex; align-items: center; gap: 10px; font-variant-numeric: tabular-nums; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(336px, 1fr)); gap: 12px; }
figure.cell { margin: 0; padding: 8px; border: 1px solid #e3e3e3; border-radius: 6px; background: #fdfdfd;
              break-inside: avoid; }
.pair { display: flex; gap: 6px; }
.pair img, .pair .missing { width: 156px; height: 156px; object-fit: contain; background: #eee;
                            border-radius: 3px; }
.pair .missing { display: flex; align-items: center; justify-content: center; color: #777; font-size: 13px; }
figcaption { font-size: 13px; margin-top: 6px; font-variant-numeric: tabular-nums; }
figcaption .label { font-weight: 600; overflow-wrap: anywhere; }
figcaption .fact { white-space: nowrap; }
""".strip()


def _page_header(title: str, model: str, positive_class: str) -> str:
    """Title, model and the reading instructions: what the colours mean and what they do not."""
    positive = escape(positive_class)
    return (f"<header>\n<h1>{escape(title)}</h1>\n"
            f'<p class="meta">Model: {escape(model)} &middot; positive class: <b>{positive}</b></p>\n'
            f'<p class="note">Each cell is shown as photographed (left) and with its Grad-CAM heat map (right): '
            f"warm colours mark the regions that raised the model's probability of {positive} most. Each map is "
            f"scaled to its own maximum, so it shows where a cell's evidence lies; the probability says how "
            f"strong it is.</p>\n</header>")


def _summary(smears: Sequence[SmearExplanation]) -> str:
    """One row per smear, linked to its section, so a long page can be read from the top."""
    rows = "\n".join(
        f'<tr><td><a href="#smear-{index}">{escape(smear.smear_id)}</a></td>'
        f'<td><span class="badge call-{smear.call}">{escape(smear.call)}</span></td>'
        f'<td>{escape(smear.score_name)}</td><td class="num">{_number(smear.score)}</td>'
        f'<td class="num">{_number(smear.threshold)}</td><td class="num">{smear.n_cells}</td></tr>'
        for index, smear in enumerate(smears))
    return ('<table class="summary">\n<thead><tr><th>Smear</th><th>Call</th><th>Score</th><th>Value</th>'
            f"<th>Threshold</th><th>Cells</th></tr></thead>\n<tbody>\n{rows}\n</tbody>\n</table>")


def _smear_section(index: int, smear: SmearExplanation, positive_class: str) -> str:
    """A smear's header (id, call, score against threshold) and its gallery of cells."""
    shown = f"Showing {len(smear.cells)} of {smear.n_cells} cells." if smear.cells else "No cell images to show."
    figures = "\n".join(_cell_figure(cell, positive_class) for cell in smear.cells)
    return (f'<section class="smear" id="smear-{index}" data-smear-id="{escape(smear.smear_id)}">\n'
            f'<div class="smear-header">\n<h2>Smear {escape(smear.smear_id)}</h2>\n'
            f'<span class="badge call-{smear.call}">{escape(smear.call)}</span>\n'
            f'<div class="score">{_score_bar(smear)}<span>{escape(smear.score_name)} '
            f"<b>{_number(smear.score)}</b> &middot; threshold {_number(smear.threshold)}</span></div>\n"
            f'<span class="note">{escape(shown)}</span>\n</div>\n'
            f'<div class="gallery">\n{figures}\n</div>\n</section>')


def _cell_figure(cell: CellExplanation, positive_class: str) -> str:
    """Photo and heat map side by side, captioned with the label, predicted class, probability and weight."""
    label = escape(cell.label)
    photo = f'<img src="{_data_uri(cell.image_png)}" alt="cell {label}">'
    heat = (f'<img src="{_data_uri(cell.overlay_png)}" alt="Grad-CAM heat map of cell {label}">'
            if cell.overlay_png is not None else '<div class="missing">no heat map</div>')
    facts = [f"predicted <b>{escape(cell.predicted)}</b>", f"P({escape(positive_class)}) {_percent(cell.probability)}"]
    facts += [] if cell.weight is None else [f"weight {_number(cell.weight)}"]
    kept_whole = " &middot; ".join(f'<span class="fact">{fact}</span>' for fact in facts)
    return (f'<figure class="cell">\n<div class="pair">{photo}{heat}</div>\n'
            f'<figcaption><span class="label">{label}</span><br>{kept_whole}</figcaption>\n</figure>')


def _score_bar(smear: SmearExplanation, width: int = 240, height: int = 30) -> str:
    """An inline SVG: the score as a filled bar in the call's colour, the threshold as a dark tick.

    The axis runs from 0 to 1 (every smear score is a share or a probability), widened when a value falls
    outside, so the distance between score and threshold reads the same across smears.
    """
    finite = [v for v in (smear.score, smear.threshold) if math.isfinite(v)]
    low, high = min([0.0, *finite]), max([1.0, *finite])
    track = width - 2

    def x(value: float) -> float:
        return 1 + track * (value - low) / (high - low)

    parts = [f'<rect x="1" y="6" width="{track}" height="12" rx="3" fill="#e6e6e6"/>']
    if math.isfinite(smear.score):
        parts.append(f'<rect x="1" y="6" width="{x(smear.score) - 1:.1f}" height="12" rx="3" '
                     f'fill="{_CALL_COLOURS[smear.call]}"/>')
    if math.isfinite(smear.threshold):
        parts.append(f'<line x1="{x(smear.threshold):.1f}" x2="{x(smear.threshold):.1f}" y1="2" y2="22" '
                     'stroke="#111" stroke-width="2"/>')
    parts.append(f'<text x="1" y="{height - 1}" font-size="9" fill="#666">{_number(low, 1)}</text>')
    parts.append(f'<text x="{width - 1}" y="{height - 1}" font-size="9" fill="#666" '
                 f'text-anchor="end">{_number(high, 1)}</text>')
    label = f"score {_number(smear.score)}, threshold {_number(smear.threshold)}"
    return (f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="{escape(label)}"><title>{escape(label)}</title>{"".join(parts)}</svg>')


_CALL_COLOURS = {"positive": "#b2182b", "negative": "#2166ac", "undetermined": "#6b6b6b"}


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _number(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _percent(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.1f}%"
