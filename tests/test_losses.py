"""Networks and the task-adaptive / joint losses: freezing, gradient flow, validation."""

from __future__ import annotations

import pytest
import torch

from training.losses import LossScales, joint_loss, task_adaptive_loss, term_scales
from training.networks import NUM_CLASSES, UNetConfig, build_reconstruction_net, build_segmentation_net

TINY = UNetConfig(features=4, depth=2)


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    full_dose = torch.rand(2, 1, 16, 16, generator=generator)
    low_dose = full_dose + 0.2 * torch.randn(2, 1, 16, 16, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (2, 1, 16, 16), generator=generator)
    return low_dose, full_dose, labels


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _one_step(f, loss, parameters) -> None:
    optimizer = torch.optim.SGD(parameters, lr=0.1)
    low_dose, full_dose, labels = _batch()
    f.train()
    loss.train()
    optimizer.zero_grad()
    loss(f(low_dose), full_dose, labels).backward()
    optimizer.step()


def test_network_shapes_and_ranges():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 32, 32)
    assert build_segmentation_net(TINY)(x).shape == (2, NUM_CLASSES, 32, 32)
    y = build_reconstruction_net(TINY)(x)
    assert y.shape == (2, 1, 32, 32) and 0 < y.min() and y.max() < 1
    assert UNetConfig().filters == [64, 128, 256, 512, 1024]
    with pytest.raises(ValueError, match="depth must be between 1 and 7"):
        UNetConfig(depth=0)


def test_task_adaptive_step_leaves_the_segmenter_bit_identical_and_trains_f_through_it():
    torch.manual_seed(0)
    f, g = build_reconstruction_net(TINY), build_segmentation_net(TINY)
    g_before, f_before = _state(g), _state(f)
    loss = task_adaptive_loss(g, alpha=1.0)  # the Dice term alone
    # Even an optimiser handed g's parameters must not change them.
    _one_step(f, loss, list(f.parameters()) + list(g.parameters()))
    g_after = _state(g)
    assert g_before.keys() == g_after.keys()
    assert any("running_mean" in k for k in g_after), "the test needs batch-norm buffers"
    for key in g_before:
        assert torch.equal(g_before[key], g_after[key]), f"segmenter {key} changed"
    assert not g.training
    assert all(p.grad is None for p in g.parameters())
    # With alpha = 1 the only gradient f can get is the Dice term's, through g.
    assert any(not torch.equal(f_before[k], v) for k, v in _state(f).items() if "weight" in k)


def _gradient_of_f(alpha: float) -> torch.Tensor:
    """f's gradient of the task-adaptive loss with weight alpha, from the same seeded f, g and batch."""
    torch.manual_seed(0)
    f, g = build_reconstruction_net(TINY), build_segmentation_net(TINY)
    low_dose, full_dose, labels = _batch()
    task_adaptive_loss(g, alpha)(f(low_dose), full_dose, labels).backward()
    return torch.cat([p.grad.flatten() for p in f.parameters()])


def test_the_task_term_adds_its_share_of_the_dice_gradient_to_f():
    """The gradient at alpha is (1 - alpha) times the MSE's plus alpha times the Dice term's,
    which reaches f through g: a detached Dice term would leave (1 - alpha) grad MSE."""
    alpha = 0.5
    mse_only, dice_only, mixed = _gradient_of_f(0.0), _gradient_of_f(1.0), _gradient_of_f(alpha)
    assert dice_only.abs().max() > 1e-6, "the Dice term alone must move f"
    assert not torch.allclose(mixed, (1 - alpha) * mse_only, atol=1e-7)
    torch.testing.assert_close(mixed, (1 - alpha) * mse_only + alpha * dice_only, rtol=1e-4, atol=1e-8)


def test_joint_training_updates_the_segmenter():
    torch.manual_seed(0)
    f, g = build_reconstruction_net(TINY), build_segmentation_net(TINY)
    before = _state(g)
    loss = joint_loss(g, c=0.5)
    _one_step(f, loss, list(f.parameters()) + list(g.parameters()))
    assert g.training
    assert any(not torch.equal(before[k], v) for k, v in _state(g).items())


@pytest.mark.parametrize("weight", [-0.1, 1.5])
def test_weights_outside_0_1_are_refused(weight):
    g = build_segmentation_net(TINY)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        task_adaptive_loss(g, weight)
    with pytest.raises(ValueError, match=r"C must be in \[0, 1\]"):
        joint_loss(g, weight)


def test_mismatched_shapes_are_refused():
    loss = task_adaptive_loss(build_segmentation_net(TINY), 0.5)
    with pytest.raises(ValueError, match="shapes differ"):
        loss(torch.rand(2, 1, 16, 16), torch.rand(2, 1, 8, 8), torch.zeros(2, 1, 16, 16, dtype=torch.long))


def test_per_slice_terms_average_to_the_batch_loss():
    """Per-slice terms (for exact validation means across batches and processes) agree with
    the batch-mean MSE and MONAI's mean-reduced Dice loss."""
    from monai.losses import DiceLoss

    torch.manual_seed(0)
    f, g = build_reconstruction_net(TINY), build_segmentation_net(TINY)
    low_dose, full_dose, labels = _batch()
    with torch.no_grad():
        reconstruction = f(low_dose)
        terms = task_adaptive_loss(g, 0.3).terms(reconstruction, full_dose, labels)
        assert terms["loss"].shape == terms["mse"].shape == terms["dice_loss"].shape == (2,)
        mse = torch.nn.functional.mse_loss(reconstruction, full_dose)
        dice = DiceLoss(to_onehot_y=True, softmax=True)(g(reconstruction), labels)
        torch.testing.assert_close(terms["mse"].mean(), mse)
        torch.testing.assert_close(terms["dice_loss"].mean(), dice)
        torch.testing.assert_close(task_adaptive_loss(g, 0.3)(reconstruction, full_dose, labels), 0.7 * mse + 0.3 * dice)
        base = task_adaptive_loss(g, 0.0)
        assert "dice_loss" not in base.terms(reconstruction, full_dose, labels)  # no segmentation pass
        torch.testing.assert_close(base.terms(reconstruction, full_dose, labels, with_dice=True)["dice_loss"].mean(), dice)


class _Rescaled(torch.nn.Module):
    """``factor * network(x / divisor)``: the same network in other image units."""

    def __init__(self, network: torch.nn.Module, factor: float = 1.0, divisor: float = 1.0) -> None:
        super().__init__()
        self.network, self.factor, self.divisor = network, factor, divisor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.factor * self.network(x / self.divisor)


def test_the_normalised_loss_of_terms_that_differ_by_a_constant_factor_is_the_same():
    """Images in k-times larger units make the MSE term k**2 times larger; normalised, loss and gradients stay the same."""
    torch.manual_seed(0)
    f, g = build_reconstruction_net(TINY), build_segmentation_net(TINY)
    low_dose, full_dose, labels = _batch()
    results = {}
    for k in (1.0, 30.0):
        scaled_f = _Rescaled(f, factor=k)
        loss = task_adaptive_loss(_Rescaled(g, divisor=k), alpha=0.3)  # g sees the same images as before
        batches = [(low_dose, k * full_dose, labels)]
        scales = term_scales(scaled_f, loss, batches)
        scaled_f.eval()  # batch-norm statistics fixed: both units see the same f
        plain = float(loss(scaled_f(low_dose), k * full_dose, labels))
        loss.scales = scales
        f.zero_grad()
        normalised = loss(scaled_f(low_dose), k * full_dose, labels)
        normalised.backward()
        results[k] = (scales, plain, float(normalised), [p.grad.clone() for p in f.parameters()])
    (scales_1, plain_1, normalised_1, grads_1), (scales_k, plain_k, normalised_k, grads_k) = results[1.0], results[30.0]
    assert scales_k.mse == pytest.approx(900.0 * scales_1.mse, rel=1e-5)
    assert scales_k.dice_loss == pytest.approx(scales_1.dice_loss, rel=1e-6)
    assert plain_k > 2 * plain_1, "the plain loss does depend on the MSE's scale"
    assert normalised_k == pytest.approx(normalised_1, rel=1e-5)
    for a, b in zip(grads_1, grads_k):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)


def test_at_the_reference_each_normalised_term_averages_one():
    """Measured on the reference's own slices (in eval mode), the normalised loss is (1 - alpha) * 1 + alpha * 1."""
    torch.manual_seed(0)
    f, g = build_reconstruction_net(TINY), build_segmentation_net(TINY)
    batches = [_batch(seed) for seed in range(3)]
    loss = task_adaptive_loss(g, alpha=0.7)
    loss.scales = term_scales(f, loss, batches)
    assert f.training, "term_scales leaves the reference in the mode it found it in"
    with torch.no_grad():
        f.eval()
        values = torch.cat([loss.terms(f(low), full, labels)["loss"] for low, full, labels in batches])
    assert float(values.mean()) == pytest.approx(1.0, rel=1e-5)


def test_loss_scales_are_checked_and_plain_by_default():
    loss = task_adaptive_loss(build_segmentation_net(TINY), alpha=0.5)
    assert loss.scales == LossScales() and loss.scales.plain
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="must be a positive number"):
            LossScales(mse=bad)
    with pytest.raises(ValueError, match="no slices"):
        term_scales(build_reconstruction_net(TINY), loss, [])


@pytest.mark.parametrize("upsample", ["transposed", "interpolation"])
def test_interpolation_up_sampling_has_no_transposed_convolutions_and_no_checkerboard(upsample):
    """A constant image stays constant inside an interpolating U-Net; transposed convolutions imprint a period-2 pattern."""
    torch.manual_seed(0)
    config = UNetConfig(features=4, depth=2, upsample=upsample)
    f = build_reconstruction_net(config).eval()
    transposed = [m for m in f.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert (len(transposed) == 0) == (upsample == "interpolation")
    with torch.no_grad():
        interior = f(torch.full((1, 1, 192, 192), 0.4))[0, 0, 80:112, 80:112]  # far from the zero-padded borders
    spread = float(interior.max() - interior.min())
    if upsample == "interpolation":
        assert spread < 1e-5
    else:
        assert spread > 1e-3, "the test needs the transposed network to show its pattern"
    assert build_segmentation_net(config)(torch.rand(2, 1, 32, 32)).shape == (2, NUM_CLASSES, 32, 32)
    with pytest.raises(ValueError, match="upsample must be one of"):
        UNetConfig(upsample="nearest")
