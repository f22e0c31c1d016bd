"""Networks and the task-adaptive / joint losses: freezing, gradient flow, validation."""

from __future__ import annotations

import pytest
import torch

from training.losses import joint_loss, task_adaptive_loss
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
