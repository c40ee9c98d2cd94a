import pytest

from conftest import colour_cells
from smearnet.evaluation.benchmark import PeakMemory, benchmark_model, markdown_table, select_model, selection_cells
from smearnet.errors import SmearnetError
from smearnet.models.engines import EngineSpec
from smearnet.models.inference import TrainedModel, with_engine
from smearnet.models.factory import build_model, model_input_spec

CFG = {"name": "tiny", "arch": "lightcnn", "input_size": [80, 100], "pretrained": False, "weights_path": None,
       "allow_random_init": True}


@pytest.fixture
def tiny_model():
    net = build_model(CFG, num_classes=2).eval()
    return TrainedModel(net=net, name="tiny", classes=["a", "b"], input_spec=model_input_spec(CFG),
                        meta={"model_cfg": CFG})


def test_benchmark_row_names_device_precision_time_memory(tiny_model, tmp_path):
    manifest = colour_cells(tmp_path, ["a", "b"] * 5, [f"p{i}" for i in range(10)], size=64)
    row = benchmark_model(tiny_model, manifest, warmup=1, repeats=2)
    assert row["device"].startswith("cpu") and row["precision"] == "fp32" and row["images"] == 10
    assert row["engine"] == "eager" and row["preprocess_ms_per_image"] > 0
    # total_seconds is rounded to 1 ms, so over 10 images ms_per_image may differ from it by up to 0.05 ms.
    assert row["total_seconds"] > 0
    assert row["ms_per_image"] == pytest.approx(1000 * row["total_seconds"] / 10, rel=1e-2, abs=0.051)
    assert row["peak_memory_mb"] >= 0 and row["memory_kind"] == "process_rss_increase"
    assert 0.0 <= row["accuracy"] <= 1.0 and row["input_size"] == "80x100"
    bf16_model = with_engine(tiny_model, EngineSpec(precision="bf16", channels_last=True, batch_size=4))
    bf16 = benchmark_model(bf16_model, manifest, warmup=0, repeats=1, reference=row["probabilities"])
    assert bf16["precision"] == "bf16" and bf16["channels_last"] and bf16["batch_size"] == 4
    assert 0.5 <= bf16["agreement"] <= 1.0 and 0 < bf16["max_probability_difference"] < 0.1


def test_peak_memory_sees_an_allocation():
    import numpy as np

    with PeakMemory() as memory:
        block = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MB, touched
        block[::4096] = 2
        import time
        time.sleep(0.05)
    assert memory.peak_mb > 40


def test_selection_highest_accuracy_then_shorter_time():
    rows = [{"model": "a", "accuracy": 0.9, "total_seconds": 5.0}, {"model": "b", "accuracy": 0.95, "total_seconds": 9.0},
            {"model": "c", "accuracy": 0.95, "total_seconds": 3.0}]
    name, reason = select_model(rows)
    assert name == "c" and "tied" in reason and "b" in reason
    assert select_model(rows[:2])[0] == "b"
    with pytest.raises(SmearnetError):
        select_model([])
    with pytest.raises(SmearnetError, match="select_by"):
        select_model(rows, "fastest")


def test_backbones_are_compared_and_selected_on_validation_cells_never_on_test():
    import pandas as pd

    split = pd.DataFrame({"path": [f"c{i}" for i in range(10)],
                          "split": ["train", "val", "test", "val", "test", "assessment", "val", "test", "val", "train"]})
    assert selection_cells(split)["path"].tolist() == ["c1", "c3", "c6", "c8"]
    assert selection_cells(split, max_images=2)["path"].tolist() == ["c1", "c3"]
    with pytest.raises(SmearnetError, match="no validation cells"):
        selection_cells(split[split["split"] != "val"])
    rows = [{"model": "a", "accuracy": 0.9, "total_seconds": 1.0}, {"model": "b", "accuracy": 0.8, "total_seconds": 1.0}]
    assert "validation accuracy 0.9000" in select_model(rows)[1]


def test_markdown_table_has_header_and_rows():
    text = markdown_table([{"model": "a", "accuracy": 0.9}], ["model", "accuracy"])
    assert text.splitlines() == ["| model | accuracy |", "|---|---|", "| a | 0.9 |"]


INFERENCE = {"engine": "eager", "precision": "bf16", "channels_last": True, "batch_size": 8, "tta": False,
             "cache_dir": ".cache/engines", "calibration_images": 64}
BENCHMARK = {"engines": [], "warmup": 0, "repeats": 1, "max_images": None, "select_by": "accuracy_then_time"}


def test_benchmark_settings_time_eager_fp32_then_extra_engines_then_the_configured_one():
    from pathlib import Path

    from smearnet.evaluation.benchmark import BenchmarkSettings

    extra = [{"engine": "eager", "precision": "bf16"}, {"engine": "onnxruntime", "precision": "fp32", "batch_size": 4},
             {"engine": "eager", "precision": "bf16", "channels_last": True}]  # the last one is the configured one
    settings = BenchmarkSettings.from_params({**BENCHMARK, "engines": extra, "max_images": 50}, INFERENCE, seed=3)
    assert settings.specs == [EngineSpec(batch_size=8), EngineSpec(precision="bf16", batch_size=8),
                              EngineSpec(engine="onnxruntime", batch_size=4),
                              EngineSpec(precision="bf16", channels_last=True, batch_size=8)]
    assert settings.inference == settings.specs[-1] and settings.max_images == 50
    assert (settings.cache_dir, settings.calibration_images, settings.seed) == (Path(".cache/engines"), 64, 3)
    with pytest.raises(AttributeError):
        settings.repeats = 5
    with pytest.raises(SmearnetError, match="inference.engine"):
        BenchmarkSettings.from_params({**BENCHMARK, "engines": [{"engine": "tensorrt"}]}, INFERENCE, seed=0)


def test_benchmark_engines_rows_for_one_model(tmp_path):
    from workspace import random_model

    from smearnet.evaluation.benchmark import BenchmarkSettings, benchmark_engines

    model_dir = random_model(tmp_path / "model", seed=0)
    cells = colour_cells(tmp_path / "cells", ["red", "green", "blue"] * 3, [f"p{i}" for i in range(9)], size=40)
    settings = BenchmarkSettings.from_params(BENCHMARK, {**INFERENCE, "precision": "fp32", "channels_last": False},
                                             seed=0)
    rows, chosen, reason = benchmark_engines(model_dir, cells, cells, settings)
    assert len(rows) == 1 and chosen is rows[0]  # the configured engine is the eager fp32 reference itself
    assert reason.startswith("configured")
    assert chosen["engine"] == "eager" and chosen["precision"] == "fp32" and chosen["agreement"] == 1.0
    assert chosen["images"] == 9 and "probabilities" not in chosen


@pytest.fixture
def bf16_native(monkeypatch):
    """This machine counted as running bf16 natively (AVX-512/AMX), whatever CPU the tests run on."""
    monkeypatch.setattr("smearnet.models.hardware.native_bf16", lambda accelerator="cpu": True)


def _row(engine, precision, ms, agreement, accuracy, channels_last=False, batch_size=8):
    return {"model": "m", "engine": engine, "precision": precision, "channels_last": channels_last,
            "batch_size": batch_size, "tta": False, "images": 400, "ms_per_image": ms, "agreement": agreement,
            "accuracy": accuracy}


def test_auto_picks_the_fastest_engine_that_keeps_agreement_and_accuracy_and_says_why(bf16_native):
    from smearnet.evaluation.benchmark import AutoEngine, chosen_inference, pick_engine

    auto = AutoEngine.from_mapping({"batch_size": 8, "fidelity": {"min_agreement": 0.995, "max_accuracy_drop": 0.003},
                                    "auto": {"candidates": ["eager-bf16-cl", "openvino-int8", "compile-int8-cl"],
                                             "time_tolerance": 0.1}})
    assert auto.candidates[1] == EngineSpec(engine="openvino", precision="int8", batch_size=8)
    rows = [_row("eager", "fp32", 10.0, 1.0, 0.950),
            _row("eager", "bf16", 4.0, 0.998, 0.950, channels_last=True),
            _row("openvino", "int8", 1.0, 0.990, 0.951),                         # fastest, but disagrees
            _row("compile", "int8", 2.0, 0.996, 0.946, channels_last=True),      # agrees, loses 0.4 points
            _row("onnxruntime", "fp32", 0.5, 1.0, 0.950)]                        # not a candidate
    row, reason = pick_engine(rows, auto)
    assert (row["engine"], row["precision"]) == ("eager", "bf16")
    assert "openvino-int8@8 refused (agreement 0.9900" in reason and "compile-int8-cl@8 refused" in reason
    assert "400 validation cells" in reason
    assert chosen_inference(row) == {"engine": "eager", "precision": "bf16", "channels_last": True, "batch_size": 8,
                                     "tta": False}
    rows[3]["accuracy"] = 0.950  # now kept, and 2x faster than eager bf16
    assert pick_engine(rows, auto)[0] is rows[3]
    rows[1]["ms_per_image"] = 2.1  # within 10% of the fastest: the earlier candidate, whatever the timing noise
    assert pick_engine(rows, auto)[0] is rows[1]
    rows[1]["agreement"] = rows[3]["agreement"] = 0.99
    row, reason = pick_engine(rows, auto)
    assert row is rows[0] and reason.startswith("no candidate kept")
    with pytest.raises(SmearnetError, match="candidates is empty"):
        AutoEngine.from_mapping({"batch_size": 8, "fidelity": {"min_agreement": 0.995, "max_accuracy_drop": 0.003},
                                 "auto": {"candidates": [], "time_tolerance": 0.1}})


def test_auto_skips_pytorch_bf16_candidates_where_bf16_is_emulated(monkeypatch):
    """On an AVX2-only CPU PyTorch emulates bf16 (many times slower than fp32): auto does not time eager/compile bf16
    candidates there and says so; OpenVINO, which picks its precision by the CPU itself, stays."""
    from smearnet.evaluation.benchmark import AutoEngine, BenchmarkSettings, pick_engine

    inference = {**INFERENCE, "engine": "auto", "fidelity": {"min_agreement": 0.995, "max_accuracy_drop": 0.003},
                 "auto": {"candidates": ["eager-bf16-cl", "compile-int8+bf16-cl", "openvino-bf16", "compile-int8-cl"],
                          "time_tolerance": 0.1}}
    for native, timed in ((True, ["eager-bf16-cl", "compile-int8+bf16-cl", "openvino-bf16", "compile-int8-cl"]),
                          (False, ["openvino-bf16", "compile-int8-cl"])):
        monkeypatch.setattr("smearnet.models.hardware.native_bf16", lambda accelerator="cpu", native=native: native)
        auto = AutoEngine.from_mapping(inference)
        assert [spec.label for spec in auto.candidates] == timed
        assert [spec.label for spec in BenchmarkSettings.from_params(BENCHMARK, inference, seed=0).specs] == [
            "eager-fp32", *timed]
    assert [spec.label for spec in auto.skipped] == ["eager-bf16-cl", "compile-int8+bf16-cl"]
    rows = [_row("eager", "fp32", 5.0, 1.0, 0.95), _row("openvino", "bf16", 3.0, 1.0, 0.95),
            _row("compile", "int8", 2.0, 0.999, 0.95, channels_last=True)]
    chosen, reason = pick_engine(rows, auto)
    assert (chosen["engine"], chosen["precision"]) == ("compile", "int8")
    assert "not timed: eager-bf16-cl, compile-int8+bf16-cl (bf16 is emulated on this CPU)" in reason
    only_bf16 = {**inference, "auto": {"candidates": ["eager-bf16-cl"], "time_tolerance": 0.1}}
    settings = BenchmarkSettings.from_params(BENCHMARK, only_bf16, seed=0)
    assert settings.specs == [EngineSpec(batch_size=8)]  # eager fp32 alone, the reference
    chosen, reason = pick_engine(rows[:1], settings.auto)
    assert chosen is rows[0] and reason.startswith("no candidate could be timed here, so eager fp32")


def test_test_time_augmentation_is_kept_by_auto_and_by_the_reference_it_is_judged_against(bf16_native):
    """`inference.tta: true` is part of what the model computes: every auto candidate, extra engine and the eager
    fp32 reference run it (agreement then measures the engine alone), and the engine auto records carries it."""
    from smearnet.evaluation.benchmark import BenchmarkSettings, chosen_inference
    from smearnet.models.inference import resolve_inference

    inference = {**INFERENCE, "engine": "auto", "tta": True,
                 "auto": {"candidates": ["eager-bf16-cl", "openvino-int8"], "time_tolerance": 0.1},
                 "fidelity": {"min_agreement": 0.995, "max_accuracy_drop": 0.003}}
    settings = BenchmarkSettings.from_params({**BENCHMARK, "engines": [{"engine": "onnxruntime", "precision": "fp32"}]},
                                             inference, seed=0)
    assert [spec.label for spec in settings.specs] == ["eager-fp32-tta", "onnxruntime-fp32-tta", "eager-bf16-cl-tta",
                                                       "openvino-int8-tta"]
    chosen = chosen_inference(_row("openvino", "int8", 1.0, 1.0, 0.95) | {"tta": True})
    assert resolve_inference(inference, {"selected": "m", "inference": chosen})["tta"] is True
    plain = BenchmarkSettings.from_params(BENCHMARK, {**inference, "tta": False}, seed=0)
    assert not any(spec.tta for spec in plain.specs)


def test_auto_times_every_candidate_and_the_stages_run_the_engine_it_picked(tiny_model, tmp_path, bf16_native):
    from smearnet.evaluation.benchmark import BenchmarkSettings, benchmark_engines, chosen_inference
    from smearnet.models.engines import engine_spec
    from smearnet.models.inference import resolve_inference, save_trained

    inference = {**INFERENCE, "engine": "auto", "auto": {"candidates": ["eager-bf16-cl", "openvino-fp32"],
                                                         "time_tolerance": 0.1},
                 "fidelity": {"min_agreement": 0.0, "max_accuracy_drop": 1.0}}
    settings = BenchmarkSettings.from_params(BENCHMARK, inference, seed=0)
    assert settings.specs == [EngineSpec(batch_size=8), EngineSpec(precision="bf16", channels_last=True, batch_size=8),
                              EngineSpec(engine="openvino", batch_size=8)]
    save_trained(tiny_model.net, tmp_path / "m", {"name": "tiny", "model_cfg": CFG, "classes": ["a", "b"],
                                                  "input_spec": tiny_model.input_spec})
    cells = colour_cells(tmp_path / "cells", ["a", "b"] * 4, [f"p{i}" for i in range(8)], size=64)
    rows, chosen, reason = benchmark_engines(tmp_path / "m", cells, cells, settings)
    assert len(rows) == 3 and chosen in rows[1:] and "the fastest" in reason
    selection = {"selected": "tiny", "inference": chosen_inference(chosen)}
    resolved = resolve_inference(inference, selection)
    assert engine_spec(resolved) == settings.specs[1 + rows[1:].index(chosen)]
    assert resolve_inference(INFERENCE, selection) == INFERENCE  # a configured engine is left as it is
    with pytest.raises(SmearnetError, match="names no engine"):
        resolve_inference(inference, {"selected": "tiny"})
    with pytest.raises(SmearnetError, match="auto"):
        engine_spec(inference)  # an unresolved auto never runs


@pytest.mark.slow
def test_the_engine_benchmark_script_times_each_model_and_thread_count_in_its_own_process(tmp_path):
    """benchmarks/inference_engines.py: several models (one at another input size) in one run, one worker process
    per model x engine x threads (one engine here: each worker imports torch), batch sizes compared on the probe
    cells and the fastest timed on all cells, agreement measured against the parent's eager fp32 reference."""
    import subprocess
    import sys
    from pathlib import Path

    import pandas as pd

    from workspace import CLASSES, random_model

    model_dir = random_model(tmp_path / "model", seed=0)
    cells = colour_cells(tmp_path / "cells", CLASSES * 4, [f"p{i}" for i in range(12)], size=40)
    cells["split"] = ["test"] * 9 + ["val"] * 3
    cells.to_csv(tmp_path / "manifest.csv", index=False)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "inference_engines.py"
    done = subprocess.run([sys.executable, str(script), "--model", str(model_dir), "--model", f"{model_dir}@48",
                           "--manifest", str(tmp_path / "manifest.csv"), "--cells", "6", "--probe-cells", "3",
                           "--engines", "eager-fp32", "--threads", "1,2", "--batch-sizes", "1,4",
                           "--no-limit", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    table = pd.read_csv(tmp_path / "out" / "inference_engines.csv")
    assert table[["engine", "threads"]].values.tolist() == [["eager-fp32", 1], ["eager-fp32", 2]] * 2
    assert table["model"].str.contains("48x48 px").tolist() == [False] * 2 + [True] * 2
    assert (table["images"] == 6).all() and set(table["batch_size"]) <= {1, 4}  # the fastest timed on all cells
    assert (table["agreement"] == 1.0).all()
    assert table["batches_tried"].str.contains("1: ").all() and table["batches_tried"].str.contains("4: ").all()
