"""Data, the bottom layer: decoding (decode, formats), manifests and their paths (manifest, paths), ingest checks and
their report (ingest, file_checks, labels, ingest_report), sources and sites, the patient split, upsampling, the
synthetic cohort (synthetic, cell_appearance, cell_render) and torch loaders."""

import os

# albumentations asks PyPI for a newer version on import (up to 2 s, a network call from a clinical pipeline, a
# warning when offline). Set once here, before upsample or the loaders' stain augmentation import it; the user
# can still opt in by setting the variable to 0.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
