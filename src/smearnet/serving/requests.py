"""A request to a served version: checked against the version's `ServingLimits`, then decoded and classified a
batch at a time, and every smear called with the version's rule.

A request is rows of `image` (base64-encoded image bytes) and optional `smear_id`. `check_request` refuses a whole
request that is over a limit before anything is decoded (the served model turns that into HTTP 400); an image that
cannot be decoded (not base64, not an image, more than `max_pixels`) is reported in its row and its smear is called
on the other cells.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd
from PIL import Image

from smearnet.data.decode import decode_image_bytes
from smearnet.errors import SmearnetError
from smearnet.models.inference import TrainedModel
from smearnet.serving.batches import classify_in_batches
from smearnet.smear.calls import call_cells
from smearnet.smear.mil import MILAggregator
from smearnet.smear.rule import SmearRule

DEFAULT_SMEAR = "smear"  # the smear of rows without a smear_id


@dataclass(frozen=True)
class ServingLimits:
    """What one request to a served version may carry (the `serving` config section, packaged in serving.json).

    A request over `max_rows` rows, with an image over `max_image_bytes` or with more than `max_request_bytes` of
    images in all is refused as a whole, before anything is decoded, with HTTP 400 (MLflow's
    INVALID_PARAMETER_VALUE) naming the limit. Sizes are image bytes after base64 decoding (the JSON body is
    about 4/3 of them). Defaults: 512 rows, 8 MiB per image, 64 MiB per request. Rows are decoded and classified
    `batch_size` (16) at a time, so one batch of decoded images is in memory at once; an image of more than
    `max_pixels` (4,000,000) pixels is reported as undecodable in its row, as a corrupt one is (a cell crop has
    about 130,000), which bounds a batch's decoded pixels whatever a compressed file expands to.
    """

    max_rows: int = 512
    max_image_bytes: int = 8 * 2**20
    max_request_bytes: int = 64 * 2**20
    max_pixels: int = 4_000_000
    batch_size: int = 16

    @classmethod
    def from_config(cls, serving: Mapping[str, Any] | None) -> ServingLimits:
        """Limits from the `serving` mapping (missing keys keep their defaults); unknown keys and values < 1 are
        errors."""
        settings = dict(serving or {})
        known = set(cls.__dataclass_fields__)
        unknown = set(settings) - known
        if unknown:
            raise SmearnetError(f"Unknown serving limits {sorted(unknown)} under serving.",
                                f"use only {sorted(known)}.")
        limits = cls(**{key: int(value) for key, value in settings.items()})
        small = {key: value for key, value in asdict(limits).items() if value < 1}
        if small:
            raise SmearnetError(f"Serving limits must be at least 1, got {small}.",
                                "set them under `serving:` in conf/config.yaml (the comments give the defaults).")
        return limits


def decoded_size(encoded: object) -> int:
    """The bytes a base64 text decodes to, computed from its length (nothing is decoded)."""
    text = encoded if isinstance(encoded, str) else str(encoded)
    return max(0, len(text) * 3 // 4 - text.endswith("=") - text.endswith("=="))


def check_request(request: pd.DataFrame, limits: ServingLimits) -> None:
    """Refuse (SmearnetError naming the limit and its config key) a request without an `image` column, with more
    rows than `limits.max_rows`, an image over `limits.max_image_bytes` or more than `limits.max_request_bytes` of
    images in all. Sizes are computed from the base64 text, so nothing is decoded to refuse a request."""
    if "image" not in request:
        raise SmearnetError(f"The request has no `image` column (columns: {list(request.columns)}).",
                            "send rows of `image` (base64-encoded image bytes) and optional `smear_id`.")
    if len(request) > limits.max_rows:
        raise SmearnetError(f"The request has {len(request):,} rows; a request may carry at most {limits.max_rows:,} "
                            "(serving.max_rows).", f"send the cells in requests of at most {limits.max_rows:,} rows "
                            "(a smear's calls need all its cells in one request).")
    sizes = [decoded_size(encoded) for encoded in request["image"]]
    too_big = [(row, size) for row, size in enumerate(sizes) if size > limits.max_image_bytes]
    if too_big:
        row, size = too_big[0]
        raise SmearnetError(f"Row {row}'s image is {size:,} bytes ({len(too_big)} row(s) over the limit); an image "
                            f"may be at most {limits.max_image_bytes:,} bytes (serving.max_image_bytes).",
                            "send cell crops (tens of kilobytes each), not slides or uncompressed scans.")
    if sum(sizes) > limits.max_request_bytes:
        raise SmearnetError(f"The request carries {sum(sizes):,} bytes of images; a request may carry at most "
                            f"{limits.max_request_bytes:,} (serving.max_request_bytes).",
                            "send the cells in smaller requests.")


def classify_request(model: TrainedModel, rule: SmearRule, aggregator: MILAggregator | None, request: pd.DataFrame,
                     limits: ServingLimits) -> pd.DataFrame:
    """One row per cell (`smearnet.smear.calls.call_cells`) for a request `check_request` accepted: rows decoded and
    classified `limits.batch_size` at a time, each smear called on its decodable cells."""
    if "smear_id" in request:
        smear_ids = [str(s) if s is not None and s == s else DEFAULT_SMEAR for s in request["smear_id"]]
    else:
        smear_ids = [DEFAULT_SMEAR] * len(request)
    errors: list[str] = []

    def batches() -> Iterator[list[Image.Image | None]]:
        encoded = list(request["image"])
        for start in range(0, len(encoded), limits.batch_size):
            yield decode_rows(encoded[start:start + limits.batch_size], limits.max_pixels, errors)

    probabilities, embeddings = classify_in_batches(model, batches(), embeddings=rule.uses_mil)
    cells, _ = call_cells(rule, aggregator, model.classes, smear_ids, probabilities, embeddings=embeddings,
                          errors=errors)
    return cells


def decode_rows(encoded: Sequence[object], max_pixels: int, errors: list[str]) -> list[Image.Image | None]:
    """The images of base64 texts (None where one cannot be decoded), appending each row's error ('' if none)."""
    images: list[Image.Image | None] = []
    for text in encoded:
        try:
            images.append(decode_image_bytes(base64.b64decode(str(text), validate=True), max_pixels=max_pixels))
            errors.append("")
        except (binascii.Error, ValueError):
            images.append(None)
            errors.append("undecodable image: not valid base64")
        except SmearnetError as err:
            images.append(None)
            errors.append(err.what)
    return images


__all__ = ["DEFAULT_SMEAR", "ServingLimits", "check_request", "classify_request", "decode_rows", "decoded_size"]
