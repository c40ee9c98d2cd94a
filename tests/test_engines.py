"""Inference engines agree with eager fp32; exports are cached by weights, built once under a lock and never left
half-written; packaged engine files load only when their sha256 matches; bad settings fail clearly."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smearnet.models.engines import (AccuracyControl, EngineSpec, Fidelity, build_engine, engine_artifact, engine_spec,
                                    runs_from_artifact, weights_digest)
from smearnet.errors import SmearnetError
from smearnet.models.factory import build_model, model_input_spec

CFG = {"name": "tiny", "arch": "resnet18", "input_size": [32, 32], "pretrained": False, "weights_path": None,
       "allow_random_init": True}


@pytest.fixture(scope="module")
def trained_like():
    """A small resnet whose predictions are not near ties (a few steps on a fixed, separable batch)."""
    torch.manual_seed(0)
    net = build_model(CFG, num_classes=3)
    images = torch.randn(24, 3, 32, 32)
    targets = torch.arange(24) % 3
    images += targets.view(-1, 1, 1, 1).float()  # classes differ in brightness
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(30):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(images), targets).backward()
        optimizer.step()
    return net.eval(), images, model_input_spec(CFG)


def _agreement(engine, net, images):
    with torch.inference_mode():
        reference = net(images)
    logits = engine(images)
    assert logits.shape == reference.shape and logits.dtype == torch.float32
    return float((logits.argmax(1) == reference.argmax(1)).float().mean()), float((logits - reference).abs().max())


@pytest.mark.parametrize("spec", [EngineSpec(precision="bf16", channels_last=True, batch_size=5),
                                  EngineSpec(engine="onnxruntime", batch_size=7),
                                  EngineSpec(engine="openvino", batch_size=7),
                                  EngineSpec(engine="openvino", precision="bf16", batch_size=7)], ids=lambda s: s.label)
def test_engine_agrees_with_eager_fp32(trained_like, spec, tmp_path):
    net, images, input_spec = trained_like
    agreement, difference = _agreement(build_engine(net, input_spec, spec, cache_dir=tmp_path), net, images)
    assert agreement == 1.0
    assert difference < (0.5 if spec.precision == "bf16" else 1e-3)


@pytest.mark.parametrize("spec, files", [
    (EngineSpec(engine="onnxruntime", precision="int8", batch_size=8), 2),  # fp32 export + its int8 version
    (EngineSpec(engine="openvino", precision="int8", batch_size=8), 2),     # fp32 IR + its NNCF int8 version
    pytest.param(EngineSpec(engine="compile", precision="int8", channels_last=True, batch_size=8), 1,
                 marks=pytest.mark.slow),  # the quantised program (Inductor compiles it on the first batch)
], ids=lambda v: v.label if isinstance(v, EngineSpec) else None)
def test_int8_is_calibrated_cached_and_agrees(trained_like, spec, files, tmp_path):
    net, images, input_spec = trained_like
    with pytest.raises(SmearnetError, match="calibration"):
        build_engine(net, input_spec, spec, cache_dir=tmp_path)
    calls = []

    def calibration():
        calls.append(1)
        return [images[:12], images[12:]]

    engine = build_engine(net, input_spec, spec, cache_dir=tmp_path, calibration=calibration)
    agreement, _ = _agreement(engine, net, images)
    assert agreement >= 0.9
    exports = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock"))  # build locks stay
    digest = weights_digest(net)
    assert len(exports) == files and all(name.startswith(digest) for name in exports)  # nothing partial
    build_engine(net, input_spec, spec, cache_dir=tmp_path, calibration=calibration)
    assert calls == [1]  # the second build reused the cached int8 model


def _near_ties(net, count: int) -> torch.Tensor:
    """`count` inputs whose two top fp32 logits lie 0.01-0.2 apart: int8 rounding (about 0.04 on these logits)
    flips many of them, fp32 kernels of any kind flip none."""
    generator = torch.Generator().manual_seed(1)
    pool = torch.randn(2000, 3, 32, 32, generator=generator) * 0.3 + torch.rand(2000, 1, 1, 1, generator=generator) * 2
    with torch.inference_mode():
        top = net(pool).topk(2, dim=1).values
    margin = top[:, 0] - top[:, 1]
    chosen = pool[(margin >= 0.01) & (margin < 0.2)]
    assert len(chosen) >= count
    return chosen[:count]


@pytest.mark.slow  # NNCF ranks and reverts layers one at a time: about 40 s
def test_openvino_int8_under_accuracy_control_keeps_the_stated_loss(trained_like, tmp_path):
    """On validation cells near a tie, plain NNCF int8 changes calls; under accuracy control NNCF puts the layers
    that change them back in floating point until agreement with eager fp32 falls by at most `max_drop` (2 of 40
    cells here). The file is named by the loss, so it is never mixed up with a plain int8 file."""
    net, images, input_spec = trained_like
    cells = _near_ties(net, 40)
    with torch.inference_mode():
        reference = net(cells).argmax(1)
    spec = EngineSpec(engine="openvino", precision="int8", batch_size=20)

    def calibration():
        return [images[:12], images[12:]]

    def agreement(engine) -> float:
        return float((engine(cells).argmax(1) == reference).float().mean())

    with pytest.raises(SmearnetError, match="validation cells"):  # nothing cached, nothing to measure the loss on
        build_engine(net, input_spec, spec, cache_dir=tmp_path, calibration=calibration,
                     accuracy_control=AccuracyControl(0.05))
    plain = agreement(build_engine(net, input_spec, spec, cache_dir=tmp_path, calibration=calibration))
    control = AccuracyControl(0.05, lambda: [cells[:20], cells[20:]])
    controlled = agreement(build_engine(net, input_spec, spec, cache_dir=tmp_path, calibration=calibration,
                                        accuracy_control=control))
    assert plain < 0.95 <= controlled
    assert any(path.name.endswith("-int8-ac0.05.ovz") for path in tmp_path.iterdir())
    assert any(path.name.endswith("-int8.ovz") for path in tmp_path.iterdir())


def test_fidelity_loss_in_agreement_keeps_both_limits():
    """A cell called differently moves accuracy by at most that cell: agreement within the smaller of the two
    limits keeps both."""
    assert Fidelity(min_agreement=0.995, max_accuracy_drop=0.003).max_agreement_drop == pytest.approx(0.003)
    assert Fidelity(min_agreement=0.99, max_accuracy_drop=0.02).max_agreement_drop == pytest.approx(0.01)


@pytest.mark.slow
def test_cached_int8_program_runs_on_int8_kernels_in_a_fresh_process(trained_like, tmp_path):
    """A served model loads its int8 program in a new process: Inductor must still fuse it into oneDNN int8
    convolutions (without torchao's passes it silently runs dequantise + fp32 convolutions, 5x slower)."""
    net, images, input_spec = trained_like
    spec = EngineSpec(engine="compile", precision="int8", channels_last=True, batch_size=8)
    engine_artifact(net, input_spec, spec, cache_dir=tmp_path, calibration=lambda: [images])
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    script = f"""
import torch
from torch._dynamo.utils import counters
from smearnet.models.engines import EngineSpec, build_engine
from smearnet.models.factory import build_model, model_input_spec
net = build_model({CFG!r}, num_classes=3)
net.load_state_dict(torch.load({str(tmp_path / "weights.pt")!r}))
spec = EngineSpec(engine="compile", precision="int8", channels_last=True, batch_size=8)
engine = build_engine(net, model_input_spec({CFG!r}), spec, cache_dir={str(tmp_path)!r})  # no calibration: cached
engine(torch.randn(8, 3, 32, 32))
print(counters["inductor"]["qconv_weight_prepack_matcher_count"])
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.split()[-1]) > 0  # convolutions lowered to oneDNN int8 kernels


def test_tta_is_invariant_to_flips_and_rotations(trained_like):
    net, images, input_spec = trained_like
    engine = build_engine(net, input_spec, EngineSpec(tta=True, batch_size=24))
    assert engine.spec.label == "eager-fp32-tta"
    upright = engine(images)
    assert torch.allclose(upright, engine(torch.rot90(images, 1, dims=(-2, -1)).flip(-1)), atol=1e-4)
    assert not torch.allclose(upright, build_engine(net, input_spec, EngineSpec())(images), atol=1e-4)


def test_cache_key_changes_with_the_weights(trained_like):
    net, _, _ = trained_like
    other = build_model(CFG, num_classes=3)
    assert weights_digest(net) == weights_digest(net) != weights_digest(other)


@pytest.mark.slow
def test_compiled_engine_pads_to_one_shape_and_agrees(trained_like):
    net, images, input_spec = trained_like
    engine = build_engine(net, input_spec, EngineSpec(engine="compile", precision="fp32", batch_size=10))
    agreement, difference = _agreement(engine, net, images)  # 24 cells: batches of 10, 10 and 4 (padded)
    assert agreement == 1.0 and difference < 1e-3


def test_settings_are_checked():
    assert engine_spec({"engine": "onnxruntime", "precision": "int8"}).label == "onnxruntime-int8"
    assert engine_spec(None) == EngineSpec()
    assert engine_spec({"engine": "compile", "precision": "int8+bf16", "channels_last": True}).label == \
        "compile-int8+bf16-cl"
    assert [runs_from_artifact(engine_spec(s)) for s in ({"engine": "onnxruntime"}, {"engine": "compile"},
                                                          {"engine": "compile", "precision": "int8"})] == [True, False, True]
    with pytest.raises(SmearnetError, match="Unknown inference.engine"):
        engine_spec({"engine": "tensorrt"})
    with pytest.raises(SmearnetError, match="not available with engine `eager`"):
        engine_spec({"engine": "eager", "precision": "int8"})
    with pytest.raises(SmearnetError, match="batch_size"):
        engine_spec({"batch_size": 0})


# ------------------------------------------------------------------------ the engine cache and packaged files


BUILD_SCRIPT = """
import os, sys, time
import torch
from smearnet.models import engines
from smearnet.models.engines import EngineSpec, engine_artifact
from smearnet.models.factory import build_model, model_input_spec

cfg, cache, log, builders, mode = {cfg!r}, sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
export = engines._export_onnx

def note(event):
    with open(log, "a") as handle:
        handle.write(f"{{event}} {{os.getpid()}} {{time.time()}}\\n")

def slow_export(net, size, path):  # export, then hold the half-built state long enough for the other process
    note("export")
    if mode == "die":
        path.write_bytes(b"half an onnx file")
        time.sleep(60)  # killed here by the test
    export(net, size, path)
    time.sleep(1.5)
    note("exported")

engines._export_onnx = slow_export
torch.manual_seed(0)
net = build_model(cfg, num_classes=3)
open(log + f".ready-{{os.getpid()}}", "w").close()  # a barrier: every builder is ready before any builds
while len([n for n in os.listdir(os.path.dirname(log)) if ".ready-" in n]) < builders:
    time.sleep(0.01)
note("build")
path = engine_artifact(net.eval(), model_input_spec(cfg), EngineSpec(engine="onnxruntime"), cache_dir=cache,
                       calibration=None)
print(path)
"""


def _builder(tmp_path, cache, builders: int = 1, mode: str = "build") -> subprocess.Popen:
    script = tmp_path / "build.py"
    script.write_text(BUILD_SCRIPT.format(cfg=CFG))
    for ready in tmp_path.glob("events.log.ready-*"):
        ready.unlink()
    log = tmp_path / "events.log"
    return subprocess.Popen([sys.executable, str(script), str(cache), str(log), str(builders), mode],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_two_processes_building_one_engine_end_with_one_valid_file(tmp_path):
    """Both ask for the same ONNX export at the same instant: one exports under the lock, the other waits and
    reuses its file; one whole file, nothing temporary left."""
    import onnxruntime

    cache = tmp_path / "cache"
    script = _builder(tmp_path, cache, builders=2)
    builders = [script, subprocess.Popen(script.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                         env={**os.environ, "HF_HUB_OFFLINE": "1"})]
    outputs = [process.communicate(timeout=600) for process in builders]
    assert [process.returncode for process in builders] == [0, 0], [err[-2000:] for _, err in outputs]
    paths = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert len(paths) == 1
    events = [line.split() for line in (tmp_path / "events.log").read_text().splitlines()]
    starts = [float(t) for event, _, t in events if event == "build"]
    [exported] = [float(t) for event, _, t in events if event == "exported"]  # exported once
    assert len(starts) == 2 and max(starts) < exported  # the second asked while the first was exporting
    files = sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock"))
    assert files == [os.path.basename(paths.pop())]
    session = onnxruntime.InferenceSession(str(cache / files[0]), providers=["CPUExecutionProvider"])
    assert session.run(None, {"images": torch.zeros(1, 3, 32, 32).numpy()})[0].shape == (1, 3)


@pytest.mark.slow  # kills a builder mid-export
def test_a_killed_export_never_takes_the_final_name_and_the_next_build_succeeds(tmp_path):
    import time

    cache = tmp_path / "cache"
    dying = _builder(tmp_path, cache, mode="die")
    deadline = time.monotonic() + 300
    while not (cache.is_dir() and any(".partial" in p.name for p in cache.iterdir())):
        assert dying.poll() is None and time.monotonic() < deadline, dying.communicate()[1][-2000:]
        time.sleep(0.2)
    dying.kill()  # SIGKILL while it holds the lock, half a file written
    dying.communicate(timeout=60)
    assert not [p for p in cache.iterdir() if p.suffix == ".onnx" and not p.name.startswith(".")]
    survivor = _builder(tmp_path, cache)  # the kernel released the lock with the dead process
    out, err = survivor.communicate(timeout=600)
    assert survivor.returncode == 0, err[-2000:]
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == [Path(out.split()[-1]).name]


@pytest.mark.parametrize("failure", ["raises", "writes a truncated file"])
def test_a_failed_or_truncated_export_leaves_nothing(trained_like, tmp_path, monkeypatch, failure):
    from smearnet.models import engines

    net, _, input_spec = trained_like

    def broken_export(net, size, path):
        path.write_bytes(b"\x08\x07 not a whole protobuf")
        if failure == "raises":
            raise SmearnetError("Exporting the network to ONNX failed (disk full).", "free space.")

    monkeypatch.setattr(engines, "_export_onnx", broken_export)
    with pytest.raises(SmearnetError, match="disk full" if failure == "raises" else "unreadable"):
        engine_artifact(net, input_spec, EngineSpec(engine="onnxruntime"), cache_dir=tmp_path, calibration=None)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_packaged_engine_files_are_loaded_only_when_their_sha256_matches(trained_like, tmp_path, monkeypatch):
    """A tampered int8 program is refused before torch.export.load (which would unpickle what it holds) sees it;
    an ONNX file is loaded from the very bytes that were checked."""
    import hashlib

    from smearnet.io import file_sha256
    from smearnet.models.engines import engine_file_path

    net, images, input_spec = trained_like
    spec = EngineSpec(engine="onnxruntime")
    export = engine_artifact(net, input_spec, spec, cache_dir=tmp_path, calibration=None)
    hashes = {export.name: file_sha256(export)}
    assert hashes[export.name] == hashlib.sha256(export.read_bytes()).hexdigest()
    engine = build_engine(net, input_spec, spec, cache_dir=tmp_path, packaged_files=hashes)
    assert torch.allclose(engine(images), net(images), atol=1e-3)

    data = bytearray(export.read_bytes())
    data[len(data) // 2] ^= 0xFF
    export.write_bytes(bytes(data))
    with pytest.raises(SmearnetError, match="sha256 .* serving.json records, so it was altered"):
        build_engine(net, input_spec, spec, cache_dir=tmp_path, packaged_files=hashes)
    with pytest.raises(SmearnetError, match="records no sha256"):
        build_engine(net, input_spec, spec, cache_dir=tmp_path, packaged_files={})

    int8 = EngineSpec(engine="compile", precision="int8", batch_size=8)
    program = engine_file_path(net, input_spec, int8, tmp_path)
    program.write_bytes(b"PK a program someone replaced")
    monkeypatch.setattr(torch.export, "load", lambda *a, **k: pytest.fail("an unverified program was loaded"))
    with pytest.raises(SmearnetError, match="altered"):
        build_engine(net, input_spec, int8, cache_dir=tmp_path, packaged_files={program.name: "0" * 64})
    program.unlink()
    with pytest.raises(SmearnetError, match="carries no engine file"):  # never rebuilt where it is served
        build_engine(net, input_spec, int8, cache_dir=tmp_path, packaged_files={}, calibration=lambda: [images])


def test_openvino_ir_is_one_packaged_file_loaded_only_when_its_sha256_matches(trained_like, tmp_path):
    """model.xml and model.bin travel as one zip: hashed, checked and read from the checked bytes like the other
    engine files; an int8 IR is never re-quantised where it is served."""
    import zipfile

    from smearnet.io import file_sha256

    net, images, input_spec = trained_like
    spec = EngineSpec(engine="openvino", batch_size=8)
    ir = engine_artifact(net, input_spec, spec, cache_dir=tmp_path, calibration=None)
    assert ir.name.startswith(weights_digest(net)) and ir.suffix == ".ovz"
    with zipfile.ZipFile(ir) as archive:
        assert sorted(archive.namelist()) == ["model.bin", "model.xml"]
    hashes = {ir.name: file_sha256(ir)}
    engine = build_engine(net, input_spec, spec, cache_dir=tmp_path, packaged_files=hashes)
    assert torch.allclose(engine(images), net(images), atol=1e-3)

    data = bytearray(ir.read_bytes())
    data[-100] ^= 0xFF  # inside the weights
    ir.write_bytes(bytes(data))
    with pytest.raises(SmearnetError, match="altered"):
        build_engine(net, input_spec, spec, cache_dir=tmp_path, packaged_files=hashes)
    int8 = EngineSpec(engine="openvino", precision="int8", batch_size=8)
    with pytest.raises(SmearnetError, match="carries no engine file"):
        build_engine(net, input_spec, int8, cache_dir=tmp_path, packaged_files={}, calibration=lambda: [images])
