"""The Slicer module's MRML layer (``TaskAdaptiveCTNodes``) on real MRML, headless, with PyPI's slicer-core.

slicer-core is Slicer's MRML and Segmentations logic without the application or Qt. The
application provides ``slicer.mrmlScene``; here each test makes a real ``vtkMRMLScene``
and puts it there. Volume geometry is checked against the node's own IJK -> RAS matrix and
against a voxel's RAS position computed by hand; segments by name, label value and colour.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from app_server import ROOT

import slicer  # noqa: E402  (PyPI's slicer-core, pinned in requirements.txt)
import vtk  # noqa: E402

sys.path.insert(0, str(ROOT / "TaskAdaptiveCT" / "TaskAdaptiveCT"))

from TaskAdaptiveCTLib import Volume, labels_from_segments  # noqa: E402
from TaskAdaptiveCTLib.segments import LIVER, TUMOR  # noqa: E402
import TaskAdaptiveCTNodes as nodes  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def segmentation_converters():
    """The representation converters that Slicer's Segmentations module registers at start-up."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
    factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())


@pytest.fixture()
def scene():
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene  # what the Slicer application provides
    yield scene
    scene.Clear(1)
    del slicer.mrmlScene


def oblique() -> np.ndarray:
    t = np.radians(17.0)
    rotation = np.array([[np.cos(t), -np.sin(t), 0.1], [np.sin(t), np.cos(t), 0.0], [-0.1, 0.0, 1.0]])
    q, _ = np.linalg.qr(rotation)  # a proper rotation close to it
    matrix = np.eye(4)
    matrix[:3, :3] = q @ np.diag([0.8, 0.9, 2.5])
    matrix[:3, 3] = [-120.5, 88.0, -301.25]
    return matrix


def test_a_volume_goes_into_a_scalar_volume_node_and_back_with_its_oblique_geometry(scene):
    rng = np.random.default_rng(0)
    volume = Volume(rng.normal(0, 100, (4, 6, 7)).astype(np.float32), oblique())
    node = nodes.add_volume_node(volume, "low dose")
    assert node.GetScene() is scene and node.GetName() == "low dose"
    back = nodes.volume_from_node(node)
    np.testing.assert_array_equal(back.array, volume.array)
    np.testing.assert_allclose(back.ijk_to_ras, volume.ijk_to_ras, atol=1e-9)
    # MRML's own idea of where a voxel is: the node's IJK -> RAS on voxel (i, j, k) = (6, 2, 3)
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    ras = matrix.MultiplyPoint((6.0, 2.0, 3.0, 1.0))
    np.testing.assert_allclose(ras[:3], (volume.ijk_to_ras @ [6, 2, 3, 1])[:3], atol=1e-9)
    # the voxel there is array[k, j, i]
    assert slicer.util.arrayFromVolume(node)[3, 2, 6] == volume.array[3, 2, 6]


def test_a_volume_under_a_linear_transform_is_sent_where_the_user_sees_it(scene):
    volume = Volume(np.zeros((2, 3, 4), dtype=np.float32), np.diag([1.0, 1.0, 2.0, 1.0]))
    node = nodes.add_volume_node(volume, "moved")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 15.0)
    transform.SetMatrixTransformToParent(shift)
    node.SetAndObserveTransformNodeID(transform.GetID())
    np.testing.assert_allclose(nodes.volume_from_node(node).ijk_to_ras[:3, 3], [15.0, 0.0, 0.0])


def test_labels_become_named_liver_and_tumor_segments_and_come_back_unflattened(scene):
    reference = nodes.add_volume_node(Volume(np.zeros((3, 10, 12), dtype=np.float32), oblique()), "ct")
    labels = np.zeros((3, 10, 12), dtype=np.uint8)
    labels[:, 2:8, 3:9] = 1
    labels[1, 4:6, 5:7] = 2
    segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segments")
    nodes.update_segmentation_from_labels(segmentation_node, Volume(labels, oblique()), reference)
    segmentation = segmentation_node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 2
    for expected in (LIVER, TUMOR):
        segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(expected.name))
        assert segment.GetLabelValue() == expected.value
        np.testing.assert_allclose(segment.GetColor(), expected.color, atol=1e-6)
    assert not scene.GetFirstNodeByName("__taskadaptivect_labels__"), "the temporary labelmap node is removed"
    masks = nodes.masks_from_segmentation(segmentation_node, reference)
    assert set(masks) == {"Liver", "Tumor"}
    np.testing.assert_array_equal(masks["Tumor"], labels == 2)
    np.testing.assert_array_equal(labels_from_segments(masks), labels)
    # a clinician's correction: the tumour painted over, inside the Liver segment as well
    corrected = masks["Liver"] | masks["Tumor"]
    tumour = np.zeros_like(corrected)
    tumour[2, 3:5, 4:6] = True
    nodes.set_segment_mask(segmentation_node, "Liver", corrected, reference)
    nodes.set_segment_mask(segmentation_node, "Tumor", tumour, reference)
    submitted = labels_from_segments(nodes.masks_from_segmentation(segmentation_node, reference))
    assert (submitted == 2).sum() == tumour.sum() and (submitted[tumour] == 2).all()
    assert ((submitted == 1) == (corrected & ~tumour)).all()
