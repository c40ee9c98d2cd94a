"""Data, the bottom layer: decoding (decode, formats), manifests and their paths (manifest, paths), ingest checks and
their report (ingest, file_checks, labels, ingest_report), sources and sites, the patient split, upsampling, the
synthetic cohort (synthetic, cell_appearance, cell_render) and torch loaders."""
