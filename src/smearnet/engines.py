"""Inference engines: one trained network run eager, `torch.compile`d or through ONNX Runtime, in fp32, bf16 or int8.

An engine maps a batch of preprocessed cells (N x 3 x H x W, float32, as `smearnet.data.cell_tensor` makes them)
to float32 logits. Which one runs is configuration (`inference.engine`, `inference.precision`,
`inference.channels_last`), read by the benchmark, evaluate, predict and serving code alike:

- ``eager``: PyTorch as trained; ``bf16`` runs under CPU autocast (AMX/AVX-512 BF16 where the CPU has them).
- ``compile``: ``torch.compile`` (Inductor, C++ codegen) of the same; every batch is padded to the engine's batch
  size so one graph serves them all instead of recompiling for the last, smaller batch.
- ``onnxruntime``: the network exported to ONNX (RepVGG already re-parameterised by `load_trained`), run by ONNX
  Runtime with full graph optimisation; ``int8`` is ONNX Runtime static quantisation (QDQ, per-channel weights)
  calibrated on training cells. Exports are cached under ``cache_dir`` by a hash of the weights, so a model
  version is exported once.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from smearnet.errors import SmearnetError

ENGINES = ("eager", "compile", "onnxruntime")
PRECISIONS = {"eager": ("fp32", "bf16"), "compile": ("fp32", "bf16"), "onnxruntime": ("fp32", "int8")}


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
            if self._pad and real < size:  # one static shape for compiled graphs
                batch = torch.cat([batch, batch[-1:].expand(size - real, *batch.shape[1:])])
            if self.spec.tta:
                views = dihedral_views(batch)
                chunks.append(torch.stack([self._run(view)[:real].float() for view in views]).mean(0))
            else:
                chunks.append(self._run(batch)[:real].float())
        if not chunks:
            return torch.zeros((0, 0))
        return torch.cat(chunks)


def dihedral_views(images: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips/right-angle rotations of square images (4 flips of non-square ones): a cell has no up or left."""
    flips = [images, images.flip(-1)]
    if images.shape[-1] != images.shape[-2]:
        return [*flips, images.flip(-2), images.flip(-1).flip(-2)]
    return [torch.rot90(view, k, dims=(-2, -1)).contiguous() for view in flips for k in range(4)]


def build_engine(net: torch.nn.Module, input_spec: Mapping, spec: EngineSpec, *, cache_dir: Path | None = None,
                 calibration: Callable[[], Sequence[torch.Tensor]] | None = None) -> Engine:
    """An engine running `net` (in eval mode) as `spec` says.

    `calibration` returns batches of preprocessed training cells; only ONNX Runtime int8 needs it (once per
    cached model). `cache_dir` keeps ONNX exports between runs (a temporary folder when None).
    """
    net = net.eval()
    if spec.engine in ("eager", "compile"):
        if spec.channels_last:
            net = net.to(memory_format=torch.channels_last)
        module = torch.compile(net, dynamic=False) if spec.engine == "compile" else net
        bf16 = spec.precision == "bf16"

        def run(images: torch.Tensor) -> torch.Tensor:
            if spec.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return module(images)

        return Engine(spec, run, pad_batches=spec.engine == "compile")
    path = onnx_model(net, input_spec, spec, cache_dir=cache_dir, calibration=calibration)
    session = _ort_session(path)
    input_name = session.get_inputs()[0].name

    def run_ort(images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {input_name: images.contiguous().numpy()})[0])

    return Engine(spec, run_ort)


def weights_digest(net: torch.nn.Module) -> str:
    """A hash of the network's parameters and buffers: the cache key of its exports."""
    digest = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def onnx_model(net: torch.nn.Module, input_spec: Mapping, spec: EngineSpec, *, cache_dir: Path | None,
               calibration: Callable[[], Sequence[torch.Tensor]] | None) -> Path:
    """The ONNX file (fp32, or int8 QDQ) for `net`, exported or quantised only when not cached yet."""
    import tempfile

    import onnxruntime

    height, width = (int(v) for v in input_spec["input_size"])
    cache_dir = Path(cache_dir) if cache_dir is not None else Path(tempfile.mkdtemp(prefix="smearnet-onnx-"))
    key = f"{weights_digest(net)}-{height}x{width}-ort{onnxruntime.__version__}"
    fp32_path = cache_dir / f"{key}-fp32.onnx"
    if not fp32_path.is_file():
        _export_onnx(net, (height, width), fp32_path)
    if spec.precision == "fp32":
        return fp32_path
    int8_path = cache_dir / f"{key}-int8.onnx"
    if not int8_path.is_file():
        if calibration is None:
            raise SmearnetError("ONNX Runtime int8 needs calibration cells, and none were given.",
                                "pass the training split's cells (the benchmark and evaluate stages do), or use "
                                "a cached int8 export of this model.")
        _quantize_int8(fp32_path, int8_path, calibration())
    return int8_path


def _export_onnx(net: torch.nn.Module, size: tuple[int, int], path: Path) -> None:
    """Export with a dynamic batch axis; written to a temporary name first so a failed export leaves nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, 3, *size)
    partial = path.with_suffix(".partial")
    try:
        torch.onnx.export(net.float().eval(), (example,), str(partial), input_names=["images"],
                          output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)
    except Exception as err:  # noqa: BLE001 - exporter errors come in many types
        partial.unlink(missing_ok=True)
        raise SmearnetError(f"Exporting the network to ONNX failed ({type(err).__name__}: {err}).",
                            "use inference.engine=eager or compile for this architecture.") from None
    os.replace(partial, path)


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
    partial = int8_path.with_suffix(".partial")
    try:
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(partial), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        os.replace(partial, int8_path)
    finally:
        prepared.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)


def _ort_session(path: Path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

