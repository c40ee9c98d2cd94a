"""Data: decoding, ingest checks, manifests, sources and sites, the patient split, upsampling, the synthetic cohort, torch loaders."""
