"""The module's widget and logic driven end to end, with a MOCK of Slicer's GUI layer.

3D Slicer's application (Qt, CTK, the module framework, the views) cannot be installed
here, so this test replaces exactly that, and nothing else, with stand-ins named ``Mock*``:
``qt`` (a timer the test fires by hand, in-memory settings), the widgets of the module's
``.ui`` (plain attribute holders with signals, one per object name in the real ``.ui``),
``slicer.ScriptedLoadableModule`` and ``slicer.parameterNodeWrapper`` (minimal base classes
and an attribute-bag parameter node), and the few ``slicer.util`` calls that need the
application (loading the ``.ui``, message boxes, the slice viewers). Everything else is
real: MRML scenes, volume and segmentation nodes and the Segmentations logic from
``slicer-core``, the Lib, and a ``monailabel`` server running the app over HTTP.

What it shows that the other tests cannot: the widget's own control flow (requests on a
worker thread, results applied when the timer fires, Reconstruct & Segment becoming Cancel,
the outcome and error messages the user sees, the nodes it creates and their geometry).
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import threading
import time
import types
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from app_server import ROOT, MonaiLabelServer, write_models

import slicer  # noqa: E402  (PyPI's slicer-core: real MRML)

MODULE_DIR = ROOT / "TaskAdaptiveCT" / "TaskAdaptiveCT"


# ------------------------------------------------------------------ the mock of Slicer's GUI layer


class MockSignal:
    def __init__(self) -> None:
        self.slots = []

    def connect(self, slot) -> None:
        self.slots.append(slot)

    def emit(self, *args) -> None:
        for slot in self.slots:
            slot(*args)


class MockTimer:
    """qt.QTimer whose timeouts the test fires (``fire``)."""

    def __init__(self) -> None:
        self.timeout, self.active, self.interval = MockSignal(), False, 0

    def setInterval(self, ms: int) -> None:  # noqa: N802
        self.interval = ms

    def start(self) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False


class MockSettings:
    store: dict = {}

    def value(self, key):
        return self.store.get(key)

    def setValue(self, key, value) -> None:  # noqa: N802
        self.store[key] = value


class MockWidget:
    """Any widget of the .ui: the properties and signals the module uses."""

    def __init__(self, name: str, cls: str) -> None:
        self.name, self.cls = name, cls
        self.text, self.enabled, self.visible, self.checked, self.value = "", True, True, False, 0.0
        self.clicked, self.toggled, self.valueChanged, self.currentIndexChanged = (MockSignal() for _ in range(4))
        self.items: list[tuple[str, object]] = []
        self._index = -1
        self.calls: list[tuple] = []

    # QComboBox
    @property
    def currentText(self) -> str:  # noqa: N802
        return self.items[self._index][0] if 0 <= self._index < len(self.items) else self.text

    @currentText.setter
    def currentText(self, text: str) -> None:  # noqa: N802
        self.text, self._index = text, -1

    @property
    def currentIndex(self) -> int:  # noqa: N802
        return self._index

    @currentIndex.setter
    def currentIndex(self, index: int) -> None:  # noqa: N802
        self._index = index
        self.currentIndexChanged.emit(index)

    @property
    def count(self) -> int:
        return len(self.items)

    def addItem(self, text, data=None) -> None:  # noqa: N802
        self.items.append((text, data))

    def addItems(self, texts) -> None:  # noqa: N802
        for text in texts:
            self.addItem(text)
        if self._index < 0 and self.items:
            self._index = 0

    def clear(self) -> None:
        self.items, self._index = [], -1

    def findData(self, data) -> int:  # noqa: N802
        return next((i for i, (_, d) in enumerate(self.items) if d == data), -1)

    def itemData(self, index):  # noqa: N802
        return self.items[index][1]

    def itemText(self, index):  # noqa: N802
        return self.items[index][0]

    def __getattr__(self, name):  # setMRMLScene, setSegmentationNode, ...: recorded
        if name.startswith("set"):
            return lambda *args: self.calls.append((name, *args))
        raise AttributeError(name)


class MockParameterNode:
    """What parameterNodeWrapper gives: typed attributes with defaults; GUI binding left out."""

    def __init__(self, defaults: dict) -> None:
        self.__dict__.update(defaults)

    def connectGui(self, ui):  # noqa: N802
        return "tag"

    def AddObserver(self, event, callback, priority=0.0):  # noqa: N802
        return id(callback)

    def RemoveObserver(self, tag) -> None:  # noqa: N802
        pass

    def disconnectGui(self, tag) -> None:  # noqa: N802
        pass


def mock_parameter_node_wrapper(cls):
    defaults = {name: getattr(cls, name, None) for name in cls.__annotations__}
    return lambda node=None: MockParameterNode(defaults)


class MockModuleWidget:
    def __init__(self, parent=None) -> None:
        self.parent = parent or types.SimpleNamespace(isEntered=True)
        self.layout = types.SimpleNamespace(addWidget=lambda widget: None)

    def setup(self) -> None:
        pass

    def resourcePath(self, relative: str) -> str:  # noqa: N802
        return str(MODULE_DIR / "Resources" / relative)


@pytest.fixture(scope="module")
def gui(tmp_path_factory):
    """The module imported over the mock GUI layer, with a real scene, and what the mocks recorded."""
    recorded = {"errors": [], "layers": []}
    scene = slicer.vtkMRMLScene()
    scene.RegisterNodeClass(slicer.vtkMRMLSegmentEditorNode())
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
    factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())
    ui_names = {w.get("name"): w.get("class") for w in
                ElementTree.parse(MODULE_DIR / "Resources" / "UI" / "TaskAdaptiveCT.ui").getroot().iter("widget")}

    mock_qt = types.ModuleType("qt")
    mock_qt.QTimer, mock_qt.QSettings = MockTimer, MockSettings
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    scripted.ScriptedLoadableModule = type("ScriptedLoadableModule", (), {"__init__": lambda self, parent: setattr(self, "parent", parent)})
    scripted.ScriptedLoadableModuleWidget = MockModuleWidget
    scripted.ScriptedLoadableModuleLogic = type("ScriptedLoadableModuleLogic", (), {
        "__init__": lambda self: None, "getParameterNode": lambda self: None})
    scripted.ScriptedLoadableModuleTest = type("ScriptedLoadableModuleTest", (), {})
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper, wrapper.WithinRange = mock_parameter_node_wrapper, lambda low, high: (low, high)

    @contextlib.contextmanager
    def try_with_error_display(message, waitCursor=False):  # noqa: N803
        yield

    patches = {"loadUI": lambda path: types.SimpleNamespace(setMRMLScene=lambda s: None),
               "childWidgetVariables": lambda widget: types.SimpleNamespace(
                   **{name: MockWidget(name, cls) for name, cls in ui_names.items()}),
               "errorDisplay": lambda text, windowTitle="": recorded["errors"].append((windowTitle, text)),
               "setSliceViewerLayers": lambda **kwargs: recorded["layers"].append(kwargs),
               "tryWithErrorDisplay": try_with_error_display}
    saved = {name: getattr(slicer.util, name, None) for name in patches}
    for name, value in patches.items():
        setattr(slicer.util, name, value)
    sys.modules.update({"qt": mock_qt, "slicer.ScriptedLoadableModule": scripted, "slicer.parameterNodeWrapper": wrapper})
    slicer.ScriptedLoadableModule, slicer.parameterNodeWrapper, slicer.mrmlScene = scripted, wrapper, scene
    sys.path.insert(0, str(MODULE_DIR))
    module = importlib.import_module("TaskAdaptiveCT")
    nodes = importlib.import_module("TaskAdaptiveCTNodes")
    try:
        yield types.SimpleNamespace(module=module, nodes=nodes, scene=scene, recorded=recorded)
    finally:
        for name, value in saved.items():
            setattr(slicer.util, name, value)
        for name in ("qt", "slicer.ScriptedLoadableModule", "slicer.parameterNodeWrapper", "TaskAdaptiveCT"):
            sys.modules.pop(name, None)
        del slicer.mrmlScene
        sys.path.remove(str(MODULE_DIR))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("widget")
    write_models(root / "models")
    studies = root / "studies"
    studies.mkdir()
    server = MonaiLabelServer(studies, root, conf={"models": str(root / "models"), "batch_size": "2"})
    yield server
    server.stop()


def fire_until(widget, condition, seconds: float = 120.0) -> None:
    """Fire the widget's timer (as Qt's event loop would) until ``condition()`` holds."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the widget did not finish in time"
        widget._timer.timeout.emit()
        time.sleep(0.02)


def test_the_widget_reconstructs_segments_cancels_and_submits_through_the_real_server(gui, server, monkeypatch):
    nodes, scene, recorded = gui.nodes, gui.scene, gui.recorded
    widget = gui.module.TaskAdaptiveCTWidget()
    widget.setup()
    ui = widget.ui
    assert ui.applyButton.enabled is False  # no volume in the scene yet

    # Test connection: the variants fill from /info/ on the GUI thread, the default chosen
    ui.serverUrlComboBox.currentText = server.url
    widget.onTestConnection()
    fire_until(widget, lambda: not widget._pending)
    assert [data for _, data in ui.variantComboBox.items] == ["baseunet", "joint0.5", "ta0.5"]
    assert ui.variantComboBox.currentText.startswith("ta0.5 (α = 0.5") and widget._parameterNode.variant == "ta0.5"
    assert ui.serverStatusLabel.text.startswith("Connected: TaskAdaptiveCT, 3 reconstruction variant(s)")
    assert MockSettings.store["TaskAdaptiveCT/recentServerUrls"][0] == server.url

    # an oblique low-dose volume; Reconstruct & Segment becomes Cancel while it runs
    rng = np.random.default_rng(1)
    array = np.full((5, 40, 44), -1000.0, dtype=np.float32)
    array[:, 6:34, 4:40] = 40.0
    array[:, 10:22, 8:24] = 170.0
    array += rng.normal(0, 30, array.shape).astype(np.float32)
    t = np.radians(9.0)
    matrix = np.eye(4)
    matrix[:3, :3] = np.array([[-np.cos(t), np.sin(t), 0], [-np.sin(t), -np.cos(t), 0], [0, 0, 1]]) @ np.diag([1.9, 1.9, 3.0])
    matrix[:3, 3] = [60.0, 45.0, -80.0]
    volume_node = nodes.add_volume_node(gui.module.Volume(array, matrix), "patient 7")
    widget._parameterNode.inputVolume = volume_node
    widget._parameterNode.slabSlices = 2
    widget._updateButtons()
    widget.onApplyOrCancel()
    assert ui.applyButton.text == "Cancel" and ui.progressBar.visible
    fire_until(widget, lambda: widget._job is None)
    assert recorded["errors"] == []
    assert ui.progressLabel.text.startswith("Done: 5/5 slices in") and ui.progressBar.value == 100
    assert ui.applyButton.text == "Reconstruct && Segment" and ui.submitCorrectionButton.enabled
    reconstruction, segmentation = widget._parameterNode.reconstructionVolume, widget._parameterNode.segmentation
    assert reconstruction.GetName() == "patient 7 reconstruction (ta0.5)"
    sent, back = nodes.volume_from_node(volume_node), nodes.volume_from_node(reconstruction)
    np.testing.assert_array_equal(back.ijk_to_ras, sent.ijk_to_ras)
    assert back.array.shape == sent.array.shape and back.array.dtype == np.float32
    names = {segmentation.GetSegmentation().GetNthSegment(i).GetName() for i in range(2)}
    assert names == {"Liver", "Tumor"}
    assert recorded["layers"][-1]["background"] is reconstruction and recorded["layers"][-1]["foreground"] is volume_node
    assert ("setSegmentationNode", segmentation) in ui.segmentEditorWidget.calls

    # Cancel during the second slab: that slab is answered, no third is sent, nothing new in the scene.
    # The second request waits at a gate until the test has clicked Cancel, so the click lands mid-job.
    volumes_before = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    client_class, sent, gate = gui.module.TaskAdaptiveClient, [], threading.Event()
    original = client_class.infer_file

    def gated(self, *args, **kwargs):
        sent.append(args)
        if len(sent) == 2:
            assert gate.wait(60), "the test never clicked Cancel"
        return original(self, *args, **kwargs)

    monkeypatch.setattr(client_class, "infer_file", gated)
    widget._parameterNode.slabSlices = 1
    widget.onApplyOrCancel()
    fire_until(widget, lambda: len(sent) == 2)
    widget.onApplyOrCancel()  # the Cancel button
    assert ui.applyButton.enabled is False and ui.applyButton.text == "Cancel"  # until the slab in flight is back
    widget._timer.timeout.emit()
    assert ui.progressLabel.text == "Cancelling after the current slab ..."
    gate.set()
    fire_until(widget, lambda: widget._job is None)
    monkeypatch.undo()
    assert len(sent) == 2 and ui.applyButton.enabled and ui.applyButton.text == "Reconstruct && Segment"
    assert ui.progressLabel.text == "Cancelled after 2 of 5 slices; nothing was added to the scene."
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == volumes_before

    # a correction: the organ as liver, sent in the background, the server's answer shown
    liver = np.zeros(array.shape, dtype=bool)
    liver[:, 10:22, 8:24] = True
    nodes.set_segment_mask(segmentation, "Liver", liver, volume_node)
    nodes.set_segment_mask(segmentation, "Tumor", np.zeros_like(liver), volume_node)
    widget.onSubmitCorrection()
    fire_until(widget, lambda: not widget._pending)
    assert recorded["errors"] == []
    assert ui.submitStatusLabel.text.startswith("Stored as the final label of image patient_7")
    stored = gui.module.TaskAdaptiveClient(server.url).label("patient_7", "final")
    np.testing.assert_array_equal(stored.array, liver.astype(np.uint8))

    # a server error reaches the user as the server's message, not a traceback
    widget._parameterNode.variant = "ta0.7"
    widget.onApplyOrCancel()
    fire_until(widget, lambda: widget._job is None)
    title, text = recorded["errors"][-1]
    assert "unknown variant 'ta0.7'" in text and "Traceback" not in text
    assert ui.progressLabel.text.startswith("Failed: ")

    # training status: nothing has run on this server
    widget.onPollTraining()
    fire_until(widget, lambda: not widget._pending)
    assert ui.trainingStatusLabel.text == "No training has run on this server since it started."
    assert ui.stopTrainingButton.enabled is False
    widget.cleanup()
