"""What the TaskAdaptiveCT Slicer module does, without Slicer: pure Python (numpy, requests, SimpleITK).

* :mod:`~TaskAdaptiveCTLib.client`: the app's HTTP API with timeouts and clear errors;
* :mod:`~TaskAdaptiveCTLib.geometry`: volumes with their IJK -> RAS matrix, files, slabs;
* :mod:`~TaskAdaptiveCTLib.job`: Reconstruct & Segment in slabs, with progress, time left and cancel;
* :mod:`~TaskAdaptiveCTLib.segments`: Liver and Tumor segments and the app's label values;
* :mod:`~TaskAdaptiveCTLib.correction`: a corrected segmentation sent back as the ``final`` label.

Nothing here imports ``slicer``, ``qt``, ``ctk`` or ``vtk``, so all of it is tested with pytest
against a real server (``tests/test_slicer_lib.py``).
"""

from TaskAdaptiveCTLib.client import (ConnectionFailed, InferReply, MalformedReply, RequestFailed, ServerError,
                                      ServerModels, TaskAdaptiveClient)
from TaskAdaptiveCTLib.correction import image_id_for, submit_correction
from TaskAdaptiveCTLib.geometry import Volume, read_volume, slab, slice_axis, write_volume
from TaskAdaptiveCTLib.job import JobResult, Progress, ReconstructSegmentJob, format_duration
from TaskAdaptiveCTLib.segments import LIVER, SEGMENTS, TUMOR, labels_from_segments, segments_from_labels

__all__ = ["ConnectionFailed", "InferReply", "JobResult", "LIVER", "MalformedReply", "Progress", "ReconstructSegmentJob",
           "RequestFailed", "SEGMENTS", "ServerError", "ServerModels", "TUMOR", "TaskAdaptiveClient", "Volume",
           "format_duration", "image_id_for", "labels_from_segments", "read_volume", "segments_from_labels", "slab",
           "slice_axis", "submit_correction", "write_volume"]
