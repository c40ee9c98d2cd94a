"""Deterministic synthetic cohort of single-lymphocyte blood-smear images.

Each image imitates a CellaVision DM96 capture stained with May Grünwald-Giemsa: a pale
pinkish-grey background, pink red blood cells (RBCs) with paler centres, and one centred
lymphocyte of class ``normal``, ``classic_rl`` (classic reactive lymphocyte) or ``covid_rl``
(COVID-19 reactive lymphocyte). Every morphological feature is drawn from overlapping per-class
distributions, so the classes are learnable but not trivially separable.

The cohort structure follows the paper: a *development* cohort (one class per patient, one
smear per patient) and an *assessment* cohort of RL-positive and RL-negative smears with the
per-smear cell mix of the paper's Table 5. ``plan_cohort`` decides everything (ids, labels,
per-cell seeds, per-smear stain) without rendering; ``render_cell`` turns one ``CellSpec`` into
pixels; ``generate_cohort`` renders a whole plan to JPEG files plus ``manifest.csv``.

Optics are modelled multiplicatively (brightfield transmission): the image is the illumination
times the transmittance of every layer, so overlapping RBCs darken like real ones.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import multiprocessing
import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from smearnet.errors import SmearnetError
from smearnet.io import atomic_directory

CLASSES: tuple[str, ...] = ("normal", "classic_rl", "covid_rl")

MANIFEST_COLUMNS: tuple[str, ...] = ("path", "label", "patient_id", "smear_id", "site", "cohort")
DEVELOPMENT = "development"
ASSESSMENT = "assessment"

#: Reference image size; all geometry below is in pixels at this size and rescaled otherwise.
REFERENCE_SIZE = 363
#: ``stain_shift`` components in [-1, 1] are multiplied by this to give RGB offsets in [0, 1] units.
STAIN_SHIFT_SCALE = 0.15
#: Per-smear random stain variation (standard deviations, [0, 1] intensity units).
SMEAR_STAIN_COLOUR_SD = 0.03
SMEAR_STAIN_INTENSITY_SD = 0.025

# Paper counts at scale 1.0 -------------------------------------------------------------------
#: Development cohort: label -> (cells, patients).
DEVELOPMENT_GROUPS: dict[str, tuple[int, int]] = {
    "covid_rl": (187, 18),
    "normal": (4928, 40),
    "classic_rl": (2340, 20),
}
ASSESSMENT_POSITIVE_PATIENTS = 58
ASSESSMENT_NEGATIVE_PATIENTS = 34
#: Table 5, RL-positive group: total cells, covid_rl cells, classic_rl cells, smears with classic_rl.
POSITIVE_TOTAL_CELLS, POSITIVE_COVID_CELLS = 1806, 132
POSITIVE_CLASSIC_CELLS, POSITIVE_SMEARS_WITH_CLASSIC = 70, 27
#: Table 5, RL-negative group: total cells, classic_rl cells, smears with classic_rl (1-4 each).
NEGATIVE_TOTAL_CELLS = 432
NEGATIVE_CLASSIC_CELLS, NEGATIVE_SMEARS_WITH_CLASSIC = 12, 6
NEGATIVE_MAX_CLASSIC_PER_SMEAR = 4

# Palette (RGB in [0, 1]) ----------------------------------------------------------------------
BACKGROUND_RGB = np.array([231, 221, 224], np.float32) / 255
RBC_BODY_RGB = np.array([218, 146, 146], np.float32) / 255
RBC_PALLOR_RGB = np.array([232, 190, 188], np.float32) / 255
CYTOPLASM_PALE_RGB = np.array([206, 208, 230], np.float32) / 255
CYTOPLASM_DEEP_RGB = np.array([92, 104, 182], np.float32) / 255
NUCLEUS_DARK_RGB = np.array([72, 38, 110], np.float32) / 255
NUCLEUS_LIGHT_RGB = np.array([152, 112, 178], np.float32) / 255
NUCLEOLUS_RGB = np.array([178, 150, 200], np.float32) / 255
VACUOLE_RGB = np.array([226, 226, 240], np.float32) / 255


@dataclass(frozen=True)
class CellSpec:
    """Everything needed to render one image; fully determined by ``plan_cohort``."""

    file_name: str  # relative to the images folder, e.g. "development/S0007/0003.jpg"
    label: str
    patient_id: str
    smear_id: str
    cohort: str
    site: str
    seed: int
    stain: tuple[float, float, float]  # RGB offset in [0, 1] units, shared by a smear


@dataclass(frozen=True)
class ClassAppearance:
    """Per-class feature distributions (means/sds of normals, Poisson rates, ranges).

    Lengths are in pixels at ``REFERENCE_SIZE``. The distributions overlap on purpose.
    """

    cell_radius: tuple[float, float]  # mean, sd
    nucleus_to_cell_radius: tuple[float, float]  # mean, sd (N/C ratio as a radius ratio)
    nucleus_eccentricity: tuple[float, float]  # mean, sd; 0 = centred, 1 = touching the edge
    nucleus_lightness: tuple[float, float]  # 0 = dark purple, 1 = light purple
    nucleus_irregularity: float  # amplitude of low-frequency outline harmonics
    cytoplasm_centre_basophilia: tuple[float, float]  # 0 = pale, 1 = deep blue
    cytoplasm_edge_basophilia: tuple[float, float]
    basophilic_rim_fraction: tuple[float, float]  # width of the edge gradient, fraction of radius
    outline_irregularity: float
    pressing_rbc_rate: float  # Poisson rate of RBCs that indent the outline
    press_depth_fraction: tuple[float, float]  # uniform range, fraction of the RBC radius
    vacuole_rate: float
    nucleolus_rate: float


APPEARANCES: dict[str, ClassAppearance] = {
    "normal": ClassAppearance(
        cell_radius=(55.0, 9.0),
        nucleus_to_cell_radius=(0.78, 0.08),
        nucleus_eccentricity=(0.30, 0.28),
        nucleus_lightness=(0.22, 0.16),
        nucleus_irregularity=0.03,
        cytoplasm_centre_basophilia=(0.33, 0.17),
        cytoplasm_edge_basophilia=(0.45, 0.17),
        basophilic_rim_fraction=(0.15, 0.05),
        outline_irregularity=0.025,
        pressing_rbc_rate=0.3,
        press_depth_fraction=(0.05, 0.25),
        vacuole_rate=0.15,
        nucleolus_rate=0.1,
    ),
    "classic_rl": ClassAppearance(
        cell_radius=(79.0, 14.0),
        nucleus_to_cell_radius=(0.58, 0.10),
        nucleus_eccentricity=(0.40, 0.28),
        nucleus_lightness=(0.45, 0.18),
        nucleus_irregularity=0.07,
        cytoplasm_centre_basophilia=(0.22, 0.16),
        cytoplasm_edge_basophilia=(0.70, 0.18),
        basophilic_rim_fraction=(0.22, 0.06),
        outline_irregularity=0.05,
        pressing_rbc_rate=2.0,
        press_depth_fraction=(0.10, 0.45),
        vacuole_rate=0.4,
        nucleolus_rate=0.4,
    ),
    "covid_rl": ClassAppearance(
        cell_radius=(67.0, 12.0),
        nucleus_to_cell_radius=(0.62, 0.10),
        nucleus_eccentricity=(0.62, 0.26),
        nucleus_lightness=(0.35, 0.18),
        nucleus_irregularity=0.05,
        cytoplasm_centre_basophilia=(0.58, 0.20),
        cytoplasm_edge_basophilia=(0.78, 0.16),
        basophilic_rim_fraction=(0.30, 0.08),
        outline_irregularity=0.035,
        pressing_rbc_rate=0.7,
        press_depth_fraction=(0.05, 0.35),
        vacuole_rate=1.2,
        nucleolus_rate=1.0,
    ),
}


# ---------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------


def _check_positive_finite(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise SmearnetError(f"Parameter `{name}` must be a finite number, got {value!r}.",
                            f"pass a positive number for `{name}`.")
    if value <= 0:
        raise SmearnetError(f"Parameter `{name}` must be > 0, got {value!r}.",
                            f"pass a positive number for `{name}`.")


def _check_int_at_least(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise SmearnetError(f"Parameter `{name}` must be an integer >= {minimum}, got {value!r}.",
                            f"pass an integer >= {minimum} for `{name}`.")


def _validate_stain_shift(stain_shift: Sequence[float]) -> tuple[float, float, float]:
    try:
        components = tuple(float(c) for c in stain_shift)
    except (TypeError, ValueError):
        components = ()
    if len(components) != 3 or not all(math.isfinite(c) and -1 <= c <= 1 for c in components):
        raise SmearnetError(f"Parameter `stain_shift` must be three numbers in [-1, 1], got {stain_shift!r}.",
                            "pass an (R, G, B) offset such as (0.2, -0.1, 0.0).")
    return components  # type: ignore[return-value]


def _site_entropy(site: str) -> int:
    """Stable integer from the site name, so two sites with the same seed get different patients."""
    return int.from_bytes(hashlib.sha256(site.encode("utf-8")).digest()[:8], "little")


def _scaled_patients(paper_patients: int, scale: float, minimum: int) -> int:
    return max(minimum, round(paper_patients * scale))


def _split_uneven(total: int, n_parts: int, rng: np.random.Generator, *,
                  minimum: int = 1, concentration: float = 2.0) -> np.ndarray:
    """Split ``total`` into ``n_parts`` integers >= ``minimum``, unevenly (Dirichlet-multinomial)."""
    total = max(total, minimum * n_parts)
    weights = rng.dirichlet(np.full(n_parts, concentration))
    return minimum + rng.multinomial(total - minimum * n_parts, weights)


def _spread_capped(extra: int, n_parts: int, cap: int, rng: np.random.Generator) -> np.ndarray:
    """Hand out ``extra`` units one at a time to random parts that are below ``cap``."""
    counts = np.zeros(n_parts, dtype=int)
    for _ in range(min(extra, n_parts * cap)):
        open_parts = np.flatnonzero(counts < cap)
        counts[rng.choice(open_parts)] += 1
    return counts


def _assessment_smear_mixes(n_positive: int, n_negative: int,
                            rng: np.random.Generator) -> list[dict[str, int]]:
    """Per-smear label counts for the assessment cohort (Table 5 means; totals scale with smears)."""
    mixes: list[dict[str, int]] = []

    # RL-positive smears: >= 1 covid_rl each; classic_rl in ~27/58 of them; the rest normal.
    covid_total = round(POSITIVE_COVID_CELLS * n_positive / ASSESSMENT_POSITIVE_PATIENTS)
    covid = _split_uneven(covid_total, n_positive, rng, minimum=1, concentration=1.5)
    n_with_classic = round(POSITIVE_SMEARS_WITH_CLASSIC * n_positive / ASSESSMENT_POSITIVE_PATIENTS)
    classic = np.zeros(n_positive, dtype=int)
    if n_with_classic:
        chosen = rng.choice(n_positive, size=n_with_classic, replace=False)
        classic_total = round(POSITIVE_CLASSIC_CELLS * n_with_classic / POSITIVE_SMEARS_WITH_CLASSIC)
        classic[chosen] = _split_uneven(classic_total, n_with_classic, rng, minimum=1, concentration=1.5)
    normal_total = round((POSITIVE_TOTAL_CELLS - POSITIVE_COVID_CELLS - POSITIVE_CLASSIC_CELLS)
                         * n_positive / ASSESSMENT_POSITIVE_PATIENTS)
    normal = _split_uneven(normal_total, n_positive, rng, minimum=1, concentration=3.0)
    for i in range(n_positive):
        mixes.append({"normal": int(normal[i]), "classic_rl": int(classic[i]), "covid_rl": int(covid[i])})

    # RL-negative smears: no covid_rl; classic_rl (1-4 each) in ~6/34 of them; the rest normal.
    n_with_classic = round(NEGATIVE_SMEARS_WITH_CLASSIC * n_negative / ASSESSMENT_NEGATIVE_PATIENTS)
    classic = np.zeros(n_negative, dtype=int)
    if n_with_classic:
        chosen = rng.choice(n_negative, size=n_with_classic, replace=False)
        classic_total = round(NEGATIVE_CLASSIC_CELLS * n_with_classic / NEGATIVE_SMEARS_WITH_CLASSIC)
        classic[chosen] = 1 + _spread_capped(classic_total - n_with_classic, n_with_classic,
                                             NEGATIVE_MAX_CLASSIC_PER_SMEAR - 1, rng)
    normal_total = round((NEGATIVE_TOTAL_CELLS - NEGATIVE_CLASSIC_CELLS)
                         * n_negative / ASSESSMENT_NEGATIVE_PATIENTS)
    normal = _split_uneven(normal_total, n_negative, rng, minimum=1, concentration=3.0)
    for i in range(n_negative):
        mixes.append({"normal": int(normal[i]), "classic_rl": int(classic[i]), "covid_rl": 0})
    return mixes


def plan_cohort(scale: float, seed: int, *, site: str = "hospital_a", id_prefix: str = "",
                stain_shift: Sequence[float] = (0.0, 0.0, 0.0), min_patients_per_group: int = 3,
                include_assessment: bool = True) -> list[CellSpec]:
    """Plan every cell of a cohort (no rendering): ids, labels, per-cell seeds, per-smear stains.

    Cell and patient counts are the paper's multiplied by ``scale`` (at least
    ``min_patients_per_group`` patients per group, at least one cell per patient). Assessment
    smears keep the paper's per-smear cell mix, so their totals scale with the number of smears.
    Patient/smear numbers are shuffled so an id's position says nothing about its class. The
    site name is mixed into the seed: two sites generated with the same seed get different cells.
    """
    _check_positive_finite("scale", scale)
    _check_int_at_least("seed", seed, 0)
    _check_int_at_least("min_patients_per_group", min_patients_per_group, 1)
    if not isinstance(site, str) or not site:
        raise SmearnetError(f"Parameter `site` must be a non-empty string, got {site!r}.",
                            "pass a site name such as 'hospital_a'.")
    if not isinstance(id_prefix, str) or "/" in id_prefix or "\\" in id_prefix:
        raise SmearnetError(f"Parameter `id_prefix` must be a string without path separators, got {id_prefix!r}.",
                            "pass a short prefix such as 'B'.")
    shift = np.asarray(_validate_stain_shift(stain_shift), np.float64) * STAIN_SHIFT_SCALE

    root = np.random.SeedSequence([seed, _site_entropy(site)])
    plan_seq, cell_seq = root.spawn(2)
    rng = np.random.default_rng(plan_seq)

    # Each smear: (cohort, label -> cell count). Development smears hold one class each.
    smears: list[tuple[str, dict[str, int]]] = []
    development: list[tuple[str, dict[str, int]]] = []
    for label, (paper_cells, paper_patients) in DEVELOPMENT_GROUPS.items():
        n_patients = _scaled_patients(paper_patients, scale, min_patients_per_group)
        per_patient = _split_uneven(round(paper_cells * scale), n_patients, rng)
        development += [(DEVELOPMENT, {label: int(n)}) for n in per_patient]
    smears += [development[i] for i in rng.permutation(len(development))]
    if include_assessment:
        n_positive = _scaled_patients(ASSESSMENT_POSITIVE_PATIENTS, scale, min_patients_per_group)
        n_negative = _scaled_patients(ASSESSMENT_NEGATIVE_PATIENTS, scale, min_patients_per_group)
        assessment = [(ASSESSMENT, mix) for mix in _assessment_smear_mixes(n_positive, n_negative, rng)]
        smears += [assessment[i] for i in rng.permutation(len(assessment))]

    specs: list[CellSpec] = []
    n_cells = sum(sum(mix.values()) for _, mix in smears)
    cell_seeds = [int(s.generate_state(1, np.uint64)[0]) for s in cell_seq.spawn(n_cells)]
    for smear_number, (cohort, mix) in enumerate(smears, start=1):
        patient_id = f"{id_prefix}P{smear_number:04d}"  # one smear per patient
        smear_id = f"{id_prefix}S{smear_number:04d}"
        stain_offset = (shift + rng.normal(0.0, SMEAR_STAIN_COLOUR_SD, 3)
                        + rng.normal(0.0, SMEAR_STAIN_INTENSITY_SD))
        red, green, blue = (round(float(v), 6) for v in stain_offset)
        stain = (red, green, blue)
        labels = [label for label in CLASSES for _ in range(mix.get(label, 0))]
        labels = [labels[i] for i in rng.permutation(len(labels))]  # index in smear hides label
        for cell_index, label in enumerate(labels):
            specs.append(CellSpec(
                file_name=f"{cohort}/{smear_id}/{cell_index:04d}.jpg",
                label=label, patient_id=patient_id, smear_id=smear_id, cohort=cohort,
                site=site, seed=cell_seeds[len(specs)], stain=stain,
            ))
    return specs


# ---------------------------------------------------------------------------------------------
# Rendering (colour arrays are channel-first, shape (3, rows, cols), floats in [0, 1])
# ---------------------------------------------------------------------------------------------


def _column(rgb: np.ndarray) -> np.ndarray:
    """An RGB triple shaped (3, 1, 1) to broadcast over channel-first images."""
    return rgb.reshape(3, 1, 1)


@functools.lru_cache(maxsize=4)
def _pixel_grid(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates (pixel centres) as read-only float32 arrays."""
    rows, cols = np.mgrid[0:image_size, 0:image_size].astype(np.float32)
    rows.flags.writeable = False
    cols.flags.writeable = False
    return rows, cols


@functools.lru_cache(maxsize=4)
def _vignette(image_size: int) -> np.ndarray:
    """Slight fall-off of the illumination towards the frame corners."""
    rows, cols = _pixel_grid(image_size)
    centre = (image_size - 1) / 2
    vignette = 1.0 - 0.05 * ((rows - centre) ** 2 + (cols - centre) ** 2) / image_size**2
    vignette.flags.writeable = False
    return vignette


def _box(centre_row: float, centre_col: float, reach: float, shape: tuple[int, int],
         origin: tuple[int, int] = (0, 0)) -> tuple[slice, slice] | None:
    """Index slices (relative to ``origin``) of the square of half-side ``reach`` clipped to ``shape``."""
    r0 = max(0, math.floor(centre_row - reach) - origin[0])
    r1 = min(shape[0], math.ceil(centre_row + reach) + 1 - origin[0])
    c0 = max(0, math.floor(centre_col - reach) - origin[1])
    c1 = min(shape[1], math.ceil(centre_col + reach) + 1 - origin[1])
    return (slice(r0, r1), slice(c0, c1)) if r0 < r1 and c0 < c1 else None


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) * (1.0 / (edge1 - edge0)), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _coverage(signed_distance: np.ndarray, softness: float) -> np.ndarray:
    """Anti-aliased coverage from a signed distance (positive inside)."""
    return _smoothstep(-softness, softness, signed_distance)


def _smooth_min(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Polynomial smooth minimum: rounds the corners where two outlines meet."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def _noise_field(rng: np.random.Generator, shape: tuple[int, int], feature_px: float) -> np.ndarray:
    """Smooth zero-mean noise (sd about 1) with blobs about ``feature_px`` pixels wide."""
    coarse = (max(2, round(shape[0] / feature_px) + 1), max(2, round(shape[1] / feature_px) + 1))
    field = Image.fromarray(rng.standard_normal(coarse).astype(np.float32), mode="F")
    return np.asarray(field.resize((shape[1], shape[0]), Image.BICUBIC), dtype=np.float32)


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a channel-first image (edges replicated)."""
    half = max(1, math.ceil(2.0 * sigma))  # truncated at 2 sigma: plenty for a slight blur
    taps = np.arange(-half, half + 1, dtype=np.float32)
    kernel = np.exp(-taps * taps / (2 * sigma * sigma))
    kernel /= kernel.sum()
    for axis in (1, 2):
        length = image.shape[axis]
        padding = [(0, 0), (0, 0), (0, 0)]
        padding[axis] = (half, half)
        padded = np.pad(image, padding, mode="edge")

        def shifted(offset: int) -> np.ndarray:  # padded, shifted by ``offset`` along ``axis``
            return padded[:, offset:offset + length] if axis == 1 else padded[:, :, offset:offset + length]

        blurred = shifted(half) * float(kernel[half])
        pair_sum = np.empty_like(blurred)
        for offset in range(half):  # symmetric kernel: weight each mirrored pair once
            np.add(shifted(offset), shifted(2 * half - offset), out=pair_sum)
            pair_sum *= float(kernel[offset])
            blurred += pair_sum
        image = blurred
    return image


def _draw(rng: np.random.Generator, mean_sd: tuple[float, float], low: float, high: float) -> float:
    return float(np.clip(rng.normal(*mean_sd), low, high))


def _outline_harmonics(rng: np.random.Generator, amplitude: float,
                       orders: Sequence[int] = (2, 3, 4, 5)) -> list[tuple[int, float, float]]:
    """Low-frequency (order, relative amplitude, phase) terms of an irregular round outline."""
    return [(k, amplitude * float(rng.normal()) * 2.0 / k, float(rng.uniform(0, 2 * np.pi))) for k in orders]


def _radius_profile(angle: np.ndarray, radius: float, harmonics: list[tuple[int, float, float]]) -> np.ndarray:
    profile = np.ones_like(angle)
    for order, amplitude, phase in harmonics:
        profile += amplitude * np.cos(order * angle + phase)
    return radius * profile


def _max_reach(radius: float, harmonics: list[tuple[int, float, float]]) -> float:
    return radius * (1.0 + sum(abs(amplitude) for _, amplitude, _ in harmonics))


@dataclass
class _Rbc:
    row: float
    col: float
    radius: float
    elongation: float  # 0 = circle
    tilt: float
    indents_cell: bool


def _place_rbcs(rng: np.random.Generator, image_size: int, scale_px: float, centre: tuple[float, float],
                cell_radius: float, appearance: ClassAppearance) -> list[_Rbc]:
    rbcs: list[_Rbc] = []
    # RBCs pressing into the cell outline (scalloping), spread around the cell.
    n_pressing = min(5, int(rng.poisson(appearance.pressing_rbc_rate)))
    start_angle = rng.uniform(0, 2 * np.pi)
    for i in range(n_pressing):
        radius = rng.normal(37.0, 2.5) * scale_px
        depth = rng.uniform(*appearance.press_depth_fraction) * radius
        angle = start_angle + i * 2 * np.pi / n_pressing + rng.normal(0, 0.25)
        distance = cell_radius + radius - depth
        rbcs.append(_Rbc(centre[0] + distance * math.sin(angle), centre[1] + distance * math.cos(angle),
                         radius, 0.0, 0.0, True))
    # Free RBCs around, allowed to touch each other and to leave the frame.
    n_free_target = int(rng.integers(5, 11))
    for _ in range(60):
        if len(rbcs) >= n_pressing + n_free_target:
            break
        radius = rng.normal(37.0, 2.5) * scale_px
        row, col = rng.uniform(-0.6 * radius, image_size + 0.6 * radius, 2)
        if math.hypot(row - centre[0], col - centre[1]) < cell_radius * 1.08 + radius:
            continue
        if any(math.hypot(row - r.row, col - r.col) < 1.7 * max(radius, r.radius) for r in rbcs):
            continue
        rbcs.append(_Rbc(row, col, radius, float(rng.uniform(0, 0.08)), float(rng.uniform(0, np.pi)), False))
    return rbcs


def _apply_rbc(transmittance: np.ndarray, rbc: _Rbc, scale_px: float) -> None:
    """Multiply one RBC's transmittance into ``transmittance`` (in place, bounding box only)."""
    image_size = transmittance.shape[1]
    box = _box(rbc.row, rbc.col, rbc.radius * (1 + rbc.elongation) + 3, (image_size, image_size))
    if box is None:
        return
    rows, cols = _pixel_grid(image_size)
    d_row, d_col = rows[box] - rbc.row, cols[box] - rbc.col
    cos_t, sin_t = math.cos(rbc.tilt), math.sin(rbc.tilt)
    u = (d_col * cos_t + d_row * sin_t) * (1.0 / (1 + rbc.elongation))
    v = (d_row * cos_t - d_col * sin_t) * (1.0 / (1 - rbc.elongation))
    normalised_radius = np.sqrt(u * u + v * v) * (1.0 / rbc.radius)
    alpha = _coverage((1.0 - normalised_radius) * rbc.radius, 1.0 * scale_px)
    body = _smoothstep(0.15, 0.75, normalised_radius)
    rim = 1.0 - 0.07 * np.exp(-(((normalised_radius - 0.9) * (1 / 0.08)) ** 2))
    pallor_layer = _column(RBC_PALLOR_RGB / BACKGROUND_RGB)
    body_layer = _column(RBC_BODY_RGB / BACKGROUND_RGB)
    layer = (pallor_layer + (body_layer - pallor_layer) * body) * rim
    transmittance[:, box[0], box[1]] *= 1.0 - alpha * (1.0 - np.minimum(layer, 1.0))


def _paint_disc(target: np.ndarray, colour: np.ndarray, strength: float, row: float, col: float, radius: float,
                softness: float, origin: tuple[int, int]) -> None:
    """Blend ``colour`` into a channel-first ``target`` over a soft disc (global coordinates)."""
    box = _box(row, col, radius + softness + 1, target.shape[1:], origin)
    if box is None:
        return
    rows, cols = _pixel_grid(max(target.shape[1] + origin[0], target.shape[2] + origin[1]))
    global_box = (slice(box[0].start + origin[0], box[0].stop + origin[0]),
                  slice(box[1].start + origin[1], box[1].stop + origin[1]))
    distance = np.sqrt((rows[global_box] - row) ** 2 + (cols[global_box] - col) ** 2)
    alpha = strength * _coverage(radius - distance, softness)
    region = target[:, box[0], box[1]]
    region += (_column(colour) - region) * alpha


def render_cell(spec: CellSpec, image_size: int = REFERENCE_SIZE) -> np.ndarray:
    """Render one image (``image_size`` x ``image_size`` x 3, uint8), deterministic from ``spec``.

    Randomness comes only from ``spec.seed`` (morphology, RBCs, blur, noise) and ``spec.stain``.
    JPEG compression is applied by ``generate_cohort`` when saving, not here.
    """
    if spec.label not in APPEARANCES:
        raise SmearnetError(f"Unknown cell label {spec.label!r}.", f"use one of {', '.join(CLASSES)}.")
    _check_int_at_least("image_size", image_size, 32)
    appearance = APPEARANCES[spec.label]
    rng = np.random.default_rng(spec.seed)
    scale_px = image_size / REFERENCE_SIZE
    frame = (image_size, image_size)
    rows, cols = _pixel_grid(image_size)

    # --- Cell outline (computed inside the cell's bounding box only) ----------------------------
    centre = (image_size / 2 + rng.normal(0, 3) * scale_px, image_size / 2 + rng.normal(0, 3) * scale_px)
    cell_radius = _draw(rng, appearance.cell_radius, 38, 110) * scale_px
    cell_harmonics = _outline_harmonics(rng, appearance.outline_irregularity)
    cell_box = _box(*centre, _max_reach(cell_radius, cell_harmonics) + 3 * scale_px, frame)
    assert cell_box is not None  # the cell is centred
    origin = (cell_box[0].start, cell_box[1].start)
    box_rows, box_cols = rows[cell_box], cols[cell_box]
    d_row, d_col = box_rows - centre[0], box_cols - centre[1]
    cell_depth = (_radius_profile(np.arctan2(d_row, d_col), cell_radius, cell_harmonics)
                  - np.sqrt(d_row * d_row + d_col * d_col))  # > 0 inside the cell

    rbcs = _place_rbcs(rng, image_size, scale_px, centre, cell_radius, appearance)
    for rbc in rbcs:
        if rbc.indents_cell:  # the cell wraps around the RBC, keeping a small gap
            outside_rbc = (np.sqrt((box_rows - rbc.row) ** 2 + (box_cols - rbc.col) ** 2)
                           - (rbc.radius + 2.0 * scale_px))
            cell_depth = _smooth_min(cell_depth, outside_rbc, 6.0 * scale_px)
    cell_alpha = _coverage(cell_depth, 1.2 * scale_px)

    # --- Cytoplasm: from the edge's basophilia to the centre's, faint texture ------------------
    centre_basophilia = _draw(rng, appearance.cytoplasm_centre_basophilia, 0, 1)
    edge_basophilia = _draw(rng, appearance.cytoplasm_edge_basophilia, 0, 1)
    rim_width = _draw(rng, appearance.basophilic_rim_fraction, 0.05, 0.6) * cell_radius
    basophilia = edge_basophilia + (centre_basophilia - edge_basophilia) * _smoothstep(0.0, rim_width, cell_depth)
    basophilia += 0.05 * _noise_field(rng, cell_depth.shape, 14 * scale_px)
    pale, deep = _column(CYTOPLASM_PALE_RGB), _column(CYTOPLASM_DEEP_RGB)
    cell_rgb = pale + (deep - pale) * np.clip(basophilia, 0.0, 1.0)

    # --- Nucleus geometry ------------------------------------------------------------------------
    nucleus_radius = _draw(rng, appearance.nucleus_to_cell_radius, 0.4, 0.92) * cell_radius
    eccentricity = _draw(rng, appearance.nucleus_eccentricity, 0, 1)
    offset = eccentricity * max(0.0, cell_radius - nucleus_radius - 3 * scale_px)
    offset_angle = rng.uniform(0, 2 * np.pi)
    nucleus_centre = (centre[0] + offset * math.sin(offset_angle), centre[1] + offset * math.cos(offset_angle))
    n_row, n_col = box_rows - nucleus_centre[0], box_cols - nucleus_centre[1]
    nucleus_depth = (_radius_profile(np.arctan2(n_row, n_col), nucleus_radius,
                                     _outline_harmonics(rng, appearance.nucleus_irregularity))
                     - np.sqrt(n_row * n_row + n_col * n_col))
    nucleus_depth = np.minimum(nucleus_depth, cell_depth - 2.5 * scale_px)
    nucleus_alpha = _coverage(nucleus_depth, 1.0 * scale_px)

    # Vacuoles: light round spots in the cytoplasm, away from the nucleus and the edge.
    n_vacuoles = min(int(rng.poisson(appearance.vacuole_rate)), 8)
    for _ in range(n_vacuoles * 6):  # a few placement attempts per vacuole
        if n_vacuoles == 0:
            break
        radius = rng.uniform(2.5, 6.0) * scale_px
        where, reach = rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 0.85) * cell_radius
        v_row, v_col = centre[0] + reach * math.sin(where), centre[1] + reach * math.cos(where)
        near_nucleus = math.hypot(v_row - nucleus_centre[0], v_col - nucleus_centre[1]) < (
            nucleus_radius + radius + 2 * scale_px)
        if near_nucleus or reach + radius > cell_radius - 3 * scale_px:
            continue
        _paint_disc(cell_rgb, VACUOLE_RGB, 0.85, v_row, v_col, radius, 1.5 * scale_px, origin)
        n_vacuoles -= 1

    # --- Nucleus colour: purple with chromatin clumps and a darker membrane; paler nucleoli -----
    lightness = _draw(rng, appearance.nucleus_lightness, 0, 1)
    nucleus_base = NUCLEUS_DARK_RGB + (NUCLEUS_LIGHT_RGB - NUCLEUS_DARK_RGB) * lightness
    shading = (1.0 + 0.10 * _noise_field(rng, cell_depth.shape, 7 * scale_px)) * (
        0.9 + 0.1 * _smoothstep(0.0, 4.0 * scale_px, nucleus_depth))
    nucleus_rgb = _column(nucleus_base) * shading
    for _ in range(min(int(rng.poisson(appearance.nucleolus_rate)), 3)):
        radius = rng.uniform(0.10, 0.18) * nucleus_radius
        where, reach = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.5) * nucleus_radius
        _paint_disc(nucleus_rgb, NUCLEOLUS_RGB, 0.7, nucleus_centre[0] + reach * math.sin(where),
                    nucleus_centre[1] + reach * math.cos(where), radius, 2.5 * scale_px, origin)
    cell_rgb += (nucleus_rgb - cell_rgb) * nucleus_alpha

    # --- Compose: illumination x RBC transmittance x cell transmittance --------------------------
    transmittance = np.ones((3, image_size, image_size), np.float32)
    for rbc in rbcs:
        _apply_rbc(transmittance, rbc, scale_px)
    cell_layer = np.minimum(cell_rgb / _column(BACKGROUND_RGB), 1.0)
    transmittance[:, cell_box[0], cell_box[1]] *= 1.0 - cell_alpha * (1.0 - cell_layer)
    illumination = _vignette(image_size) + 0.012 * _noise_field(rng, frame, 90 * scale_px)
    image = transmittance * (_column(BACKGROUND_RGB) * illumination)

    # Per-smear stain offset, stronger where there is more stain.
    stain_weight = 0.35 + 0.65 * (1.0 - transmittance.mean(axis=0))
    image += _column(np.asarray(spec.stain, np.float32)) * stain_weight

    # --- Optics and sensor: slight blur, then noise (triangular, from random bytes) -------------
    image = _gaussian_blur(image, float(rng.uniform(0.4, 1.0)) * scale_px)
    noise_bytes = np.frombuffer(rng.bytes(2 * image.size), np.uint8).reshape(2, *image.shape)
    noise_sd = float(rng.uniform(1.0, 3.0))
    image = image * 255.0 + 0.5
    image += (noise_bytes[0].astype(np.float32) + noise_bytes[1] - 255.0) * (noise_sd / 104.5)
    return np.ascontiguousarray(np.clip(image, 0, 255).astype(np.uint8).transpose(1, 2, 0))


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


def _encode_jpeg(pixels: np.ndarray, jpeg_quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="JPEG", quality=jpeg_quality,
                                             subsampling="4:2:0", optimize=False)
    return buffer.getvalue()


def _render_and_save(spec: CellSpec, images_dir: str, image_size: int, jpeg_quality: int) -> str:
    target = Path(images_dir) / spec.file_name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(_encode_jpeg(render_cell(spec, image_size), jpeg_quality))
    return spec.file_name


def _render_all(specs: list[CellSpec], images_dir: Path, workers: int, image_size: int,
                jpeg_quality: int) -> Iterator[str]:
    job = functools.partial(_render_and_save, images_dir=str(images_dir), image_size=image_size,
                            jpeg_quality=jpeg_quality)
    if workers == 1:
        yield from map(job, specs)
        return
    chunk_size = max(1, min(64, len(specs) // (workers * 8)))
    with multiprocessing.get_context().Pool(workers) as pool:
        yield from pool.imap(job, specs, chunksize=chunk_size)


def manifest_frame(specs: Sequence[CellSpec]) -> pd.DataFrame:
    """The manifest rows for ``specs`` (paths relative to the manifest's folder)."""
    return pd.DataFrame(
        [(f"images/{s.file_name}", s.label, s.patient_id, s.smear_id, s.site, s.cohort) for s in specs],
        columns=list(MANIFEST_COLUMNS),
    )


def generate_cohort(out_dir: Path, scale: float, seed: int, *, workers: int = 2, image_size: int = REFERENCE_SIZE,
                    jpeg_quality: int = 90, progress: bool = True, **plan_kwargs: Any) -> pd.DataFrame:
    """Render a planned cohort to ``out_dir/images/...jpg`` plus ``out_dir/manifest.csv``.

    Output is byte-identical for any ``workers``. Everything is written into a temporary folder
    next to ``out_dir`` and moved into place at the end, so an interrupted run leaves no
    half-written ``out_dir``; an existing ``out_dir`` is replaced. Returns the manifest.
    """
    _check_positive_finite("scale", scale)
    _check_int_at_least("workers", workers, 1)
    _check_int_at_least("image_size", image_size, 32)
    _check_int_at_least("jpeg_quality", jpeg_quality, 1)
    if jpeg_quality > 100:
        raise SmearnetError(f"Parameter `jpeg_quality` must be in 1..100, got {jpeg_quality!r}.",
                            "pass a JPEG quality such as 90.")
    specs = plan_cohort(scale, seed, **plan_kwargs)

    with atomic_directory(Path(out_dir).resolve()) as staging:
        images_dir = staging / "images"
        images_dir.mkdir()
        rendered = _render_all(specs, images_dir, workers, image_size, jpeg_quality)
        for _ in tqdm(rendered, total=len(specs), disable=not progress, desc="synthetic cells", unit="img"):
            pass
        manifest = manifest_frame(specs)
        manifest.to_csv(staging / "manifest.csv", index=False, lineterminator="\n")
    return manifest
