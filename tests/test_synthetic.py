"""Tests for the synthetic blood-smear cohort generator."""

from __future__ import annotations

import hashlib
import math
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from smearnet.data import synthetic
from smearnet.errors import SmearnetError
from smearnet.data.cell_appearance import CLASSES, CellSpec
from smearnet.data.cell_render import render_cell
from smearnet.data.synthetic import generate_cohort, plan_cohort

TINY_SCALE = 0.005  # development only: 3 + 25 + 12 cells


def _file_hashes(out_dir: Path) -> dict[str, str]:
    return {
        str(path.relative_to(out_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(out_dir.rglob("*")) if path.is_file()
    }


def _generate(out_dir: Path, seed: int, workers: int) -> pd.DataFrame:
    return generate_cohort(out_dir, TINY_SCALE, seed, workers=workers, progress=False, include_assessment=False)


def _specs_of(label: str, count: int, seed: int = 11) -> list[CellSpec]:
    specs = [s for s in plan_cohort(0.02, seed, include_assessment=False) if s.label == label]
    return specs[:count]


def _smears(specs: list[CellSpec], cohort: str) -> dict[str, Counter[str]]:
    mixes: dict[str, Counter[str]] = defaultdict(Counter)
    for spec in specs:
        if spec.cohort == cohort:
            mixes[spec.smear_id][spec.label] += 1
    return mixes


# --- determinism ----------------------------------------------------------------------------------


def test_same_seed_is_byte_identical_for_any_worker_count(tmp_path: Path) -> None:
    manifest_one = _generate(tmp_path / "one", seed=7, workers=1)
    manifest_two = _generate(tmp_path / "two", seed=7, workers=2)
    pd.testing.assert_frame_equal(manifest_one, manifest_two)
    hashes_one, hashes_two = _file_hashes(tmp_path / "one"), _file_hashes(tmp_path / "two")
    assert len(hashes_one) == len(manifest_one) + 1  # images + manifest.csv
    assert hashes_one == hashes_two


def test_different_seed_gives_different_cohort(tmp_path: Path) -> None:
    _generate(tmp_path / "a", seed=7, workers=1)
    _generate(tmp_path / "b", seed=8, workers=1)
    images_a = {h for name, h in _file_hashes(tmp_path / "a").items() if name.endswith(".jpg")}
    images_b = {h for name, h in _file_hashes(tmp_path / "b").items() if name.endswith(".jpg")}
    assert not images_a & images_b


def test_render_cell_is_deterministic() -> None:
    spec = _specs_of("covid_rl", 1)[0]
    assert np.array_equal(render_cell(spec), render_cell(spec))


# --- cohort structure -------------------------------------------------------------------------------


def test_development_groups_have_min_patients_and_one_class_per_patient() -> None:
    specs = plan_cohort(0.02, seed=3, min_patients_per_group=3)
    labels_by_patient: dict[str, set[str]] = defaultdict(set)
    for spec in specs:
        if spec.cohort == "development":
            labels_by_patient[spec.patient_id].add(spec.label)
    assert all(len(labels) == 1 for labels in labels_by_patient.values())
    patients_per_class = Counter(next(iter(labels)) for labels in labels_by_patient.values())
    assert set(patients_per_class) == set(CLASSES)
    assert all(n >= 3 for n in patients_per_class.values())
    smears_per_patient = Counter(s.patient_id for s in {(s.patient_id, s.smear_id): s for s in specs}.values())
    assert set(smears_per_patient.values()) == {1}


def test_assessment_has_positive_and_negative_smears() -> None:
    specs = plan_cohort(0.02, seed=3)
    mixes = _smears(specs, "assessment")
    positive = [mix for mix in mixes.values() if mix["covid_rl"] >= 1]
    negative = [mix for mix in mixes.values() if mix["covid_rl"] == 0]
    assert len(positive) == 3 and len(negative) == 3  # scaled counts round to 1, so the minimum applies
    assert all(sum(mix.values()) >= 1 for mix in mixes.values())
    assert all(mix["classic_rl"] <= 4 for mix in negative)


def test_full_scale_plan_matches_the_paper() -> None:
    specs = plan_cohort(1.0, seed=0)
    development = Counter(s.label for s in specs if s.cohort == "development")
    assert development == {"covid_rl": 187, "normal": 4928, "classic_rl": 2340}
    dev_patient_labels = {(s.patient_id, s.label) for s in specs if s.cohort == "development"}
    dev_patients = Counter(label for _, label in dev_patient_labels)
    assert dev_patients == {"covid_rl": 18, "normal": 40, "classic_rl": 20}

    mixes = _smears(specs, "assessment")
    positive = [mix for mix in mixes.values() if mix["covid_rl"] >= 1]
    negative = [mix for mix in mixes.values() if mix["covid_rl"] == 0]
    assert (len(positive), len(negative)) == (58, 34)
    assert sum(sum(m.values()) for m in positive) == pytest.approx(1806, rel=0.15)
    assert sum(sum(m.values()) for m in negative) == pytest.approx(432, rel=0.15)
    assert sum(m["covid_rl"] for m in positive) == pytest.approx(132, rel=0.15)
    assert sum(m["classic_rl"] for m in positive) == pytest.approx(70, rel=0.15)
    assert sum(1 for m in positive if m["classic_rl"]) == 27
    assert sum(1 for m in negative if m["classic_rl"]) == 6
    assert sum(m["classic_rl"] for m in negative) == 12
    assert len({s.patient_id for s in specs}) == 78 + 92


@pytest.mark.parametrize("scale", [0.1, 0.25])
def test_class_counts_scale_with_scale(scale: float) -> None:
    development = Counter(s.label for s in plan_cohort(scale, seed=1, include_assessment=False))
    assert development == {
        label: round(cells * scale) for label, (cells, _) in synthetic.DEVELOPMENT_GROUPS.items()
    }


def test_ids_prefix_site_and_stain_shift() -> None:
    plain = plan_cohort(0.02, seed=5)
    shifted = plan_cohort(0.02, seed=5, stain_shift=(0.5, 0.0, -0.5))
    assert [s.seed for s in plain] == [s.seed for s in shifted]
    delta = np.array(shifted[0].stain) - np.array(plain[0].stain)
    assert delta == pytest.approx([0.5 * synthetic.STAIN_SHIFT_SCALE, 0.0, -0.5 * synthetic.STAIN_SHIFT_SCALE])
    reds = [render_cell(spec)[..., 0].mean() for spec in (plain[0], shifted[0])]
    assert reds[1] > reds[0] + 5

    other_site = plan_cohort(0.02, seed=5, site="hospital_b", id_prefix="B")
    assert all(s.patient_id.startswith("BP") and s.smear_id.startswith("BS") for s in other_site)
    assert {s.site for s in other_site} == {"hospital_b"}
    assert not {s.seed for s in plain} & {s.seed for s in other_site}


def test_file_names_leak_neither_label_nor_patient() -> None:
    for spec in plan_cohort(0.02, seed=2, id_prefix="X"):
        assert spec.patient_id not in spec.file_name
        assert not any(label in spec.file_name for label in CLASSES)
        assert "XP" not in spec.file_name  # no patient id, not even a different patient's


# --- images -------------------------------------------------------------------------------------------


def test_image_shape_and_centred_cell() -> None:
    centre_minus_corner_luminance, centre_minus_corner_blueness = [], []
    for label in CLASSES:
        for spec in _specs_of(label, 2):
            image = render_cell(spec)
            assert image.shape == (363, 363, 3) and image.dtype == np.uint8
            pixels = image.astype(float)
            centre = pixels[161:202, 161:202].reshape(-1, 3)
            corners = np.concatenate([pixels[:30, :30], pixels[:30, -30:], pixels[-30:, :30], pixels[-30:, -30:]])
            corners = corners.reshape(-1, 3)
            centre_minus_corner_luminance.append(centre.mean() - corners.mean())
            blueness = lambda p: (p[:, 2] - p[:, 0]).mean()  # noqa: E731
            centre_minus_corner_blueness.append(blueness(centre) - blueness(corners))
    assert np.mean(centre_minus_corner_luminance) < -40
    assert np.mean(centre_minus_corner_blueness) > 20
    assert max(centre_minus_corner_luminance) < 0


def test_covid_rl_is_bluer_than_normal_and_classic_rl_is_larger() -> None:
    def central_blueness(spec: CellSpec) -> float:
        pixels = render_cell(spec).astype(float)
        rows, cols = np.mgrid[0:363, 0:363]
        disc = (rows - 181) ** 2 + (cols - 181) ** 2 < 45**2
        return float((pixels[..., 2] - pixels[..., 0])[disc].mean())

    def stained_area(spec: CellSpec) -> float:  # white-cell pixels: clearly bluer than red
        pixels = render_cell(spec).astype(float)
        return float(np.mean(pixels[..., 2] - pixels[..., 0] > 15))

    blueness = {label: np.mean([central_blueness(s) for s in _specs_of(label, 6)]) for label in CLASSES}
    area = {label: np.mean([stained_area(s) for s in _specs_of(label, 6)]) for label in CLASSES}
    assert blueness["covid_rl"] > blueness["normal"] + 5
    assert area["classic_rl"] > area["normal"]


def test_render_cell_smaller_image_size() -> None:
    image = render_cell(_specs_of("classic_rl", 1)[0], image_size=96)
    assert image.shape == (96, 96, 3)


# --- generation outputs ------------------------------------------------------------------------------


def test_manifest_is_relative_and_resolves(tmp_path: Path) -> None:
    out_dir = tmp_path / "cohort"
    manifest = generate_cohort(out_dir, 0.003, seed=1, workers=1, progress=False, image_size=64,
                               min_patients_per_group=1)
    assert list(manifest.columns) == ["path", "label", "patient_id", "smear_id", "site", "cohort"]
    pd.testing.assert_frame_equal(pd.read_csv(out_dir / "manifest.csv"), manifest)
    assert set(manifest["cohort"]) == {"development", "assessment"}
    assert set(manifest["label"]) <= set(CLASSES)
    for path in manifest["path"]:
        assert not Path(path).is_absolute() and path.startswith("images/")
        assert (out_dir / path).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort"]  # no staging left behind


def test_existing_output_is_replaced_and_failures_leave_nothing(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    out_dir = tmp_path / "cohort"
    (out_dir / "images").mkdir(parents=True)
    (out_dir / "stale.txt").write_text("old")
    generate_cohort(out_dir, 0.003, seed=1, workers=1, progress=False, image_size=64,
                    min_patients_per_group=1, include_assessment=False)
    assert not (out_dir / "stale.txt").exists() and (out_dir / "manifest.csv").is_file()

    def broken_render(spec: CellSpec, image_size: int = 363) -> np.ndarray:
        raise RuntimeError("boom")

    monkeypatch.setattr(synthetic, "render_cell", broken_render)
    with pytest.raises(RuntimeError):
        generate_cohort(tmp_path / "new", 0.003, seed=1, workers=1, progress=False, min_patients_per_group=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort"]


# --- validation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0, -0.5, math.nan, math.inf, "1"])
def test_bad_scale_is_rejected(scale: object, tmp_path: Path) -> None:
    with pytest.raises(SmearnetError, match="scale"):
        plan_cohort(scale, seed=0)  # type: ignore[arg-type]
    with pytest.raises(SmearnetError, match="scale"):
        generate_cohort(tmp_path / "out", scale, seed=0, progress=False)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [
        ({"workers": 0}, "workers"),
        ({"image_size": 8}, "image_size"),
        ({"jpeg_quality": 101}, "jpeg_quality"),
        ({"min_patients_per_group": 0}, "min_patients_per_group"),
        ({"stain_shift": (2.0, 0.0, 0.0)}, "stain_shift"),
        ({"stain_shift": (0.1, 0.2)}, "stain_shift"),
        ({"id_prefix": "a/b"}, "id_prefix"),
    ],
)
def test_bad_parameters_name_the_parameter(kwargs: dict, parameter: str, tmp_path: Path) -> None:
    with pytest.raises(SmearnetError, match=parameter):
        generate_cohort(tmp_path / "out", 0.01, seed=0, progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_bad_seed_is_rejected() -> None:
    with pytest.raises(SmearnetError, match="seed"):
        plan_cohort(0.01, seed=-1)
