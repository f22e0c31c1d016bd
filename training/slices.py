"""A PyTorch view of a simulated data set: one item per axial slice.

Items are dictionaries of tensors that the training step and MONAI transforms take as
they are (MONAI's dictionary convention):

* ``image``: ``(1, N, N)`` float32, the network input (the low-dose scan, or the full dose
  for segmentation pre-training) as normalised attenuation, not clipped;
* ``fulldose``: ``(1, N, N)`` float32, the normalised full dose in [0, 1];
* ``label``: ``(1, N, N)`` int64, 0 background, 1 liver, 2 tumour;
* ``case`` and ``index``: where the slice comes from.

Slices are read from the memory-mapped volumes on demand, so a data set larger than memory
can be trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from training.dataset import FULLDOSE, LOWDOSE, SimulatedDataset, SliceRef
from training.errors import DataError


class SliceDataset(Dataset):
    """Slices of one split of a :class:`~training.dataset.SimulatedDataset`.

    Args:
        dataset: the simulated data set, or its folder.
        split: ``train``, ``test`` or ``all``.
        input_method: the volume used as network input (``lowdose`` by default; ``fulldose``
            to pre-train the segmentation network on full-dose scans).
        cases: keep only these patients of the split (e.g. a validation subset).

    Raises:
        DataError: if the split holds no slices.
    """

    def __init__(
        self,
        dataset: SimulatedDataset | str | Path,
        split: str = "train",
        input_method: str = LOWDOSE,
        cases: Sequence[str] | None = None,
    ) -> None:
        self.dataset = dataset if isinstance(dataset, SimulatedDataset) else SimulatedDataset(dataset)
        self.split = split
        self.input_method = input_method
        self.refs: list[SliceRef] = self.dataset.slices(split)
        if cases is not None:
            foreign = sorted(set(cases) - set(self.dataset.case_ids(split)))
            if foreign:
                raise ValueError(f"cases {foreign} are not in the {split!r} split")
            self.refs = [ref for ref in self.refs if ref.case in set(cases)]
        if not self.refs:
            raise DataError(self.dataset.root, f"the {split!r} split holds no slices"
                            + (f" of cases {list(cases)}" if cases is not None else ""))
        if not self.dataset.has_method(input_method):
            raise DataError(self.dataset.root, f"no {input_method!r} volumes to use as input")

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, item: int) -> dict[str, torch.Tensor | str | int]:
        ref = self.refs[item]
        x = self.dataset.slice(self.input_method, ref)
        fulldose = np.clip(self.dataset.slice(FULLDOSE, ref), 0.0, 1.0)
        label = self.dataset.segmentation(ref).astype(np.int64)
        return {
            "image": torch.from_numpy(x[None]),
            "fulldose": torch.from_numpy(fulldose[None]),
            "label": torch.from_numpy(label[None]),
            "case": ref.case,
            "index": ref.index,
        }
