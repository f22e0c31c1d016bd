"""The README's picture of a served result: `reconstruct_segment` on the real sample, over HTTP.

Starts the app (a real ``monailabel start_server``) on the demo studies of ``tact serve``
(prepared if missing) with the committed demo models, asks ``reconstruct_segment`` for the
real sample, fetches the reconstruction it stored, and draws one slice: the low-dose
input, the Hann FBP, the served reconstruction, and g's liver/tumour map over it with the
reference liver outline.

    .venv/bin/python docs/make_serving_figure.py [--out docs/images/served_sample.png]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import requests  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from app_server import MonaiLabelServer, multipart_result, nifti_from_bytes  # noqa: E402

from training.serving import SAMPLE_CASE, prepare_studies  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "served_sample.png")
    parser.add_argument("--models", type=Path, default=ROOT / "apps" / "taskadaptive_ct" / "model")
    parser.add_argument("--data", type=Path, default=ROOT / "runs" / "serve")
    args = parser.parse_args()
    studies = prepare_studies(args.models, args.data)
    with tempfile.TemporaryDirectory() as work:
        server = MonaiLabelServer(studies, Path(work), conf={"models": str(args.models)})
        try:
            params, data, name = multipart_result(server.infer("reconstruct_segment", SAMPLE_CASE))
            labels = np.asarray(nifti_from_bytes(data, name).dataobj)
            stored = requests.get(server.url + params["reconstruction"]["url"], timeout=60)
            reconstruction = np.asarray(nifti_from_bytes(stored.content).dataobj)
        finally:
            server.stop()
    volume = lambda tag: np.asarray(nib.load(str(studies / "labels" / tag / f"{SAMPLE_CASE}.nii")).dataobj)  # noqa: E731
    lowdose = np.asarray(nib.load(str(studies / f"{SAMPLE_CASE}.nii")).dataobj)
    fbp, fulldose, truth = volume("fbp"), volume("fulldose"), volume("final")
    k = int(np.argmax((truth == 1).sum(axis=(0, 1))))  # the slice with the most liver

    def shown(image: np.ndarray) -> np.ndarray:
        # RAS voxels (i towards the patient's right, j anterior): anterior up, the patient's right on the
        # viewer's left, as radiologists read axial slices.
        return np.fliplr(np.rot90(image[:, :, k]))

    window = dict(cmap="gray", vmin=-160, vmax=240)  # abdominal window, HU
    panels = [("low-dose input", lowdose), ("Hann FBP", fbp), (f"served {params['variant']}", reconstruction),
              ("full dose (reference)", fulldose)]
    figure, axes = plt.subplots(1, 5, figsize=(17, 3.8))
    for axis, (title, image) in zip(axes, panels):
        axis.imshow(shown(image), **window)
        axis.set_title(title)
    axes[4].imshow(shown(reconstruction), **window)
    overlay = np.ma.masked_equal(shown(labels).astype(float), 0)
    axes[4].imshow(overlay, cmap=matplotlib.colors.ListedColormap(["#2ca02c", "#d62728"]), vmin=1, vmax=2, alpha=0.45)
    axes[4].contour(shown(truth == 1), levels=[0.5], colors="yellow", linewidths=0.8)
    axes[4].set_title("g on it (green liver, red tumour;\nyellow: reference liver)")
    for axis in axes:
        axis.axis("off")
    figure.suptitle(f"reconstruct_segment served on the real sample (study {SAMPLE_CASE}, slice {k}); "
                    f"window -160..240 HU", fontsize=11)
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
