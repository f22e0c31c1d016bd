"""MRML nodes <-> TaskAdaptiveCTLib volumes and segments (needs Slicer's MRML, not its GUI).

This is the only layer that touches MRML: scalar volume nodes become
:class:`TaskAdaptiveCTLib.Volume` (array in ``(K, J, I)`` order and the node's IJK -> RAS
matrix) and back, and the app's label volume becomes a segmentation node with the named
segments ``Liver`` (label value 1) and ``Tumor`` (2) in Slicer's standard colours, and back
by segment name. It imports ``slicer`` and ``vtk`` but no Qt, so it also runs headless with
PyPI's ``slicer-core`` (``tests/test_slicer_mrml.py``), where the test provides
``slicer.mrmlScene`` as the application does.
"""

from __future__ import annotations

import numpy as np
import slicer
import vtk

from TaskAdaptiveCTLib.geometry import Volume
from TaskAdaptiveCTLib.segments import SEGMENTS, segments_from_labels


def _matrix_to_numpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _numpy_to_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def volume_from_node(node) -> Volume:
    """A scalar volume node's voxels and IJK -> RAS matrix (a copy; the node is not changed).

    Raises:
        ValueError: the node has no image data, or a parent transform that is not linear.
    """
    if node is None or node.GetImageData() is None:
        raise ValueError("the input volume has no image data; load a CT volume first")
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    ijk_to_ras = _matrix_to_numpy(matrix)
    transform = node.GetParentTransformNode()
    if transform is not None:  # a volume moved in Slicer: send it where the user sees it
        if not transform.IsTransformToWorldLinear():
            raise ValueError(f"volume {node.GetName()!r} is under a non-linear transform; harden it first")
        to_world = vtk.vtkMatrix4x4()
        transform.GetMatrixTransformToWorld(to_world)
        ijk_to_ras = _matrix_to_numpy(to_world) @ ijk_to_ras
    return Volume(np.array(slicer.util.arrayFromVolume(node)), ijk_to_ras)


def update_node_from_volume(node, volume: Volume) -> None:
    """Give ``node`` the volume's voxels and IJK -> RAS matrix (and no parent transform)."""
    node.SetAndObserveTransformNodeID(None)
    node.SetIJKToRASMatrix(_numpy_to_matrix(volume.ijk_to_ras))
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(volume.array))


def add_volume_node(volume: Volume, name: str, class_name: str = "vtkMRMLScalarVolumeNode"):
    """A new volume node in ``slicer.mrmlScene`` holding ``volume``."""
    node = slicer.mrmlScene.AddNewNodeByClass(class_name, name)
    update_node_from_volume(node, volume)
    return node


def _segment_ids(*ids: str) -> vtk.vtkStringArray:
    array = vtk.vtkStringArray()
    for segment_id in ids:
        array.InsertNextValue(segment_id)
    return array


def update_segmentation_from_labels(segmentation_node, labels: Volume, reference_node=None) -> None:
    """Replace the node's segments by ``Liver`` and ``Tumor`` from the app's label volume.

    The label volume is imported once, so each segment's label value is its value in the
    app's labels (1, 2); the segments are then named and given their standard colours. A
    class absent from the labels still gets its (empty) segment, for the clinician to paint.
    """
    segments_from_labels(labels.array)  # checks the values are 0/1/2
    segmentation = segmentation_node.GetSegmentation()
    segmentation.RemoveAllSegments()
    if reference_node is not None:
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
    present = set(np.unique(labels.array).tolist()) - {0}
    if present:
        labelmap = add_volume_node(Volume(labels.array.astype(np.uint8), labels.ijk_to_ras), "__taskadaptivect_labels__",
                                   "vtkMRMLLabelMapVolumeNode")
        try:
            if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation_node):
                raise RuntimeError("could not import the labels into the segmentation")
        finally:
            slicer.mrmlScene.RemoveNode(labelmap)
    by_value = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        by_value[segmentation.GetSegment(segment_id).GetLabelValue()] = segment_id
    for segment in SEGMENTS:
        if segment.value in by_value:
            imported = segmentation.GetSegment(by_value[segment.value])
            imported.SetName(segment.name)
            imported.SetColor(*segment.color)
        else:
            segmentation.AddEmptySegment(segment.name, segment.name, list(segment.color))
    segmentation_node.CreateDefaultDisplayNodes()


def masks_from_segmentation(segmentation_node, reference_node) -> dict[str, np.ndarray]:
    """Every segment of the node by name, as a boolean mask on ``reference_node``'s voxels (``(K, J, I)``)."""
    segmentation = segmentation_node.GetSegmentation()
    labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__taskadaptivect_export__")
    masks = {}
    try:
        for index in range(segmentation.GetNumberOfSegments()):
            segment_id = segmentation.GetNthSegmentID(index)
            name = segmentation.GetSegment(segment_id).GetName()
            if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                    segmentation_node, _segment_ids(segment_id), labelmap, reference_node):
                raise RuntimeError(f"could not export segment {name}")
            masks[name] = np.array(slicer.util.arrayFromVolume(labelmap)) > 0
    finally:
        slicer.mrmlScene.RemoveNode(labelmap)
    return masks


def set_segment_mask(segmentation_node, name: str, mask: np.ndarray, reference_node) -> None:
    """Replace the voxels of segment ``name`` by ``mask`` (``(K, J, I)`` on ``reference_node``'s grid).

    What a Segment Editor stroke does, as a call: for scripts and the module's self-test.
    """
    segmentation = segmentation_node.GetSegmentation()
    segment_id = segmentation.GetSegmentIdBySegmentName(name)
    if not segment_id:
        raise ValueError(f"the segmentation has no segment {name!r}")
    labelmap = add_volume_node(Volume(np.asarray(mask, dtype=np.uint8), volume_from_node(reference_node).ijk_to_ras),
                               "__taskadaptivect_mask__", "vtkMRMLLabelMapVolumeNode")
    try:
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
                labelmap, segmentation_node, _segment_ids(segment_id)):
            raise RuntimeError(f"could not update segment {name}")
    finally:
        slicer.mrmlScene.RemoveNode(labelmap)
