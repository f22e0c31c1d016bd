"""Infer tasks: reconstruction (f), segmentation (g) and reconstruct_segment (g after f)."""

from lib.infers.reconstruct_segment import ReconstructSegment
from lib.infers.reconstruction import Reconstruction
from lib.infers.segmentation import Segmentation

__all__ = ["Reconstruction", "Segmentation", "ReconstructSegment"]
