"""Re-exports `phantom.radiograph` (moved there; see training/phantom/__init__.py)."""

from phantom.radiograph import (DEFAULT_SIZE, DEFAULT_SPACING, DX_FOR_PRESENTATION, Nodule, chest_radiograph,
                                make_dx_dataset, write_dx)

__all__ = ["DEFAULT_SIZE", "DEFAULT_SPACING", "DX_FOR_PRESENTATION", "Nodule", "chest_radiograph",
           "make_dx_dataset", "write_dx"]
