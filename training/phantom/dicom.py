"""Re-exports `phantom.dicom` (moved there; see training/phantom/__init__.py)."""

from phantom.dicom import SeriesGeometry, SeriesIdentity, image_header, write_ct_series

__all__ = ["SeriesGeometry", "SeriesIdentity", "image_header", "write_ct_series"]
