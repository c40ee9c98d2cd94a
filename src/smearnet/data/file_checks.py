"""Read, hash, decode and size-check every image a manifest lists, in a process pool when asked."""

from __future__ import annotations

import hashlib
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from tqdm import tqdm

from smearnet.data.decode import (TOO_LARGE, UNREADABLE, ImageProblem, decode_image, folder_names_by_key,
                                  read_image_bytes, short_message)
from smearnet.errors import SmearnetError

TOO_SMALL = "too_small"


@dataclass(frozen=True)
class FileCheck:
    """Result of reading and decoding one file; ``check`` is None when the file is usable.

    ``notes`` name what the decoder accepted but ignored (see smearnet.data.decode.DecodedImage).
    """

    check: str | None
    reason: str | None
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    mode: str | None = None
    notes: tuple[str, ...] = ()


def check_file(task: tuple[str, int, int]) -> FileCheck:
    """Read, hash, decode and size-check one file: ``task`` is (path, min_size, max_pixels).

    A top-level function of one picklable argument, so a process pool can run it.
    """
    path, min_size, max_pixels = task
    try:
        data = read_image_bytes(path, max_pixels)
        decoded = decode_image(data, max_pixels)
    except ImageProblem as problem:
        return FileCheck(problem.check, problem.reason)
    except SmearnetError:
        raise
    except MemoryError:
        return FileCheck(TOO_LARGE, "too large (out of memory while decoding)")
    except Exception as exc:
        return FileCheck(UNREADABLE, f"unreadable ({short_message(exc)})")
    digest = hashlib.sha256(data).hexdigest()
    width, height = decoded.rgb.size
    if min(width, height) < min_size:
        return FileCheck(TOO_SMALL, f"too small ({width}x{height} px; both sides must be at least {min_size} px)",
                         digest, width, height, decoded.mode)
    notes = decoded.notes
    if all(low == high for low, high in decoded.rgb.getextrema()):
        notes += ("blank image (every pixel has the same colour; an export placeholder?)",)
    return FileCheck(None, None, digest, width, height, decoded.mode, notes)


def run_file_checks(paths: list[str], min_size: int, max_pixels: int, workers: int, progress: bool) -> list[FileCheck]:
    """Check every path, in order; a process pool when workers > 1, in-process otherwise."""
    tasks = [(path, min_size, max_pixels) for path in paths]
    folder_names_by_key.cache_clear()  # file-name hints must reflect the folders as they are now
    if workers == 1 or len(tasks) < 2:
        with tqdm(total=len(tasks), desc="Validating images", unit="img", disable=not progress) as bar:
            results = []
            for task in tasks:
                results.append(check_file(task))
                bar.update()
            return results
    chunksize = max(1, min(64, len(tasks) // (workers * 8)))
    try:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            # map() submits everything (forking the workers) before tqdm starts its monitor thread.
            ordered_results = pool.map(check_file, tasks, chunksize=chunksize)
            with tqdm(total=len(tasks), desc="Validating images", unit="img", disable=not progress) as bar:
                results = []
                for result in ordered_results:
                    results.append(result)
                    bar.update()
                return results
    except BrokenProcessPool:
        raise SmearnetError(
            "An image-validation worker process died during ingest (usually out of memory while decoding a "
            "very large image).",
            "lower ingest.workers or ingest.max_pixels and re-run.",
        ) from None
