"""Explaining smear calls to a pathologist: Grad-CAM heat maps per cell and a self-contained HTML page.

``saliency`` computes (needs the network); ``html`` renders (needs only the values), so a report can be
re-rendered or tested without a model.
"""

from smearnet.explain.html import CALLS, CellExplanation, SmearExplanation, png_bytes, smear_report_html
from smearnet.explain.saliency import feature_layer, grad_cam, overlay
from smearnet.explain.smears import explain_cells, explain_smears

__all__ = [
    "CALLS",
    "CellExplanation",
    "SmearExplanation",
    "explain_cells",
    "explain_smears",
    "feature_layer",
    "grad_cam",
    "overlay",
    "png_bytes",
    "smear_report_html",
]
