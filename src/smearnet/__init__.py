"""smearnet: cell-level classification and smear-level decisions for blood-cell images."""

__version__ = "0.1.0"
