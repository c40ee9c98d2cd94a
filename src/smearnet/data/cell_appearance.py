"""What a synthetic cell looks like: the classes, the stain palette, per-class feature distributions, one cell's spec.

`smearnet.data.cell_render` draws from these; `smearnet.data.synthetic` plans a cohort of ``CellSpec``s.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CLASSES: tuple[str, ...] = ("normal", "classic_rl", "covid_rl")

#: Reference image size; all geometry below is in pixels at this size and rescaled otherwise.
REFERENCE_SIZE = 363

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
