"""Inference engines: one trained network run eager, `torch.compile`d or through ONNX Runtime, in fp32, bf16 or int8.

An engine maps a batch of preprocessed cells (N x 3 x H x W, float32, as `smearnet.data.loaders.cell_tensor` makes them)
to float32 logits. Which one runs is configuration (`inference.engine`, `inference.precision`,
`inference.channels_last`), read by the benchmark, evaluate, predict and serving code alike:

- ``eager``: PyTorch as trained; ``bf16`` runs under CPU autocast (AMX/AVX-512 BF16 where the CPU has them).
- ``compile``: ``torch.compile`` (Inductor, C++ codegen, weights frozen into the graph) of the same; every batch is
  padded to the engine's batch size so one graph serves them all instead of recompiling for the last, smaller batch.
  ``int8`` is PyTorch 2 export quantisation (torchao's ``X86InductorQuantizer``: per-channel int8 weights, uint8
  activations of convolutions and linears) calibrated on training cells and lowered by Inductor to oneDNN int8
  kernels (AMX/VNNI); the other operations run in fp32, or in bf16 with ``int8+bf16``. The quantised program is
  cached under ``cache_dir`` like the ONNX exports (``torch.export.save``).
- ``onnxruntime``: the network exported to ONNX (RepVGG already re-parameterised by `load_trained`), run by ONNX
  Runtime with full graph optimisation; ``int8`` is ONNX Runtime static quantisation (QDQ, per-channel weights)
  calibrated on training cells.
- ``openvino``: the network converted to OpenVINO IR (fp32 weights) and compiled for the CPU plugin at the engine's
  batch size; ``bf16`` is the plugin's inference-precision hint (AMX / AVX-512 BF16 kernels), which fp32 pins to
  f32 (the plugin would otherwise pick bf16 by itself on such CPUs). ``int8`` is NNCF post-training quantisation of
  the IR calibrated on training cells; the operations it leaves in floating point run in f32, or in bf16 with
  ``int8+bf16``. With `AccuracyControl` (the pipeline's default, `inference.accuracy_control_images`) it is NNCF's
  quantisation with accuracy control: on validation cells (disjoint from the calibration cells) the layers whose
  quantisation changes the most calls are put back in floating point, one at a time, until the int8 network agrees
  with eager fp32 within the stated loss (`Fidelity.max_agreement_drop`). The IR (model.xml + model.bin) is cached
  as one uncompressed zip, so it is checked, hashed and packaged like the other engine files and loaded from the
  verified bytes.

Exports and quantised programs are cached under ``cache_dir`` by a hash of the weights, so a model version is
exported (and calibrated) once; `engine_artifact` names the file a registered version carries.

Several processes may share one cache (parallel stages, serving workers): a file lock beside each file
(``.<name>.lock``) lets one of them export while the others wait and then use its file, and every export is
written to a unique temporary file in the cache folder, checked, flushed to disk and only then renamed into place,
so a failed or killed export never leaves a half-written file under the final name.

Loading an engine file runs what it contains: ``torch.export.load`` unpickles pickled payloads (and falls back to
unpickling sample inputs ``weights_only`` refuses), resolves graph targets by name on ``torch`` and parses symbolic
shapes with sympy. There is no safe way to open an untrusted program, so a file packaged with a model version
(``packaged_files``: the sha256 of each, from its serving.json) is read into memory, hashed and refused unless the
hash matches, and only those verified bytes are loaded; nothing is rebuilt or re-read from disk after the check.
A local cache is trusted as much as the workspace's code.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import version as package_version
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock

from smearnet.errors import SmearnetError
from smearnet.io import atomic_file, file_sha256, stale_partials

ENGINES = ("eager", "compile", "onnxruntime", "openvino")
PRECISIONS = {"eager": ("fp32", "bf16"), "compile": ("fp32", "bf16", "int8", "int8+bf16"),
              "onnxruntime": ("fp32", "int8"), "openvino": ("fp32", "bf16", "int8", "int8+bf16")}


@dataclass(frozen=True)
class EngineSpec:
    """What runs a network for inference (the `inference` config section)."""

    engine: str = "eager"
    precision: str = "fp32"
    channels_last: bool = False
    batch_size: int = 8
    tta: bool = False  # mean logits over the 8 flips/right-angle rotations (4 flips for non-square inputs)

    @property
    def needs_native_bf16(self) -> bool:
        """PyTorch's own bf16 kernels (eager, compile): emulated, so many times slower, on a CPU without native bf16
        (`smearnet.models.hardware.native_bf16`). OpenVINO chooses its precision by the CPU itself."""
        return self.engine in ("eager", "compile") and "bf16" in self.precision

    @property
    def label(self) -> str:
        return (f"{self.engine}-{self.precision}"
                + ("-cl" if self.channels_last and self.engine not in ("onnxruntime", "openvino") else "")
                + ("-tta" if self.tta else ""))


@dataclass(frozen=True)
class Fidelity:
    """`inference.fidelity`: how close to eager fp32 an engine must stay on validation cells to run a model (auto
    picks only among engines that do; register refuses a configured engine that does not; OpenVINO int8 with
    accuracy control is quantised to keep it)."""

    min_agreement: float = 0.995      # share of cells whose arg-max equals eager fp32's
    max_accuracy_drop: float = 0.003  # accuracy below eager fp32's, at most

    @classmethod
    def from_mapping(cls, fidelity: Mapping) -> Fidelity:
        return cls(min_agreement=float(fidelity["min_agreement"]),
                   max_accuracy_drop=float(fidelity["max_accuracy_drop"]))

    def keeps(self, agreement: float, accuracy: float, reference_accuracy: float) -> bool:
        return agreement >= self.min_agreement and accuracy >= reference_accuracy - self.max_accuracy_drop - 1e-12

    @property
    def max_agreement_drop(self) -> float:
        """The share of cells an engine may call differently from eager fp32 and still keep both limits: a cell
        called differently moves accuracy by at most that cell, so agreement >= 1 - this keeps the accuracy limit
        too."""
        return min(1.0 - self.min_agreement, self.max_accuracy_drop)

    def describe(self, reference_accuracy: float, cells: int) -> str:
        return (f"agreement with eager fp32 >= {self.min_agreement:.3f} and accuracy >= "
                f"{reference_accuracy - self.max_accuracy_drop:.4f} (eager fp32 {reference_accuracy:.4f} less "
                f"{self.max_accuracy_drop}) on {cells} validation cells")


@dataclass(frozen=True)
class AccuracyControl:
    """int8 quantised under a stated loss (OpenVINO: NNCF's `quantize_with_accuracy_control`): agreement with eager
    fp32 on `cells` may fall at most `max_drop` below the floating-point network's; the layers that break it stay in
    floating point. `cells` gives batches of validation cells (never the training cells int8 calibrates on); None
    when the file must already exist (a packaged or cached engine)."""

    max_drop: float
    cells: Callable[[], Sequence[torch.Tensor]] | None = field(default=None, compare=False)

    @property
    def tag(self) -> str:
        """What the engine file's name carries, so files quantised under another loss are never mixed up."""
        return f"ac{self.max_drop:g}"


AUTO = "auto"  # inference.engine: auto: the benchmark stage picks per model (smearnet.evaluation.benchmark)


def parse_engine_label(text: str, batch_size: int) -> EngineSpec:
    """An `EngineSpec` from its label, `engine-precision[-cl][-tta][@batch]` (e.g. `compile-int8-cl@16`), checked;
    without `@batch`, `batch_size`."""
    text, _, batch = str(text).partition("@")
    parts = text.split("-")
    if len(parts) < 2:
        raise SmearnetError(f"Engine label {text!r} is not engine-precision[-cl][-tta][@batch].",
                            "e.g. eager-bf16-cl, openvino-int8, compile-int8-cl@16.")
    return engine_spec({"engine": parts[0], "precision": parts[1], "channels_last": "cl" in parts[2:],
                        "tta": "tta" in parts[2:], "batch_size": int(batch or batch_size)})


def engine_spec(cfg: Mapping | None = None, **overrides) -> EngineSpec:
    """An `EngineSpec` from the `inference` config section (or defaults), checked; `overrides` win."""
    values = {key: (cfg or {}).get(key, default) for key, default in asdict(EngineSpec()).items()}
    values.update({k: v for k, v in overrides.items() if v is not None})
    spec = EngineSpec(engine=str(values["engine"]), precision=str(values["precision"]),
                      channels_last=bool(values["channels_last"]), batch_size=int(values["batch_size"]),
                      tta=bool(values["tta"]))
    if spec.engine == AUTO:
        raise SmearnetError("inference.engine is `auto`, and nothing resolved it to the engine the benchmark stage "
                            "picked.", "run the benchmark stage (dvc repro) so reports/benchmark/selection.json "
                            "names the engine, or configure an engine.")
    if spec.engine not in ENGINES:
        raise SmearnetError(f"Unknown inference.engine `{spec.engine}`.", f"use one of {', '.join(ENGINES)} or auto.")
    if spec.precision not in PRECISIONS[spec.engine]:
        raise SmearnetError(f"inference.precision `{spec.precision}` is not available with engine `{spec.engine}`.",
                            f"use one of {', '.join(PRECISIONS[spec.engine])} with {spec.engine}.")
    if spec.batch_size < 1:
        raise SmearnetError(f"inference.batch_size must be >= 1, got {spec.batch_size}.", "set it to e.g. 8.")
    return spec


class Engine:
    """A callable `images -> logits` (float32 tensors) with the spec it was built from."""

    def __init__(self, spec: EngineSpec, run: Callable[[torch.Tensor], torch.Tensor], pad_batches: bool = False):
        self.spec = spec
        self._run = run
        self._pad = pad_batches

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        chunks = []
        size = self.spec.batch_size
        for start in range(0, len(images), size):
            batch = images[start:start + size]
            real = len(batch)
            if self._pad:  # one static shape for compiled graphs
                batch = pad_batch(batch, size)
            if self.spec.tta:
                views = dihedral_views(batch)
                chunks.append(torch.stack([self._run(view)[:real].float() for view in views]).mean(0))
            else:
                chunks.append(self._run(batch)[:real].float())
        if not chunks:
            return torch.zeros((0, 0))
        return torch.cat(chunks)


def pad_batch(batch: torch.Tensor, size: int) -> torch.Tensor:
    """`batch` topped up to `size` images with copies of its last one (a compiled graph has one batch size)."""
    if len(batch) >= size:
        return batch
    return torch.cat([batch, batch[-1:].expand(size - len(batch), *batch.shape[1:])])


def dihedral_views(images: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips/right-angle rotations of square images (4 flips of non-square ones): a cell has no up or left."""
    flips = [images, images.flip(-1)]
    if images.shape[-1] != images.shape[-2]:
        return [*flips, images.flip(-2), images.flip(-1).flip(-2)]
    return [torch.rot90(view, k, dims=(-2, -1)).contiguous() for view in flips for k in range(4)]


def build_engine(net: torch.nn.Module, input_spec: Mapping, spec: EngineSpec, *, cache_dir: Path | None = None,
                 calibration: Callable[[], Sequence[torch.Tensor]] | None = None,
                 accuracy_control: AccuracyControl | None = None,
                 packaged_files: Mapping[str, str] | None = None) -> Engine:
    """An engine running `net` (in eval mode) as `spec` says.

    `calibration` returns batches of preprocessed training cells; only int8 needs it (once per cached model).
    `accuracy_control` quantises OpenVINO int8 under a stated loss on validation cells (other engines ignore it).
    `cache_dir` keeps ONNX exports and quantised programs between runs (a temporary folder when None).
    `packaged_files` (file name -> sha256, from a model version's serving.json) makes `cache_dir` the version's
    packaged engine folder: the engine file must be listed there and match its hash, and is never built.
    """
    net = net.eval()
    data = b""
    if runs_from_artifact(spec):
        if packaged_files is not None:
            data = read_packaged_file(engine_file_path(net, input_spec, spec, cache_dir, accuracy_control),
                                      packaged_files)
        else:
            path = engine_artifact(net, input_spec, spec, cache_dir=cache_dir, calibration=calibration,
                                   accuracy_control=accuracy_control)
            data = path.read_bytes()
    if spec.engine == "openvino":
        return _openvino_engine(data, input_spec, spec)
    if spec.engine == "onnxruntime":
        session = _ort_session(data)
        input_name = session.get_inputs()[0].name

        def run_ort(images: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {input_name: images.contiguous().numpy()})[0])

        return Engine(spec, run_ort)
    if spec.precision.startswith("int8"):
        _x86_quantizer()  # the ops the saved program calls and the passes that lower it to int8 kernels
        net = torch.export.load(io.BytesIO(data)).module()
    elif spec.channels_last:
        net = net.to(memory_format=torch.channels_last)
    module = torch.compile(net, dynamic=False) if spec.engine == "compile" else net
    bf16 = spec.precision in ("bf16", "int8+bf16")

    def run(images: torch.Tensor) -> torch.Tensor:
        if spec.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        # freezing: Inductor folds the weights into the graph (needed to lower int8 to oneDNN kernels)
        with _inductor_freezing(spec.engine == "compile"), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return module(images)

    return Engine(spec, run, pad_batches=spec.engine == "compile")


def _inductor_freezing(enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    import torch._inductor.config  # heavy: only compiled engines import Inductor

    return torch._inductor.config.patch(freezing=True)


def runs_from_artifact(spec: EngineSpec) -> bool:
    """Whether the engine runs from a file made from the weights (an ONNX export, OpenVINO IR, an int8 program)."""
    return spec.engine in ("onnxruntime", "openvino") or spec.precision.startswith("int8")


def engine_file_path(net: torch.nn.Module, input_spec: Mapping, spec: EngineSpec, cache_dir: Path,
                     accuracy_control: AccuracyControl | None = None) -> Path:
    """Where the engine's file (see `engine_artifact`) lives in `cache_dir`: named by the weights, the input size,
    the runtime versions (a file is never used by a runtime it was not made for) and, for OpenVINO int8, the loss
    it was quantised under."""
    height, width = (int(v) for v in input_spec["input_size"])
    if spec.engine == "onnxruntime":
        return _onnx_path(net, (height, width), spec.precision, Path(cache_dir))
    if spec.engine == "openvino":
        weights = "int8" if spec.precision.startswith("int8") else "fp32"
        if weights == "int8" and accuracy_control is not None:
            weights = f"int8-{accuracy_control.tag}"
        return _openvino_path(net, (height, width), weights, Path(cache_dir))
    layout = "cl" if spec.channels_last else "nchw"
    return Path(cache_dir) / (f"{weights_digest(net)}-{height}x{width}-b{spec.batch_size}-{layout}"
                              f"-torch{torch.__version__}-torchao{package_version('torchao')}-int8.pt2")


def engine_artifact(net: torch.nn.Module, input_spec: Mapping, spec: EngineSpec, *, cache_dir: Path | None,
                    calibration: Callable[[], Sequence[torch.Tensor]] | None,
                    accuracy_control: AccuracyControl | None = None) -> Path | None:
    """The file the engine runs from, made (exported, calibrated) only when not cached yet: the ONNX model for
    ONNX Runtime, OpenVINO IR (int8: under `accuracy_control` when given), the quantised PyTorch program for compile
    int8, None for engines that run `net` as it is."""
    if not runs_from_artifact(spec):
        return None
    cache_dir = Path(cache_dir) if cache_dir is not None else Path(tempfile.mkdtemp(prefix="smearnet-engines-"))
    height, width = (int(v) for v in input_spec["input_size"])
    path = engine_file_path(net, input_spec, spec, cache_dir, accuracy_control)
    if spec.engine == "onnxruntime":
        fp32_path = _onnx_path(net, (height, width), "fp32", cache_dir)
        _build_once(fp32_path, lambda partial: _export_onnx(net, (height, width), partial), _check_onnx)
        if spec.precision == "int8":
            _build_once(path, lambda partial: _quantize_int8(fp32_path, partial, _calibration_cells(calibration)),
                        _check_onnx)
        return path
    if spec.engine == "openvino":
        fp32_path = _openvino_path(net, (height, width), "fp32", cache_dir)
        _build_once(fp32_path, lambda partial: _convert_openvino(net, (height, width), partial), _check_zip)
        if spec.precision.startswith("int8"):
            _build_once(path, lambda partial: _quantize_openvino(fp32_path, partial, _calibration_cells(calibration),
                                                                 _controlled_cells(net, accuracy_control)),
                        _check_zip)
        return path
    _build_once(path, lambda partial: _quantize_pt2e(net, (height, width), spec, partial,
                                                     _calibration_cells(calibration)), _check_zip)
    return path


def read_packaged_file(path: Path, packaged_files: Mapping[str, str]) -> bytes:
    """The bytes of an engine file packaged with a model version, once they match the sha256 its serving.json
    records; refused (SmearnetError) when the file is missing, unlisted or altered. Load these bytes, not the file:
    what was checked is what runs."""
    path = Path(path)
    packaged = sorted(packaged_files)
    if not path.is_file():
        raise SmearnetError(f"The model version carries no engine file {path.name} (it carries {packaged or 'none'}); "
                            "engine files are named by the runtime versions that made them.",
                            "serve it with the requirements it was registered with (same torch, torchao and "
                            "onnxruntime), or re-register the model (register stage) in this environment.")
    if path.name not in packaged_files:
        raise SmearnetError(f"Refusing to load engine file {path.name}: its model version's serving.json records no "
                            "sha256 for it (registered before engine files were hashed, or the file was added).",
                            "re-register the model (register stage) so serving.json lists every engine file's sha256.")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != packaged_files[path.name]:
        raise SmearnetError(f"Refusing to load engine file {path}: its sha256 {digest[:16]}... is not the "
                            f"{str(packaged_files[path.name])[:16]}... serving.json records, so it was altered or "
                            "corrupted after registration (loading it would run whatever it now contains).",
                            "download the model version again, or re-register it from its training outputs "
                            "(register stage).")
    return data


def _build_once(final: Path, write: Callable[[Path], None], check: Callable[[Path], None]) -> None:
    """Make `final` with `write(partial)` unless it exists. Under a file lock (one builder at a time, the others
    wait and reuse its file) `write` fills a unique temporary file, which is checked, flushed to disk and only then
    renamed to `final`; an export that fails, is killed or leaves an unreadable file never takes the final name."""
    if final.is_file():
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(final.with_name(f".{final.name}.lock")):
        if final.is_file():  # built by the process that held the lock before us
            return
        for stale in stale_partials(final):
            stale.unlink(missing_ok=True)  # left by a killed builder: only the lock holder writes partials
        with atomic_file(final) as partial:
            write(partial)
            check(partial)


def _check_onnx(path: Path) -> None:
    import onnx  # heavy: only engines that run ONNX import it

    try:
        onnx.load(str(path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - protobuf decode errors come in several types
        raise SmearnetError(f"The ONNX export {path.name} is unreadable ({type(err).__name__}); it was not kept.",
                            "re-run; if it persists, use inference.engine=eager or compile.") from None


def _check_zip(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError) as err:
        damaged = str(err)
    if damaged is not None:
        raise SmearnetError(f"The engine file {path.name} is unreadable ({damaged}); it was not kept.",
                            "re-run; if it persists, use inference.engine=eager.")


def _calibration_cells(calibration: Callable[[], Sequence[torch.Tensor]] | None) -> Sequence[torch.Tensor]:
    if calibration is None:
        raise SmearnetError("int8 needs calibration cells, and none were given.",
                            "pass the training split's cells (the benchmark and evaluate stages do), or use a "
                            "cached int8 export of this model.")
    return calibration()


def _controlled_cells(net: torch.nn.Module, control: AccuracyControl | None) -> tuple[list, float] | None:
    """The validation batches of `control` with eager fp32's call for each cell (what the quantised network must
    keep), and the loss allowed; None without accuracy control."""
    if control is None:
        return None
    if control.cells is None:
        raise SmearnetError("int8 with accuracy control needs validation cells to measure the loss on, and none "
                            "were given.", "pass the validation split's cells (the benchmark, evaluate and register "
                            "stages do), or use a packaged or cached engine file.")
    reference = net.float().eval()
    with torch.inference_mode():
        items = [(b.contiguous().numpy().astype(np.float32), reference(b).argmax(1).numpy()) for b in control.cells()]
    return items, control.max_drop


def weights_digest(net: torch.nn.Module) -> str:
    """A hash of the network's parameters and buffers: the cache key of its exports."""
    digest = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _onnx_path(net: torch.nn.Module, size: tuple[int, int], precision: str, cache_dir: Path) -> Path:
    import onnxruntime  # heavy: only engines that run ONNX import it

    return cache_dir / f"{weights_digest(net)}-{size[0]}x{size[1]}-ort{onnxruntime.__version__}-{precision}.onnx"


def _export_onnx(net: torch.nn.Module, size: tuple[int, int], path: Path) -> None:
    """Export to `path` with a dynamic batch axis."""
    example = torch.zeros(2, 3, *size)
    try:
        torch.onnx.export(net.float().eval(), (example,), str(path), input_names=["images"],
                          output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)
    except Exception as err:  # noqa: BLE001 - exporter errors come in many types
        raise SmearnetError(f"Exporting the network to ONNX failed ({type(err).__name__}: {err}).",
                            "use inference.engine=eager or compile for this architecture.") from None


def _quantize_int8(fp32_path: Path, int8_path: Path, batches: Sequence[torch.Tensor]) -> None:
    """ONNX Runtime static quantisation: QDQ, per-channel int8 weights, uint8 activations (MinMax on `batches`)."""
    # heavy: only int8 ONNX exports import the quantiser
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._batches = iter([{"images": b.contiguous().numpy().astype(np.float32)} for b in batches])

        def get_next(self):
            return next(self._batches, None)

    prepared = int8_path.with_name(f"{int8_path.stem}.pre.onnx")  # unique: `int8_path` is a unique partial
    try:
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(int8_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    finally:
        prepared.unlink(missing_ok=True)


def _quantize_pt2e(net: torch.nn.Module, size: tuple[int, int], spec: EngineSpec, path: Path,
                   batches: Sequence[torch.Tensor]) -> None:
    """PT2E static int8 of `net` for Inductor: export at the engine's batch size, observe `batches` (histogram
    observers on activations, per-channel weights), convert, and save the quantised program."""
    x86 = _x86_quantizer()
    from torchao.quantization.pt2e import move_exported_model_to_eval  # heavy: only int8 programs import torchao
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    def layout(images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if spec.channels_last else images.contiguous()

    example = layout(torch.zeros(spec.batch_size, 3, *size))
    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    try:
        prepared = prepare_pt2e(torch.export.export(net.float().eval(), (example,)).module(), quantizer)
        cells = torch.cat(list(batches))
        with torch.no_grad():
            for start in range(0, len(cells), spec.batch_size):
                prepared(layout(pad_batch(cells[start:start + spec.batch_size], spec.batch_size)))
        quantized = convert_pt2e(prepared)
        move_exported_model_to_eval(quantized)
        program = torch.export.export(quantized, (example,))
    except Exception as err:  # noqa: BLE001 - export and quantisation errors come in many types
        raise SmearnetError(f"Quantising the network with PT2E failed ({type(err).__name__}: {err}).",
                            "use inference.engine=onnxruntime with precision int8, or compile with bf16.") from None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No complete tensor found")  # CPU weights: the note is moot
        torch.export.save(program, str(path))


def _openvino_path(net: torch.nn.Module, size: tuple[int, int], weights: str, cache_dir: Path) -> Path:
    """The IR file of `net` with `weights` (fp32, int8 or int8-ac<loss>): fp32 and bf16 engines share the fp32 IR
    (bf16 is a runtime hint), int8 and int8+bf16 the quantised one."""
    import openvino  # heavy: only OpenVINO engines import it

    runtime = openvino.get_version().split("-")[0]
    return cache_dir / f"{weights_digest(net)}-{size[0]}x{size[1]}-ov{runtime}-{weights}.ovz"


def _write_ir(model, path: Path) -> None:
    """OpenVINO IR as one uncompressed zip of model.xml and model.bin (weights kept in fp32)."""
    import openvino

    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".ir-") as folder:
        xml = Path(folder) / "model.xml"
        openvino.save_model(model, str(xml), compress_to_fp16=False)
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
            archive.write(xml, "model.xml")
            archive.write(xml.with_suffix(".bin"), "model.bin")


def _read_ir(data: bytes):
    """The OpenVINO model in the zip bytes `data` (read from memory: what was checked is what runs)."""
    import openvino

    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        xml, weights = archive.read("model.xml"), archive.read("model.bin")
    return openvino.Core().read_model(model=xml, weights=openvino.Tensor(np.frombuffer(weights, dtype=np.uint8)))


def _convert_openvino(net: torch.nn.Module, size: tuple[int, int], path: Path) -> None:
    """Convert to OpenVINO IR, from `torch.export` with a dynamic batch axis (the engine fixes the input shape
    when it compiles)."""
    import openvino

    try:
        batch = torch.export.Dim("batch", min=1, max=4096)
        program = torch.export.export(net.float().eval(), (torch.zeros(2, 3, *size),), dynamic_shapes=({0: batch},))
        model = openvino.convert_model(program)
    except Exception as err:  # noqa: BLE001 - converter errors come in many types
        raise SmearnetError(f"Converting the network to OpenVINO failed ({type(err).__name__}: {err}).",
                            "use inference.engine=eager, compile or onnxruntime for this architecture.") from None
    _write_ir(model, path)


def _quantize_openvino(fp32_path: Path, int8_path: Path, batches: Sequence[torch.Tensor],
                       controlled: tuple[list, float] | None = None) -> None:
    """NNCF post-training int8 of the fp32 IR (per-channel weights, activations observed on `batches`). With
    `controlled` ((validation images, eager fp32 calls) batches, the allowed drop of agreement), NNCF's accuracy
    control: layers are put back in floating point, the most harmful first, until agreement keeps that drop."""
    import nncf  # heavy: only int8 OpenVINO engines import it

    model = _read_ir(fp32_path.read_bytes())
    cells = [b.contiguous().numpy().astype(np.float32) for b in batches]
    try:
        if controlled is None:
            quantized = nncf.quantize(model, nncf.Dataset(cells), subset_size=len(cells))  # every batch given
        else:
            items, max_drop = controlled
            quantized = nncf.quantize_with_accuracy_control(
                model, nncf.Dataset(cells), nncf.Dataset(items), _agreement_metric, max_drop=max_drop,
                drop_type=nncf.DropType.ABSOLUTE, subset_size=len(cells))
    except Exception as err:  # noqa: BLE001 - quantiser errors come in many types
        raise SmearnetError(f"Quantising the network with NNCF failed ({type(err).__name__}: {err}).",
                            "use inference.engine=openvino with precision bf16, or onnxruntime int8.") from None
    _write_ir(quantized, int8_path)


def _agreement_metric(compiled, items) -> tuple[float, list[float]]:
    """NNCF's validation function: the share of validation cells a compiled OpenVINO model calls as eager fp32 did,
    and that share per item (a batch of cells: NNCF ranks layers by the items whose share they lower)."""
    output = compiled.output(0)
    same = [np.asarray(compiled(images)[output]).argmax(1) == calls for images, calls in items]
    return float(np.concatenate(same).mean()), [float(batch.mean()) for batch in same]


def _openvino_engine(data: bytes, input_spec: Mapping, spec: EngineSpec) -> Engine:
    """The IR in `data` compiled for the CPU at the engine's batch size (batches are padded to it)."""
    import openvino

    height, width = (int(v) for v in input_spec["input_size"])
    model = _read_ir(data)
    model.reshape([spec.batch_size, 3, height, width])
    hint = "bf16" if spec.precision in ("bf16", "int8+bf16") else "f32"
    compiled = openvino.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                           "INFERENCE_NUM_THREADS": torch.get_num_threads(),
                                                           "PERFORMANCE_HINT": "LATENCY"})
    request, output = compiled.create_infer_request(), compiled.output(0)

    def run(images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.array(request.infer({0: images.contiguous().numpy()})[output], copy=True))

    return Engine(spec, run, pad_batches=True)


def _x86_quantizer():
    """torchao's x86 Inductor quantizer module, imported without the notice torchao sets off in torch's pytree
    registry. Importing it registers the (de)quantise ops PT2E programs call and the Inductor passes that fuse them
    with convolutions into oneDNN int8 kernels: without them a loaded int8 program runs slower than fp32."""
    pytree_log = logging.getLogger("torch.utils._pytree")
    level = pytree_log.level
    pytree_log.setLevel(logging.ERROR)
    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
    finally:
        pytree_log.setLevel(level)
    return x86


def _ort_session(model: bytes):
    import onnxruntime  # heavy: only engines that run ONNX import it

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])

