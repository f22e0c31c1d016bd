"""The simulated data set on disk: layout, manifest and slice access.

Layout (``DATASET/``)::

    dataset.json                          manifest: settings, split, cases, methods
    lowdose/<case>.nii                    simulated low-dose scan (ramp-filter FBP), HU, float32
    lowdose/labels/final/<case>.nii       reference segmentation, uint8 (0 bg, 1 liver, 2 tumour)
    lowdose/labels/fulldose/<case>.nii    full-dose ground truth, HU, float32
    lowdose/labels/fbp/<case>.nii         FBP baseline (Hann filter), HU, float32
    lowdose/labels/bm3d/<case>.nii        BM3D baseline (after ``tact baseline bm3d``), HU, float32
    sinograms/<case>.npy                  post-log projection data, (Z, angles, detectors), float32

``lowdose/`` is laid out as a MONAI Label local datastore: the low-dose volumes are its
images, and the reference segmentation (tag ``final``), the full dose and the baselines
are per-image volumes under ``labels/<tag>/``. Volumes are uncompressed NIfTI so that
nibabel memory-maps them and one axial slice (``[:, :, k]``, contiguous on disk) is read
without the rest. Intensities are stored in HU for viewers; :meth:`SimulatedDataset.slice`
returns the normalised attenuation ``x`` the networks and metrics use.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from training.errors import DataError
from training.fileio import save_json
from training.physics import MU_MAX, ScanGeometry, hu_to_mu

MANIFEST = "dataset.json"
FORMAT = "taskadaptivect-dataset"
FORMAT_VERSION = 1
LOWDOSE = "lowdose"
FULLDOSE = "fulldose"
SEGMENTATION = "final"
SPLITS = ("train", "test", "all")
BASELINES = ("fbp", "bm3d")


def volume_path(root: str | Path, method: str, case_id: str) -> Path:
    """Where the volume of ``method`` (``lowdose``, ``fulldose``, ``final``, ``fbp``, ...) for a case lives."""
    root = Path(root)
    if method == LOWDOSE:
        return root / LOWDOSE / f"{case_id}.nii"
    return root / LOWDOSE / "labels" / method / f"{case_id}.nii"


def sinogram_path(root: str | Path, case_id: str) -> Path:
    return Path(root) / "sinograms" / f"{case_id}.npy"


@functools.lru_cache(maxsize=4)
def worker_dataset(root: str) -> SimulatedDataset:
    """A data set opened once per process, for pool workers that get one slice per job.

    Workers only read volumes (which :meth:`SimulatedDataset.volume` reopens when they are
    rewritten); code that changes the manifest must use its own :class:`SimulatedDataset`.
    """
    return SimulatedDataset(root)


@dataclass(frozen=True)
class SliceRef:
    """One axial slice of the data set: ``case`` id and ``index`` into its volumes' last axis."""

    case: str
    index: int


class SimulatedDataset:
    """Read access to a data set written by :func:`training.simulate.simulate_dataset`.

    Args:
        root: the data set folder (holding ``dataset.json``).

    Raises:
        DataError: if the folder is not a complete data set.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        manifest_path = self.root / MANIFEST
        if not manifest_path.is_file():
            raise DataError(self.root, f"not a simulated data set (no {MANIFEST}); create one with `tact simulate`")
        try:
            self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(manifest_path, f"unreadable manifest: {exc}") from exc
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != FORMAT_VERSION:
            raise DataError(manifest_path, f"not a {FORMAT} v{FORMAT_VERSION} manifest")
        self._images: dict[Path, tuple[tuple[int, int], nib.Nifti1Image]] = {}
        self._check_finished(manifest_path)

    def _check_finished(self, manifest_path: Path) -> None:
        """Refuse a data set whose simulation stopped before every case of its split was written.

        ``tact simulate`` records each case in ``cases`` (``complete: true``) only when all
        its volumes are written, so a case of the split that is absent or not complete
        means an interrupted run: training would meet a missing case (KeyError) and an
        evaluation of ``all`` would silently leave it out.
        """
        split = self.manifest.get("split")
        if not isinstance(self.manifest.get("cases"), dict) or not isinstance(split, dict):
            raise DataError(manifest_path, "not a data set manifest (no 'cases' or 'split' record)")
        planned = list(dict.fromkeys([*split.get("train", []), *split.get("test", []), *self.cases]))
        done = [c for c in planned if self.cases.get(c, {}).get("complete")]
        if not planned:
            raise DataError(self.root, "the data set holds no cases")
        if len(done) < len(planned):
            raise DataError(self.root, f"unfinished data set (simulation incomplete): {len(done)} of {len(planned)} "
                                       f"cases done, {[c for c in planned if c not in done]} missing; finish it by "
                                       "re-running the same `tact simulate` command (same --lits, --out and settings)")

    @property
    def settings(self) -> dict[str, Any]:
        """The simulation settings (photons, angles, size, domain, seed, ...)."""
        return self.manifest["simulation"]

    @property
    def cases(self) -> dict[str, dict[str, Any]]:
        return self.manifest["cases"]

    @property
    def methods(self) -> dict[str, dict[str, Any]]:
        """Per-method provenance (e.g. the FBP frequency scaling, the BM3D sigma)."""
        return self.manifest.setdefault("methods", {})

    def case_ids(self, split: str = "all") -> list[str]:
        """Case ids of ``split`` (``train``, ``test`` or ``all``), split by patient."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split == "all":
            return list(self.cases)
        return list(self.manifest["split"][split])

    def slices(self, split: str = "all") -> list[SliceRef]:
        """Every slice of ``split``, case by case."""
        return [SliceRef(c, k) for c in self.case_ids(split) for k in range(self.cases[c]["num_slices"])]

    def geometry(self, case_id: str, impl: str = "astra_cpu") -> ScanGeometry:
        """The scan geometry the case was simulated with."""
        s = self.settings
        return ScanGeometry(size=s["size"], extent_m=self.cases[case_id]["extent_m"], num_angles=s["num_angles"], impl=impl)

    def has_method(self, method: str) -> bool:
        """Whether every case has a volume of ``method``, and (for a baseline) its run finished."""
        finished = method in (LOWDOSE, FULLDOSE, SEGMENTATION) or method in self.methods
        return finished and all(volume_path(self.root, method, c).is_file() for c in self.cases)

    def available_methods(self) -> list[str]:
        """The methods this data set can be evaluated on, in table order.

        ``lowdose``, then the baselines ``fbp`` and ``bm3d`` where they were run, then the
        trained reconstructors that ``tact reconstruct`` recorded (manifest order), then
        ``fulldose``; a method whose run did not finish (see :meth:`has_method`) is left out.
        """
        baselines = [m for m in BASELINES if self.has_method(m)]
        trained = [m for m in self.methods if m not in BASELINES and m not in (LOWDOSE, FULLDOSE, SEGMENTATION)
                   and self.has_method(m)]
        return [LOWDOSE, *baselines, *trained, FULLDOSE]

    def volume(self, method: str, case_id: str) -> nib.Nifti1Image:
        """The NIfTI image of ``method`` for ``case_id`` (data memory-mapped, not loaded)."""
        path = volume_path(self.root, method, case_id)
        try:
            stat = path.stat()
        except FileNotFoundError:
            hint = f"run `tact baseline {method}`" if method in ("fbp", "bm3d") else "re-run `tact simulate`"
            raise DataError(path, f"missing volume for method {method!r}; {hint}") from None
        # Reading a slice should not re-parse the header; a rewritten file (new inode or
        # time) is opened afresh.
        version = (stat.st_ino, stat.st_mtime_ns)
        cached = self._images.get(path)
        if cached is None or cached[0] != version:
            cached = (version, nib.load(str(path)))
            self._images[path] = cached
        return cached[1]

    def slice_hu(self, method: str, ref: SliceRef) -> np.ndarray:
        """One ``(N, N)`` slice of ``method`` in HU (labels for ``final``)."""
        return np.asarray(self.volume(method, ref.case).dataobj[:, :, ref.index])

    def slice(self, method: str, ref: SliceRef) -> np.ndarray:
        """One ``(N, N)`` slice of ``method`` as normalised attenuation ``x`` (float32, not clipped)."""
        return (hu_to_mu(self.slice_hu(method, ref)) / MU_MAX).astype(np.float32)

    def segmentation(self, ref: SliceRef) -> np.ndarray:
        """The reference label map ``(N, N)`` uint8 of a slice."""
        return self.slice_hu(SEGMENTATION, ref).astype(np.uint8)

    def sinogram(self, case_id: str) -> np.ndarray:
        """Memory-mapped post-log data ``(Z, angles, detectors)`` of a case."""
        return np.load(sinogram_path(self.root, case_id), mmap_mode="r")

    def save_manifest(self) -> None:
        """Write the (updated) manifest back, atomically."""
        save_json(self.root / MANIFEST, self.manifest)


def link_dataset(source: SimulatedDataset, dest: str | Path, methods: tuple[str, ...] = BASELINES) -> SimulatedDataset:
    """A second data set at ``dest`` with ``source``'s slices, references and the given methods, by hard links.

    Every writer of this project replaces a file by renaming a new one over it, so a method
    written later into either data set (a seed's own reconstructions) never changes the
    other's files. The manifest is written last: an interrupted call leaves no data set at
    ``dest``, and calling again finishes it.

    Args:
        source: a finished data set.
        dest: the new data set's folder (created; files already there are replaced).
        methods: the methods of ``source`` to carry over (default: the classical baselines it has).

    Returns:
        the new data set.
    """
    dest = Path(dest)
    kept = [m for m in methods if source.has_method(m)]
    files = [sinogram_path(source.root, c) for c in source.cases]
    files += [volume_path(source.root, m, c) for m in (LOWDOSE, SEGMENTATION, FULLDOSE, *kept) for c in source.cases]
    for path in files:
        target = dest / path.relative_to(source.root)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        try:
            os.link(path, target)
        except OSError:  # another file system, or one without hard links: a copy costs only disk space
            shutil.copy2(path, target)
    manifest = json.loads(json.dumps(source.manifest))
    manifest["methods"] = {m: record for m, record in source.methods.items() if m in kept}
    save_json(dest / MANIFEST, manifest)
    return SimulatedDataset(dest)
