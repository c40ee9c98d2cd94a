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

Exports and quantised programs are cached under ``cache_dir`` by a hash of the weights, so a model version is
exported (and calibrated) once; `engine_artifact` names the file a registered version carries.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from smearnet.errors import SmearnetError
from smearnet.io import atomic_file

ENGINES = ("eager", "compile", "onnxruntime")
PRECISIONS = {"eager": ("fp32", "bf16"), "compile": ("fp32", "bf16", "int8", "int8+bf16"),
              "onnxruntime": ("fp32", "int8")}


@dataclass(frozen=True)
class EngineSpec:
    """What runs a network for inference (the `inference` config section)."""

    engine: str = "eager"
    precision: str = "fp32"
    channels_last: bool = False
    batch_size: int = 8
    tta: bool = False  # mean logits over the 8 flips/right-angle rotations (4 flips for non-square inputs)

    @property
    def label(self) -> str:
        return (f"{self.engine}-{self.precision}" + ("-cl" if self.channels_last and self.engine != "onnxruntime" else "")
                + ("-tta" if self.tta else ""))


def engine_spec(cfg: Mapping | None = None, **overrides) -> EngineSpec:
    """An `EngineSpec` from the `inference` config section (or defaults), checked; `overrides` win."""
    values = {key: (cfg or {}).get(key, default) for key, default in asdict(EngineSpec()).items()}
    values.update({k: v for k, v in overrides.items() if v is not None})
    spec = EngineSpec(engine=str(values["engine"]), precision=str(values["precision"]),
                      channels_last=bool(values["channels_last"]), batch_size=int(values["batch_size"]),
                      tta=bool(values["tta"]))
    if spec.engine not in ENGINES:
        raise SmearnetError(f"Unknown inference.engine `{spec.engine}`.", f"use one of {', '.join(ENGINES)}.")
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
                 calibration: Callable[[], Sequence[torch.Tensor]] | None = None) -> Engine:
    """An engine running `net` (in eval mode) as `spec` says.

    `calibration` returns batches of preprocessed training cells; only int8 needs it (once per cached model).
    `cache_dir` keeps ONNX exports and quantised programs between runs (a temporary folder when None).
    """
    net = net.eval()
    if spec.engine == "onnxruntime":
        session = _ort_session(engine_artifact(net, input_spec, spec, cache_dir=cache_dir, calibration=calibration))
        input_name = session.get_inputs()[0].name

        def run_ort(images: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {input_name: images.contiguous().numpy()})[0])

        return Engine(spec, run_ort)
    if spec.precision.startswith("int8"):
        path = engine_artifact(net, input_spec, spec, cache_dir=cache_dir, calibration=calibration)
        _x86_quantizer()  # the ops the saved program calls and the passes that lower it to int8 kernels
        net = torch.export.load(str(path)).module()
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
    import contextlib

    if not enabled:
        return contextlib.nullcontext()
    import torch._inductor.config

    return torch._inductor.config.patch(freezing=True)


def runs_from_artifact(spec: EngineSpec) -> bool:
    """Whether the engine runs from a file made from the weights (an ONNX export, an int8 program)."""
    return spec.engine == "onnxruntime" or spec.precision.startswith("int8")


def engine_artifact(net: torch.nn.Module, input_spec: Mapping, spec: EngineSpec, *, cache_dir: Path | None,
                    calibration: Callable[[], Sequence[torch.Tensor]] | None) -> Path | None:
    """The file the engine runs from, made (exported, calibrated) only when not cached yet: the ONNX model for
    ONNX Runtime, the quantised PyTorch program for compile int8, None for engines that run `net` as it is."""
    if not runs_from_artifact(spec):
        return None
    import tempfile

    cache_dir = Path(cache_dir) if cache_dir is not None else Path(tempfile.mkdtemp(prefix="smearnet-engines-"))
    height, width = (int(v) for v in input_spec["input_size"])
    if spec.engine == "onnxruntime":
        return _onnx_file(net, (height, width), spec, cache_dir, calibration)
    from importlib.metadata import version

    layout = "cl" if spec.channels_last else "nchw"
    path = cache_dir / (f"{weights_digest(net)}-{height}x{width}-b{spec.batch_size}-{layout}-torch{torch.__version__}"
                        f"-torchao{version('torchao')}-int8.pt2")
    if not path.is_file():
        _quantize_pt2e(net, (height, width), spec, path, _calibration_cells(calibration))
    return path


def _calibration_cells(calibration: Callable[[], Sequence[torch.Tensor]] | None) -> Sequence[torch.Tensor]:
    if calibration is None:
        raise SmearnetError("int8 needs calibration cells, and none were given.",
                            "pass the training split's cells (the benchmark and evaluate stages do), or use a "
                            "cached int8 export of this model.")
    return calibration()


def weights_digest(net: torch.nn.Module) -> str:
    """A hash of the network's parameters and buffers: the cache key of its exports."""
    digest = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _onnx_file(net: torch.nn.Module, size: tuple[int, int], spec: EngineSpec, cache_dir: Path,
               calibration: Callable[[], Sequence[torch.Tensor]] | None) -> Path:
    """The ONNX file (fp32, or int8 QDQ) for `net`, exported or quantised only when not cached yet."""
    import onnxruntime

    key = f"{weights_digest(net)}-{size[0]}x{size[1]}-ort{onnxruntime.__version__}"
    fp32_path = cache_dir / f"{key}-fp32.onnx"
    if not fp32_path.is_file():
        _export_onnx(net, size, fp32_path)
    if spec.precision == "fp32":
        return fp32_path
    int8_path = cache_dir / f"{key}-int8.onnx"
    if not int8_path.is_file():
        _quantize_int8(fp32_path, int8_path, _calibration_cells(calibration))
    return int8_path


def _export_onnx(net: torch.nn.Module, size: tuple[int, int], path: Path) -> None:
    """Export with a dynamic batch axis; a failed export leaves nothing (`atomic_file`)."""
    example = torch.zeros(2, 3, *size)
    try:
        with atomic_file(path) as partial:
            torch.onnx.export(net.float().eval(), (example,), str(partial), input_names=["images"],
                              output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                              opset_version=17, dynamo=False)
    except Exception as err:  # noqa: BLE001 - exporter errors come in many types
        raise SmearnetError(f"Exporting the network to ONNX failed ({type(err).__name__}: {err}).",
                            "use inference.engine=eager or compile for this architecture.") from None


def _quantize_int8(fp32_path: Path, int8_path: Path, batches: Sequence[torch.Tensor]) -> None:
    """ONNX Runtime static quantisation: QDQ, per-channel int8 weights, uint8 activations (MinMax on `batches`)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._batches = iter([{"images": b.contiguous().numpy().astype(np.float32)} for b in batches])

        def get_next(self):
            return next(self._batches, None)

    prepared = int8_path.with_suffix(".pre.onnx")
    try:
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        with atomic_file(int8_path) as partial:
            quantize_static(str(prepared), str(partial), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    finally:
        prepared.unlink(missing_ok=True)


def _quantize_pt2e(net: torch.nn.Module, size: tuple[int, int], spec: EngineSpec, path: Path,
                   batches: Sequence[torch.Tensor]) -> None:
    """PT2E static int8 of `net` for Inductor: export at the engine's batch size, observe `batches` (histogram
    observers on activations, per-channel weights), convert, and save the quantised program."""
    x86 = _x86_quantizer()
    from torchao.quantization.pt2e import move_exported_model_to_eval
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
    with atomic_file(path) as partial, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No complete tensor found")  # CPU weights: the note is moot
        torch.export.save(program, str(partial))


def _x86_quantizer():
    """torchao's x86 Inductor quantizer module, imported without the notice torchao sets off in torch's pytree
    registry. Importing it registers the (de)quantise ops PT2E programs call and the Inductor passes that fuse them
    with convolutions into oneDNN int8 kernels: without them a loaded int8 program runs slower than fp32."""
    import logging

    pytree_log = logging.getLogger("torch.utils._pytree")
    level = pytree_log.level
    pytree_log.setLevel(logging.ERROR)
    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
    finally:
        pytree_log.setLevel(level)
    return x86


def _ort_session(path: Path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

