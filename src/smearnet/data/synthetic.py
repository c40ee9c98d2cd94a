"""Deterministic synthetic cohort of single-lymphocyte blood-smear images: the plan and its generation.

The cohort structure follows the paper: a *development* cohort (one class per patient, one
smear per patient) and an *assessment* cohort of RL-positive and RL-negative smears with the
per-smear cell mix of the paper's Table 5. ``plan_cohort`` decides everything (ids, labels,
per-cell seeds, per-smear stain) without rendering; `smearnet.data.cell_render.render_cell` turns
one ``CellSpec`` into pixels; ``generate_cohort`` renders a whole plan to JPEG files plus ``manifest.csv``.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import multiprocessing
import numbers
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from smearnet.data.cell_appearance import CLASSES, REFERENCE_SIZE, CellSpec
from smearnet.data.cell_render import check_int_at_least, render_cell
from smearnet.errors import SmearnetError
from smearnet.io import atomic_directory

MANIFEST_COLUMNS: tuple[str, ...] = ("path", "label", "patient_id", "smear_id", "site", "cohort")
DEVELOPMENT = "development"
ASSESSMENT = "assessment"

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


def _check_positive_finite(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise SmearnetError(f"Parameter `{name}` must be a finite number, got {value!r}.",
                            f"pass a positive number for `{name}`.")
    if value <= 0:
        raise SmearnetError(f"Parameter `{name}` must be > 0, got {value!r}.",
                            f"pass a positive number for `{name}`.")


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
    check_int_at_least("seed", seed, 0)
    check_int_at_least("min_patients_per_group", min_patients_per_group, 1)
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
    check_int_at_least("workers", workers, 1)
    check_int_at_least("image_size", image_size, 32)
    check_int_at_least("jpeg_quality", jpeg_quality, 1)
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
