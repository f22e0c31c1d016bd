"""TaskAdaptiveCT science core: low-dose CT simulation, baselines, metrics and reports.

This package knows nothing of MONAI Label or 3D Slicer; the app in ``apps/`` and the
Slicer extension in ``TaskAdaptiveCT/`` build on it.
"""

__version__ = "0.1.0"
