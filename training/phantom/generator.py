"""Re-exports `phantom.generator` (moved there; see training/phantom/__init__.py)."""

from phantom.generator import AIR_HU, BODY_HU, Ellipsoid, Phantom, random_phantom

__all__ = ["AIR_HU", "BODY_HU", "Ellipsoid", "Phantom", "random_phantom"]
