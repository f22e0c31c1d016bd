"""TaskAdaptiveCT: task-adaptive low-dose CT reconstruction and liver/tumour segmentation in 3D Slicer.

The widget only wires the GUI: every decision with a branch worth testing lives in
``TaskAdaptiveCTLib`` (pure Python, tested with pytest against a real server) and the MRML
conversions in ``TaskAdaptiveCTNodes`` (tested headless with slicer-core). Network calls
never run on the GUI thread: they go to a worker thread, and a timer applies their results
on the GUI thread (progress, time left, the new nodes).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
from typing import Annotated, Any, Callable

import numpy as np
import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

import TaskAdaptiveCTNodes as nodes
from TaskAdaptiveCTLib import (ReconstructSegmentJob, ServerError, TaskAdaptiveClient, Volume, image_id_for,
                               submit_correction)
from TaskAdaptiveCTLib.job import DONE, RUNNING
from TaskAdaptiveCTLib.status import DEFAULT_URL, job_outcome, recent_urls, remember_url, training_text

RECENT_URLS_KEY = "TaskAdaptiveCT/recentServerUrls"
ABDOMEN_WINDOW = (400.0, 40.0)
"""Window and level (HU) the reconstruction is shown with."""


class TaskAdaptiveCT(ScriptedLoadableModule):
    """Module description for Slicer's module list."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "TaskAdaptiveCT"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations", "SegmentEditor"]
        self.parent.contributors = ["TaskAdaptiveCT developers"]
        self.parent.helpText = (
            "Reconstruct a low-dose CT with a task-adaptive network and segment liver and tumour, through a "
            "TaskAdaptiveCT MONAI Label server. Review the overlay, correct it with the Segment Editor and "
            "submit the correction, which the server can use to retrain. Not for clinical use.")
        self.parent.acknowledgementText = (
            "After 'Task-Adaptive Low-Dose CT Reconstruction' (Sefercioglu, Unal, Ertas, Yildirim). "
            "Built on MONAI Label and 3D Slicer.")


@parameterNodeWrapper
class TaskAdaptiveCTParameterNode:
    """The module's state, saved with the scene.

    inputVolume: the low-dose CT; reconstructionVolume, segmentation: the last results.
    serverUrl, variant: where and with which reconstructor to run.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    reconstructionVolume: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    serverUrl: str = DEFAULT_URL
    variant: str = ""
    slabSlices: Annotated[int, WithinRange(1, 64)] = 8
    foregroundOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.0
    segmentationOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    show3D: bool = False
    alpha: Annotated[float, WithinRange(0.0, 1.0)] = 0.003


class TaskAdaptiveCTWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module's panel: wires the GUI to :class:`TaskAdaptiveCTLogic` and the Lib."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: TaskAdaptiveCTLogic | None = None
        self._parameterNode: TaskAdaptiveCTParameterNode | None = None
        self._parameterNodeGuiTag = None
        self._job: ReconstructSegmentJob | None = None
        self._jobFuture: concurrent.futures.Future | None = None
        self._pending: list[tuple[concurrent.futures.Future, Callable[[Any], None], str]] = []
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="TaskAdaptiveCT")
        self._timer = qt.QTimer()
        self._timer.setInterval(150)
        self._timer.timeout.connect(self._poll)
        self._trainingTimer = qt.QTimer()
        self._trainingTimer.setInterval(3000)
        self._trainingTimer.timeout.connect(self.onPollTraining)

    # ------------------------------------------------------------------ set-up

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/TaskAdaptiveCT.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = TaskAdaptiveCTLogic()
        self.ui.segmentEditorWidget.setMRMLSegmentEditorNode(self.logic.segmentEditorNode())

        self.ui.serverUrlComboBox.addItems(recent_urls(qt.QSettings().value(RECENT_URLS_KEY)))

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.testConnectionButton.clicked.connect(self.onTestConnection)
        self.ui.applyButton.clicked.connect(self.onApplyOrCancel)
        self.ui.submitCorrectionButton.clicked.connect(self.onSubmitCorrection)
        self.ui.trainSegmentationButton.clicked.connect(lambda: self.onTrain("segmentation"))
        self.ui.trainReconstructionButton.clicked.connect(lambda: self.onTrain("reconstruction"))
        self.ui.stopTrainingButton.clicked.connect(self.onStopTraining)
        self.ui.variantComboBox.currentIndexChanged.connect(self.onVariantChanged)
        self.ui.foregroundOpacitySlider.valueChanged.connect(self.onDisplayChanged)
        self.ui.segmentationOpacitySlider.valueChanged.connect(self.onDisplayChanged)
        self.ui.show3DCheckBox.toggled.connect(self.onDisplayChanged)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._timer.stop()
        self._trainingTimer.stop()
        if self._job is not None:
            self._job.cancel()
        self._executor.shutdown(wait=False)
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.inputVolume = first

    def setParameterNode(self, inputParameterNode: TaskAdaptiveCTParameterNode | None) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._updateButtons()

    def _updateButtons(self, caller=None, event=None) -> None:
        running = self._job is not None and not self._job.finished
        cancelling = running and self._job.cancel_requested
        ready = bool(self._parameterNode and self._parameterNode.inputVolume)
        self.ui.applyButton.enabled = (running and not cancelling) or (ready and not running)
        self.ui.applyButton.text = "Cancel" if running else "Reconstruct && Segment"
        self.ui.submitCorrectionButton.enabled = bool(ready and self._parameterNode.segmentation) and not running

    # ------------------------------------------------------------------ background calls

    def _client(self) -> TaskAdaptiveClient:
        url = self.ui.serverUrlComboBox.currentText.strip()
        client = TaskAdaptiveClient(url)  # ValueError for a malformed URL
        recent = remember_url([self.ui.serverUrlComboBox.itemText(i) for i in range(self.ui.serverUrlComboBox.count)], url)
        qt.QSettings().setValue(RECENT_URLS_KEY, recent)
        self._parameterNode.serverUrl = client.url
        return client

    def _clientOrError(self) -> TaskAdaptiveClient | None:
        """The client for the URL in the box, or None after telling the user what is wrong with the URL."""
        try:
            return self._client()
        except ValueError as error:
            slicer.util.errorDisplay(str(error), windowTitle="TaskAdaptiveCT")
            return None

    def _inBackground(self, call: Callable[[], Any], then: Callable[[Any], None], what: str) -> None:
        """Run ``call`` on a worker thread; ``then(result)`` runs on the GUI thread when it is done."""
        self._pending.append((self._executor.submit(call), then, what))
        self._timer.start()

    def _poll(self) -> None:
        """On the GUI thread: progress of the running job, and the results of finished calls."""
        if self._job is not None and self._jobFuture is not None:
            progress = self._job.progress
            self.ui.progressBar.value = int(round(100 * progress.fraction))
            self.ui.progressLabel.text = ("Cancelling after the current slab ..." if self._job.cancel_requested
                                          else progress.text())
            if self._jobFuture.done():
                self._jobFinished()
        still = []
        for future, then, what in self._pending:
            if not future.done():
                still.append((future, then, what))
                continue
            error = future.exception()
            if isinstance(error, (ServerError, ValueError)):
                slicer.util.errorDisplay(str(error), windowTitle=f"TaskAdaptiveCT: {what}")
            elif error is not None:
                logging.error("TaskAdaptiveCT: %s failed: %r", what, error)
                slicer.util.errorDisplay(f"{what} failed: {error}", windowTitle="TaskAdaptiveCT")
            else:
                then(future.result())
        self._pending = still
        if not self._pending and self._jobFuture is None:
            self._timer.stop()

    # ------------------------------------------------------------------ server

    def onTestConnection(self) -> None:
        client = self._clientOrError()
        if client is None:
            return
        self.ui.serverStatusLabel.text = f"Connecting to {client.url} ..."
        self._inBackground(client.models, self._showModels, "Test connection")

    def _showModels(self, models) -> None:
        self.ui.variantComboBox.clear()
        for name in models.variants:
            self.ui.variantComboBox.addItem(models.label(name), name)
        chosen = self._parameterNode.variant if self._parameterNode.variant in models.variants else models.default_variant
        index = self.ui.variantComboBox.findData(chosen)
        if index >= 0:
            self.ui.variantComboBox.currentIndex = index
        segmenter = "with" if models.segmenter else "without"
        self.ui.serverStatusLabel.text = (f"Connected: {models.name}, {len(models.variants)} reconstruction variant(s), "
                                          f"{segmenter} a segmenter; default {models.default_variant}.")

    def onVariantChanged(self, index: int) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.variant = self.ui.variantComboBox.itemData(index) or ""

    # ------------------------------------------------------------------ reconstruct & segment

    def onApplyOrCancel(self) -> None:
        if self._jobFuture is not None:  # running, or ended and about to be applied by the timer
            if not self._job.finished:
                self._job.cancel()
                self._updateButtons()
            return
        try:
            client = self._client()
            self._job = self.logic.createJob(client, self._parameterNode.inputVolume, self._parameterNode.variant or None,
                                             self._parameterNode.slabSlices)
        except (ValueError, ServerError) as error:
            slicer.util.errorDisplay(str(error), windowTitle="TaskAdaptiveCT")
            return
        self.ui.progressBar.value = 0
        self.ui.progressBar.visible = True
        self.ui.progressLabel.text = self._job.progress.text()
        self._jobFuture = self._executor.submit(self._runJob, self._job)
        self._timer.start()
        self._updateButtons()

    @staticmethod
    def _runJob(job: ReconstructSegmentJob) -> None:
        """On the worker thread: every slab until done or cancelled (a server error ends the job as failed)."""
        try:
            while job.step():
                pass
        except ServerError:
            pass  # job.state is failed and job.error the server's message

    def _jobFinished(self) -> None:
        job, future, self._job, self._jobFuture = self._job, self._jobFuture, None, None
        self.ui.progressBar.visible = job.state == DONE
        self.ui.progressLabel.text = job_outcome(job)
        if future.exception() is not None:  # not a server error: a bug or a bad volume
            logging.error("TaskAdaptiveCT: Reconstruct & Segment failed: %r", future.exception())
            slicer.util.errorDisplay(f"Reconstruct & Segment failed: {future.exception()}", windowTitle="TaskAdaptiveCT")
        elif job.state == DONE:
            with slicer.util.tryWithErrorDisplay("Could not show the results.", waitCursor=True):
                reconstruction, segmentation = self.logic.applyResult(self._parameterNode.inputVolume, job.result,
                                                                      self._parameterNode.reconstructionVolume,
                                                                      self._parameterNode.segmentation)
                self._parameterNode.reconstructionVolume = reconstruction
                self._parameterNode.segmentation = segmentation
                self.ui.segmentEditorWidget.setSegmentationNode(segmentation)
                self.ui.segmentEditorWidget.setSourceVolumeNode(reconstruction)
                self.onDisplayChanged()
        elif job.error:
            slicer.util.errorDisplay(job.error, windowTitle="TaskAdaptiveCT: Reconstruct & Segment")
        self._updateButtons()

    def onDisplayChanged(self, *unused) -> None:
        node = self._parameterNode
        if node and node.reconstructionVolume and node.segmentation:
            self.logic.showResults(node.inputVolume, node.reconstructionVolume, node.segmentation,
                                   self.ui.foregroundOpacitySlider.value, self.ui.segmentationOpacitySlider.value,
                                   self.ui.show3DCheckBox.checked)

    # ------------------------------------------------------------------ corrections and training

    def onSubmitCorrection(self) -> None:
        node = self._parameterNode
        try:
            client = self._client()
            call = self.logic.correctionCall(client, node.inputVolume, node.segmentation)
        except (ValueError, ServerError) as error:
            slicer.util.errorDisplay(str(error), windowTitle="TaskAdaptiveCT")
            return
        self.ui.submitStatusLabel.text = "Submitting ..."
        self._inBackground(call, self._showSubmitted, "Submit correction")

    def _showSubmitted(self, reply: dict) -> None:
        feedback = reply.get("feedback") or {}
        counted = feedback.get("counted")
        self.ui.submitStatusLabel.text = f"Stored as the final label of image {reply.get('image')}" + (
            f"; {counted} correction(s) counted toward retraining" if counted is not None else "") + "."

    def onTrain(self, task: str) -> None:
        client = self._clientOrError()
        if client is None:
            return
        options = {"alpha": round(float(self.ui.alphaSlider.value), 6)} if task == "reconstruction" else {}
        self._inBackground(lambda: client.train(task, options), lambda reply: self._trainingTimer.start(), f"Train {task}")
        self.ui.trainingStatusLabel.text = f"Starting {task} training ..."

    def onStopTraining(self) -> None:
        client = self._clientOrError()
        if client is None:
            return
        self._inBackground(client.stop_training, lambda reply: self.onPollTraining(), "Stop training")

    def onPollTraining(self) -> None:
        try:
            client = self._client()
        except ValueError:
            self._trainingTimer.stop()
            return
        self._inBackground(client.train_status, self._showTraining, "Training status")

    def _showTraining(self, status: dict) -> None:
        running, text = training_text(status)
        self.ui.trainingStatusLabel.text = text
        self.ui.stopTrainingButton.enabled = running
        if not running:
            self._trainingTimer.stop()


class TaskAdaptiveCTLogic(ScriptedLoadableModuleLogic):
    """What the module does with MRML nodes; the work itself is TaskAdaptiveCTLib's."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self) -> TaskAdaptiveCTParameterNode:
        return TaskAdaptiveCTParameterNode(super().getParameterNode())

    def segmentEditorNode(self):
        node = slicer.mrmlScene.GetSingletonNode("TaskAdaptiveCT", "vtkMRMLSegmentEditorNode")
        if node is None:
            node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLSegmentEditorNode")
            node.UnRegister(None)
            node.SetSingletonTag("TaskAdaptiveCT")
            node = slicer.mrmlScene.AddNode(node)
        return node

    def createJob(self, client: TaskAdaptiveClient, inputVolume, variant: str | None,
                  slabSlices: int) -> ReconstructSegmentJob:
        """A Reconstruct & Segment job for a volume node (its voxels are copied now, on the GUI thread)."""
        if inputVolume is None:
            raise ValueError("choose a low-dose volume first")
        return ReconstructSegmentJob(client, nodes.volume_from_node(inputVolume), variant, slabSlices)

    def applyResult(self, inputVolume, result, reconstructionNode=None, segmentationNode=None):
        """Put a finished job's reconstruction and segmentation into the scene (new nodes or the given ones)."""
        name = inputVolume.GetName()
        if reconstructionNode is None:
            reconstructionNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
        reconstructionNode.SetName(f"{name} reconstruction ({result.variant})")
        nodes.update_node_from_volume(reconstructionNode, result.reconstruction)
        reconstructionNode.CreateDefaultDisplayNodes()
        display = reconstructionNode.GetDisplayNode()
        display.SetAutoWindowLevel(False)
        display.SetWindowLevel(*ABDOMEN_WINDOW)
        if segmentationNode is None:
            segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentationNode.SetName(f"{name} segmentation")
        nodes.update_segmentation_from_labels(segmentationNode, result.labels, reconstructionNode)
        return reconstructionNode, segmentationNode

    def showResults(self, inputVolume, reconstructionNode, segmentationNode, foregroundOpacity: float,
                    segmentationOpacity: float, show3D: bool) -> None:
        """The reconstruction as background, the low-dose input over it, the segments on top."""
        slicer.util.setSliceViewerLayers(background=reconstructionNode, foreground=inputVolume,
                                         foregroundOpacity=foregroundOpacity)
        display = segmentationNode.GetDisplayNode()
        if display is not None:
            display.SetOpacity(segmentationOpacity)
            display.SetVisibility3D(show3D)
        if show3D:
            segmentationNode.CreateClosedSurfaceRepresentation()

    def correctionCall(self, client: TaskAdaptiveClient, inputVolume, segmentationNode) -> Callable[[], dict]:
        """A call (for the worker thread) that submits the segmentation as the input's final label.

        The segments are read here, on the GUI thread; only the HTTP requests run later.
        """
        if inputVolume is None or segmentationNode is None:
            raise ValueError("run Reconstruct & Segment (or choose a segmentation) before submitting a correction")
        volume = nodes.volume_from_node(inputVolume)
        masks = nodes.masks_from_segmentation(segmentationNode, inputVolume)
        imageId = image_id_for(inputVolume.GetName())
        return lambda: submit_correction(client, imageId, volume, masks)


class TaskAdaptiveCTTest(ScriptedLoadableModuleTest):
    """The whole workflow inside Slicer, against a running TaskAdaptiveCT server.

    Set ``TASKADAPTIVECT_SERVER`` (e.g. ``http://127.0.0.1:8000``, from ``make serve``) before
    starting Slicer; without it the test says so and does nothing. CI cannot run this test:
    3D Slicer itself cannot be installed there (the Lib and the MRML layer are tested with
    pytest instead).
    """

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_reconstruct_segment_correct_and_submit()

    def test_reconstruct_segment_correct_and_submit(self) -> None:
        url = os.environ.get("TASKADAPTIVECT_SERVER")
        if not url:
            self.delayDisplay("TASKADAPTIVECT_SERVER is not set: start a server (make serve) and set it to its URL")
            return
        client = TaskAdaptiveClient(url)
        models = client.models()
        self.delayDisplay(f"Server {url}: variants {', '.join(models.variants)}")

        # an oblique synthetic low-dose CT: air, a body, a brighter organ on the patient's right
        rng = np.random.default_rng(0)
        array = np.full((6, 64, 64), -1000.0, dtype=np.float32)
        array[:, 12:52, 8:56] = 40.0
        array[:, 18:34, 12:30] = 160.0
        array += rng.normal(0, 60, array.shape).astype(np.float32)
        angle = np.radians(10.0)
        ijkToRas = np.eye(4)
        ijkToRas[:3, :3] = np.array([[-np.cos(angle), np.sin(angle), 0], [-np.sin(angle), -np.cos(angle), 0],
                                     [0, 0, 1]]) @ np.diag([3.0, 3.0, 4.0])
        ijkToRas[:3, 3] = [90.0, 80.0, -40.0]
        inputVolume = nodes.add_volume_node(Volume(array, ijkToRas), "TaskAdaptiveCT test low dose")

        logic = TaskAdaptiveCTLogic()
        job = logic.createJob(client, inputVolume, models.default_variant, slabSlices=2)
        self.assertTrue(job.step())
        self.assertEqual(job.state, RUNNING)
        self.assertEqual(job.done_slices, 2)
        self.assertIsNotNone(job.progress.remaining)
        while job.step():
            pass
        reconstruction, segmentation = logic.applyResult(inputVolume, job.result)
        sent, back = nodes.volume_from_node(inputVolume), nodes.volume_from_node(reconstruction)
        np.testing.assert_array_equal(back.ijk_to_ras, sent.ijk_to_ras)
        self.assertEqual(back.array.shape, sent.array.shape)
        names = [segmentation.GetSegmentation().GetNthSegment(i).GetName()
                 for i in range(segmentation.GetSegmentation().GetNumberOfSegments())]
        self.assertEqual(sorted(names), ["Liver", "Tumor"])
        logic.showResults(inputVolume, reconstruction, segmentation, 0.3, 0.5, show3D=False)

        # cancel between slabs
        cancelled = logic.createJob(client, inputVolume, models.default_variant, slabSlices=2)
        cancelled.step()
        cancelled.cancel()
        self.assertFalse(cancelled.step())
        self.assertEqual(cancelled.done_slices, 2)

        # a correction: the organ painted as liver, a small tumour inside it, sent and read back
        liver = np.zeros(array.shape, dtype=bool)
        liver[:, 18:34, 12:30] = True
        tumour = np.zeros(array.shape, dtype=bool)
        tumour[2:4, 22:26, 16:20] = True
        nodes.set_segment_mask(segmentation, "Liver", liver, inputVolume)
        nodes.set_segment_mask(segmentation, "Tumor", tumour, inputVolume)
        reply = logic.correctionCall(client, inputVolume, segmentation)()
        stored = client.label(reply["image"], "final")
        self.assertEqual(int((stored.array == 2).sum()), int(tumour.sum()))
        self.assertEqual(int((stored.array == 1).sum()), int((liver & ~tumour).sum()))
        self.delayDisplay("TaskAdaptiveCT workflow passed")
