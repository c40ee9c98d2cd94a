"""Render one synthetic blood-smear image from a ``CellSpec``: the drawing half of `smearnet.data.synthetic`.

Each image imitates a CellaVision DM96 capture stained with May Grünwald-Giemsa: a pale
pinkish-grey background, pink red blood cells (RBCs) with paler centres, and one centred
lymphocyte of class ``normal``, ``classic_rl`` (classic reactive lymphocyte) or ``covid_rl``
(COVID-19 reactive lymphocyte). Every morphological feature is drawn from overlapping per-class
distributions, so the classes are learnable but not trivially separable.

Optics are modelled multiplicatively (brightfield transmission): the image is the illumination
times the transmittance of every layer, so overlapping RBCs darken like real ones. Colour arrays
are channel-first, shape (3, rows, cols), floats in [0, 1]. The classes, palette and per-class
distributions live in `smearnet.data.cell_appearance`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from smearnet.data.cell_appearance import (APPEARANCES, BACKGROUND_RGB, CLASSES, CYTOPLASM_DEEP_RGB,
                                           CYTOPLASM_PALE_RGB, NUCLEOLUS_RGB, NUCLEUS_DARK_RGB, NUCLEUS_LIGHT_RGB,
                                           RBC_BODY_RGB, RBC_PALLOR_RGB, REFERENCE_SIZE, VACUOLE_RGB, CellSpec,
                                           ClassAppearance)
from smearnet.errors import SmearnetError

def check_int_at_least(name: str, value: int, minimum: int) -> None:
    """Raise SmearnetError naming the parameter unless ``value`` is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise SmearnetError(f"Parameter `{name}` must be an integer >= {minimum}, got {value!r}.",
                            f"pass an integer >= {minimum} for `{name}`.")


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
    check_int_at_least("image_size", image_size, 32)
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
