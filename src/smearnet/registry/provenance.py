"""What a registered version was made from, as tags: the DVC revision of its model and split (dvc.lock).

The git revision and params come from `smearnet.tracking.runs.revision_tags`; this adds what only DVC knows.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml


def dvc_revision_tags(lock_path: Path, backbone: str) -> dict[str, str]:
    """The DVC revision of what is registered: dvc.lock's hash and the md5s of the model and split outputs."""
    lock_path = Path(lock_path)
    if not lock_path.is_file():
        return {}
    tags = {"dvc.lock_sha": hashlib.sha256(lock_path.read_bytes()).hexdigest()[:12]}
    stages = (yaml.safe_load(lock_path.read_text()) or {}).get("stages", {})
    for stage in stages.values():
        for out in stage.get("outs", []):
            if out.get("path") == f"models/{backbone}":
                tags["dvc.model_md5"] = str(out.get("md5"))
            elif out.get("path") == "data/split":
                tags["dvc.split_md5"] = str(out.get("md5"))
    return tags


__all__ = ["dvc_revision_tags"]
