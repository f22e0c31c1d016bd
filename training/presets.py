"""Settings of the whole §3 experiment at three scales (``tact reproduce --preset``), and its extensions.

* ``smoke``: tiny everything, so that CI runs the full pipeline (and every variant option)
  in a few minutes; its numbers mean nothing.
* ``cpu``: 128² slices and narrow U-Nets on synthetic phantom patients, the real sample
  (always a test patient) and a second real patient (split like the phantoms), sized to
  finish on 2 cores in under an hour; besides the paper's methods it trains alpha = 0.9
  with interpolation up-sampling (``ta0.9-interp``). At 128 px (3 mm pixels) N0 = 4096
  leaves little noise (low-dose 30.3 dB on phantoms, better than the Hann FBP); N0 = 1024
  gives low-dose 24.9 dB and FBP 27.8 dB, the paper's Table I regime (24.86 / 28.06), so
  the preset uses it.
* ``cpu-seeds``: the cpu preset's data, g and training with three seeds, for the
  statistics: the Base U-Net, alpha = 0.1 under the full and a weak g, and the balanced
  setting (normalised loss and warm start).
* ``demo-models``: the app's committed demo models (``tact export-models``): the ``cpu``
  preset's networks and training on its earlier data (without the second real patient), with the Base U-Net and small alphas only (no joint
  training). The paper's alphas give the Dice term most of the gradient at this scale (the
  MSE term is about 1e-3, the Dice term 0.1-0.5), which costs the cpu preset 3 dB of PSNR
  already at alpha = 0.1; the demo must stay CT, so it tries alpha from 0.003 to 0.1.
* ``paper``: the paper's settings: 512² slices, 1000 angles, N0 = 4096, full-width U-Nets
  (64 -> 1024 features); meant for GPUs and a real LiTS copy. Its domain is LoDoPaB's fixed
  26 cm, which reproduced the paper's Table I more closely than the physical field of view
  on the real sample (its ordering of low-dose, FBP and BM3D, its low-dose SSIM and its BM3D
  parameter; see the README).

``tact reproduce`` can override a preset's simulation (``--domain``, ``--photons``,
``--angles``).

The paper names neither its epochs, batch size nor learning rate; the values here are
ours and are recorded in every run's ``config.yaml``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from training.config import TrainingConfig
from training.networks import UPSAMPLING, UNetConfig
from training.simulate import DOMAINS


@dataclass(frozen=True)
class Variant:
    """A reconstruction training beside the paper's, trained and evaluated by ``tact reproduce``
    as method ``ta<alpha>-<tag>`` (``baseunet-<tag>`` at alpha = 0; :func:`training.methods.method_name`).

    Args:
        tag: the variant's name in method names and tables (``balanced`` -> ``ta0.5-balanced``).
        alpha: the task weight; 0 for a Base U-Net variant (``baseunet-<tag>``), e.g. the
            control of a warm start: the Base U-Net trained on from itself with MSE alone.
        normalised: the normalised loss with the Base U-Net as reference (``loss_reference``):
            each term divided by the Base U-Net's value of it, so that alpha is the Dice term's share.
        warm_start: f starts from the Base U-Net's weights (``init_checkpoint``).
        upsample: f's up-sampling, ``transposed`` (the U-Net's) or ``interpolation``.
        segmentation_epochs: train the g of this variant's loss for this many epochs only (a
            weaker g, stage ``segmentation-<tag>``); the report still judges every method with the
            preset's g. ``None``: the preset's g.
    """

    tag: str
    alpha: float
    normalised: bool = False
    warm_start: bool = False
    upsample: str = "transposed"
    segmentation_epochs: int | None = None

    def __post_init__(self) -> None:
        from training.methods import method_name

        method_name("reconstruction", 1.0, self.tag)  # refuses a malformed tag
        if not (math.isfinite(self.alpha) and 0.0 <= self.alpha <= 1.0):
            raise ValueError(f"a variant's alpha must be in [0, 1], got {self.alpha}")
        if self.alpha == 0.0 and (self.normalised or self.segmentation_epochs is not None):
            raise ValueError(f"variant {self.tag!r} has alpha = 0 (a Base U-Net, MSE only): it has no Dice term "
                             "to normalise and does not use g")
        if self.upsample not in UPSAMPLING:
            raise ValueError(f"upsample must be one of {UPSAMPLING}, got {self.upsample!r}")
        if self.warm_start and self.upsample != "transposed":
            raise ValueError("a warm start loads the Base U-Net's weights, whose up-sampling is transposed; "
                             f"variant {self.tag!r} asks for {self.upsample!r}")
        if self.segmentation_epochs is not None and self.segmentation_epochs < 1:
            raise ValueError(f"segmentation_epochs must be at least 1, got {self.segmentation_epochs}")

    @property
    def method(self) -> str:
        """The variant's method name, ``ta<alpha>-<tag>``."""
        from training.methods import method_name

        return method_name("reconstruction", self.alpha, self.tag)


@dataclass(frozen=True)
class Preset:
    """One scale of the experiment.

    Args:
        name: ``smoke``, ``cpu``, ``demo-models`` or ``paper``.
        size, angles, photons, domain: simulation (slice size in pixels, angles, N0, and the
            reconstruction domain: ``physical`` or ``lodopab``).
        phantom_volumes, phantom_slices: synthetic patients written when no ``--lits`` is
            given, and slices per patient.
        include_sample: add the real 20-slice sample as a test patient.
        real_patients: further real patients (names of ``training.sample_data.REAL_CASES``)
            added to the synthetic ones and split by patient like them.
        training: the base training configuration (task and weight are set per run).
        segmentation_epochs: epochs of the segmentation pre-training.
        segmentation_network: g's width and depth (default: the training network's, f's).
        segmentation_augment: augment g's training slices (``training.augment``).
        segmentation_patience: g's early-stopping patience (default: the training's).
        alphas, cs: task-adaptive alphas and joint-training Cs (the paper's 0.1, 0.5, 0.9).
        variants: task-adaptive trainings beside the paper's (:class:`Variant`).
        seeds: how many times every trained method is trained, with training seeds
            ``training.seed + k`` (``tact reproduce --seeds`` overrides it).
        bm3d_sweep: pick BM3D's sigma on training slices (else the paper's 0.075).
        figures: example slices drawn in the report.
    """

    name: str
    size: int
    angles: int
    photons: float
    domain: str
    phantom_volumes: int
    phantom_slices: int
    include_sample: bool
    training: TrainingConfig
    segmentation_epochs: int
    segmentation_network: UNetConfig | None = None
    segmentation_augment: bool = False
    segmentation_patience: int | None = None
    real_patients: tuple[str, ...] = ()
    alphas: tuple[float, ...] = (0.1, 0.5, 0.9)
    cs: tuple[float, ...] = (0.1, 0.5, 0.9)
    variants: tuple[Variant, ...] = ()
    seeds: int = 1
    bm3d_sweep: bool = True
    figures: int = 3
    test_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.domain not in DOMAINS:
            raise ValueError(f"domain must be one of {DOMAINS}, got {self.domain!r}")
        from training.sample_data import REAL_CASES

        unknown = [name for name in self.real_patients if name not in REAL_CASES or name == "sample"]
        if unknown:
            raise ValueError(f"real_patients must be among {[n for n in REAL_CASES if n != 'sample']}, got {unknown}")
        names = [v.method for v in self.variants]
        if len(set(names)) < len(names):
            raise ValueError(f"each variant needs a method name of its own, got {names}")
        own_g = {(v.tag, v.segmentation_epochs) for v in self.variants}  # one stage segmentation-<tag> per tag
        if len({tag for tag, _ in own_g}) < len(own_g):
            raise ValueError("variants of one tag share the stage segmentation-<tag>, so they must agree on "
                             f"segmentation_epochs; got {sorted(own_g, key=str)}")
        if self.seeds < 1:
            raise ValueError(f"seeds must be at least 1, got {self.seeds}")

    def with_simulation(self, domain: str | None = None, photons: float | None = None, angles: int | None = None) -> Preset:
        """This preset with some simulation settings replaced (``None`` keeps the preset's)."""
        changes = {"domain": domain, "photons": photons, "angles": angles}
        return replace(self, **{key: value for key, value in changes.items() if value is not None})

    def shares_stages_with(self, other: Preset) -> bool:
        """Whether a run folder of ``other`` can be continued with this preset: the same data, simulation,
        baselines, g and training settings, so that every stage the two have in common is the same run
        (only the methods, variants, seeds and figures may differ)."""
        def key(preset: Preset) -> Preset:
            return replace(preset, name="", alphas=(), cs=(), variants=(), seeds=1, figures=0)

        return key(self) == key(other)

    def with_seed(self, k: int) -> Preset:
        """This preset for the ``k``-th seed: every training seeded with ``training.seed + k``."""
        return replace(self, training=replace(self.training, seed=self.training.seed + k))

    def config(self, task: str, weight: float = 0.0, segmenter_checkpoint: str | None = None) -> TrainingConfig:
        """The training configuration of one run of this preset."""
        if task == "segmentation":
            return replace(self.training, task=task, weight=weight, epochs=self.segmentation_epochs,
                           network=self.segmentation_network or self.training.network, augment=self.segmentation_augment,
                           early_stopping_patience=self.segmentation_patience or self.training.early_stopping_patience,
                           segmenter_checkpoint=segmenter_checkpoint)
        return replace(self.training, task=task, weight=weight, segmenter_checkpoint=segmenter_checkpoint)


PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        name="smoke", size=64, angles=90, photons=300, domain="physical", phantom_volumes=4, phantom_slices=6, include_sample=False,
        training=TrainingConfig(network=UNetConfig(features=4, depth=2), epochs=2, batch_size=4, num_workers=0,
                                early_stopping_patience=2, lr_patience=1, validation_fraction=0.34),
        segmentation_epochs=2, alphas=(0.5,), cs=(0.5,), bm3d_sweep=False, figures=1, test_fraction=0.25,
        # every variant option once, so that CI runs each through the whole pipeline
        variants=(Variant("balanced", 0.5, normalised=True, warm_start=True),
                  Variant("weakg", 0.5, upsample="interpolation", segmentation_epochs=1)),
    ),
    "cpu": Preset(
        name="cpu", size=128, angles=1000, photons=1024, domain="physical", phantom_volumes=16, phantom_slices=24, include_sample=True,
        training=TrainingConfig(network=UNetConfig(features=8, depth=3), epochs=30, batch_size=8, num_workers=0,
                                learning_rate=2e-3, early_stopping_patience=8, lr_patience=3, validation_fraction=0.2),
        # g: chosen on the validation patients among 8 or 16 features, depth 3 or 4, with and without
        # augmentation (README, "A stronger g"): 16 features, depth 4, augmented.
        segmentation_epochs=80, segmentation_network=UNetConfig(features=16, depth=4), segmentation_augment=True,
        segmentation_patience=12, real_patients=("example_ct",),
        # the checkerboard test: alpha = 0.9 with interpolation instead of transposed-convolution up-sampling
        variants=(Variant("interp", 0.9, upsample="interpolation"),),
    ),
    "paper": Preset(
        name="paper", size=512, angles=1000, photons=4096, domain="lodopab", phantom_volumes=20, phantom_slices=64, include_sample=False,
        training=TrainingConfig(network=UNetConfig(features=64, depth=4), epochs=50, batch_size=8, num_workers=4,
                                learning_rate=1e-3, early_stopping_patience=10, lr_patience=4, validation_fraction=0.1),
        segmentation_epochs=50,
    ),
}
# The multi-seed experiment (claims backed by statistics): the cpu preset's data, g and training,
# three seeds, the Base U-Net, the paper's alpha = 0.1, the same alpha under a weak g (8 epochs, a
# quarter of the 31 the full g ran before its early stop), the balanced setting (the normalised loss
# and a warm start, both from the Base U-Net) at the alpha that `--alpha auto` chose on seed 0's
# validation patients, and its control: the Base U-Net trained on from itself with MSE alone, the
# same extra epochs without the Dice term. Its seed 0 is the cpu preset's: it can continue a cpu run.
BALANCED_ALPHA = 0.9
PRESETS["cpu-seeds"] = replace(PRESETS["cpu"], name="cpu-seeds", seeds=3, alphas=(0.1,), cs=(), figures=2,
                               variants=(Variant("weakg", 0.1, segmentation_epochs=8),
                                         Variant("balanced", BALANCED_ALPHA, normalised=True, warm_start=True),
                                         Variant("warm", 0.0, warm_start=True)))
# The committed demo models were trained before the second real patient joined the cpu preset;
# the preset keeps their data so that `tact reproduce --preset demo-models` still makes them.
PRESETS["demo-models"] = replace(PRESETS["cpu"], name="demo-models", alphas=(0.003, 0.01, 0.03, 0.1), cs=(), figures=2,
                                 real_patients=(), variants=(), segmentation_epochs=40, segmentation_network=None,
                                 segmentation_augment=False, segmentation_patience=None)
