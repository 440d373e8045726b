"""The DPO and MaPO loss functions (diffusion_dpo.losses, shared by every trainer script) against the papers'
formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from diffusion_dpo.losses import dpo_loss, mapo_loss


ERRORS = {  # four per-sample error vectors of a batch of 3 pairs
    "model_err_w": torch.tensor([0.10, 0.30, 0.20]),
    "model_err_l": torch.tensor([0.20, 0.10, 0.20]),
    "ref_err_w": torch.tensor([0.15, 0.25, 0.10]),
    "ref_err_l": torch.tensor([0.15, 0.15, 0.30]),
}


def test_policy_equal_to_reference_gives_ln2_and_zero_margin():
    err_w, err_l = torch.rand(5), torch.rand(5)
    loss, metrics = dpo_loss(err_w, err_l, err_w.clone(), err_l.clone(), beta=2000)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["reward_margin"].item() == 0
    assert metrics["implicit_acc"].item() == 0.5  # every pair an exact tie, each counted half


def test_implicit_accuracy_counts_wins_and_half_of_exact_ties():
    # inside per pair: > 0 (the policy prefers the winner more than the reference does), == 0, < 0, == 0
    model_err_w = torch.tensor([0.1, 0.2, 0.3, 0.4])
    model_err_l = torch.tensor([0.2, 0.2, 0.2, 0.4])
    reference = torch.full((4,), 0.25)
    _, metrics = dpo_loss(model_err_w, model_err_l, reference, reference, beta=100)
    assert metrics["implicit_acc"].item() == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)


@pytest.mark.parametrize("beta", [1.0, 2000.0, 5000.0])
def test_sigmoid_loss_is_the_papers_formula(beta):
    e = ERRORS
    inside = -0.5 * beta * ((e["model_err_w"] - e["model_err_l"]) - (e["ref_err_w"] - e["ref_err_l"]))
    loss, metrics = dpo_loss(**e, beta=beta, loss_type="sigmoid")
    torch.testing.assert_close(loss, -F.logsigmoid(inside).mean())
    torch.testing.assert_close(metrics["reward_margin"], inside.mean())
    assert metrics["implicit_acc"].item() == pytest.approx((inside > 0).float().mean().item())  # no exact ties


# With beta 2, ERRORS give inside = -0.5 * 2 * ((w - l) - (ref_w - ref_l)) = -(-0.1 - 0), -(0.2 - 0.1), -(0 + 0.2):
# 0.1, -0.1, -0.2
BY_HAND_BETA = 2.0


def test_hinge_formula_by_hand():
    hinge, _ = dpo_loss(**ERRORS, beta=BY_HAND_BETA, loss_type="hinge")
    # relu(1 - inside): 0.9, 1.1, 1.2
    assert hinge.item() == pytest.approx((0.9 + 1.1 + 1.2) / 3)


def test_ipo_formula_by_hand():
    ipo, _ = dpo_loss(**ERRORS, beta=BY_HAND_BETA, loss_type="ipo")
    # (inside / beta - 1 / (2 beta))^2 = (inside / 2 - 0.25)^2: (0.05 - 0.25)^2, (-0.05 - 0.25)^2, (-0.1 - 0.25)^2
    assert ipo.item() == pytest.approx((0.04 + 0.09 + 0.1225) / 3)


def test_ipo_is_zero_at_its_target_margin():
    # IPO regresses inside towards 1/2: pair 0 alone at beta 10 has inside = 0.05 * 10 = 0.5
    ipo, _ = dpo_loss(**{name: errors[:1] for name, errors in ERRORS.items()}, beta=10.0, loss_type="ipo")
    assert ipo.item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_swapping_winner_and_loser_flips_the_margin(loss_type):
    e = ERRORS
    _, metrics = dpo_loss(**e, beta=100, loss_type=loss_type)
    _, swapped = dpo_loss(
        e["model_err_l"], e["model_err_w"], e["ref_err_l"], e["ref_err_w"], beta=100, loss_type=loss_type
    )
    torch.testing.assert_close(swapped["reward_margin"], -metrics["reward_margin"])
    assert metrics["implicit_acc"] + swapped["implicit_acc"] == pytest.approx(1.0)  # no exact ties here


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_gradient_lowers_winner_error_and_raises_loser_error(loss_type):
    model_err_w = torch.full((4,), 0.2, requires_grad=True)
    model_err_l = torch.full((4,), 0.2, requires_grad=True)
    ref = torch.full((4,), 0.2)
    loss, _ = dpo_loss(model_err_w, model_err_l, ref, ref, beta=2000, loss_type=loss_type)
    loss.backward()
    # gradient descent moves along -grad: the winner's error goes down, the loser's up
    assert (model_err_w.grad > 0).all() and (model_err_l.grad < 0).all()
    torch.testing.assert_close(model_err_w.grad, -model_err_l.grad)


# Conservative DPO: -(1 - eps) logsigmoid(x) - eps logsigmoid(-x) = softplus(-x) + eps * x, since
# softplus(x) = x + softplus(-x). ERRORS at beta 2 give x = 0.1, -0.1, -0.2: softplus(-x) = 0.644397, 0.744397,
# 0.798139 (mean 0.728978), mean x = -0.2 / 3.
def test_label_smoothing_formula_by_hand():
    loss, metrics = dpo_loss(**ERRORS, beta=BY_HAND_BETA, loss_type="sigmoid", label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.728978 + 0.1 * (-0.2 / 3), abs=1e-6)
    assert metrics["reward_margin"].item() == pytest.approx(-0.2 / 3)  # the metrics do not depend on eps


@pytest.mark.parametrize("beta", [2.0, 2000.0])
def test_label_smoothing_zero_is_the_sigmoid_loss_exactly(beta):
    plain, _ = dpo_loss(**ERRORS, beta=beta, loss_type="sigmoid")
    smoothed, _ = dpo_loss(**ERRORS, beta=beta, loss_type="sigmoid", label_smoothing=0.0)
    assert torch.equal(plain, smoothed)


def test_label_smoothing_half_would_learn_nothing_and_smoothing_weakens_the_gradient():
    # at eps = 0.5 the loss is symmetric in the label, so its gradient vanishes: why check_args stops below 0.5
    grads = {}
    for eps in (0.0, 0.2, 0.5):
        model_err_w = ERRORS["model_err_w"].clone().requires_grad_(True)
        e = {**ERRORS, "model_err_w": model_err_w}
        loss, _ = dpo_loss(**e, beta=BY_HAND_BETA, loss_type="sigmoid", label_smoothing=eps)
        loss.backward()
        grads[eps] = model_err_w.grad
    # d/dx [softplus(-x) + eps x] = -(1 - sigmoid(x)) + eps, and dx/d err_w = -beta / 2
    x = torch.tensor([0.1, -0.1, -0.2])
    for eps, grad in grads.items():
        torch.testing.assert_close(grad, (-(1 - torch.sigmoid(x)) + eps) * (-BY_HAND_BETA / 2) / 3)
    assert grads[0.5].abs().max() < grads[0.2].abs().max() < grads[0.0].abs().max()


# MaPO with s = 0.5, T = 1000: score(e) = s e / (exp(s e) - 1). Pair 1 (e_w 0.100, e_l 0.102): log-odds 4.91584e-4,
# T * log-odds 0.491584, -logsigmoid = 0.477263. Pair 2 (0.300, 0.296, the loser ahead): log-odds -9.50370e-4,
# -logsigmoid(-0.950370) = 1.277223. Mean margin loss 0.877243; mean winner error 0.2.
MAPO_ERR_W = torch.tensor([0.100, 0.300], dtype=torch.float64)
MAPO_ERR_L = torch.tensor([0.102, 0.296], dtype=torch.float64)


@pytest.mark.parametrize("beta_mapo, expected", [(0.1, 0.2 + 0.1 * 0.877243), (0.5, 0.2 + 0.5 * 0.877243)])
def test_mapo_formula_by_hand(beta_mapo, expected):
    loss, metrics = mapo_loss(MAPO_ERR_W, MAPO_ERR_L, beta_mapo=beta_mapo, num_train_timesteps=1000)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert metrics["margin_loss"].item() == pytest.approx(0.877243, abs=1e-6)
    assert metrics["policy_margin"].item() == pytest.approx((0.002 - 0.004) / 2)  # mean of err(l) - err(w)
    assert metrics["policy_acc"].item() == 0.5  # pair 1 prefers its winner, pair 2 its loser
    assert metrics["model_mse_w"].item() == pytest.approx(0.2)
    assert not any(name.startswith(("ref_", "implicit_", "reward_")) for name in metrics)  # no reference


def test_mapo_gradient_lowers_winner_error_and_raises_loser_error():
    model_err_w = torch.full((4,), 0.2, requires_grad=True)
    model_err_l = torch.full((4,), 0.2, requires_grad=True)
    loss, metrics = mapo_loss(model_err_w, model_err_l, beta_mapo=0.1, num_train_timesteps=1000)
    # equal errors: the margin term is ln 2 and the policy ties every pair
    assert loss.item() == pytest.approx(0.2 + 0.1 * math.log(2))
    assert metrics["policy_acc"].item() == 0.5
    loss.backward()
    assert (model_err_w.grad > 0).all() and (model_err_l.grad < 0).all()
    # the SFT term pulls the winner's error down on top of the margin term
    assert (model_err_w.grad.abs() > model_err_l.grad.abs()).all()


# --soft_labels passes label_smoothing = 1 - p per pair: loss = -[p logsigmoid(inside) + (1 - p) logsigmoid(-inside)]
def test_soft_labels_p_one_is_the_sigmoid_loss_and_one_p_for_all_is_label_smoothing():
    plain, _ = dpo_loss(**ERRORS, beta=2000.0)
    certain, _ = dpo_loss(**ERRORS, beta=2000.0, label_smoothing=1 - torch.ones(3))
    torch.testing.assert_close(certain, plain)
    smoothed, _ = dpo_loss(**ERRORS, beta=2000.0, label_smoothing=0.2)
    constant, _ = dpo_loss(**ERRORS, beta=2000.0, label_smoothing=1 - torch.full((3,), 0.8))
    torch.testing.assert_close(constant, smoothed)
    p = torch.tensor([0.9, 0.5, 0.7])
    soft, _ = dpo_loss(**ERRORS, beta=BY_HAND_BETA, label_smoothing=1 - p)
    inside = torch.tensor([0.1, -0.1, -0.2])  # ERRORS at beta 2 (see above)
    torch.testing.assert_close(soft, -(p * F.logsigmoid(inside) + (1 - p) * F.logsigmoid(-inside)).mean())


def test_a_tie_has_no_margin_gradient_at_the_reference_and_pulls_towards_it():
    """p = 0.5: d loss / d inside = sigmoid(inside) - 1/2, zero while the model is its reference (where a decided
    pair's is not), elsewhere towards the reference's margin from either side."""
    ref_w, ref_l = torch.full((3,), 0.2), torch.full((3,), 0.3)
    model_w = torch.tensor([0.2, 0.15, 0.25], requires_grad=True)  # inside 0, above 0, below 0
    for p, margin_gradient_at_reference in ((1.0, 0.5 * 100 / 2 / 3), (0.5, 0.0)):
        model_w.grad = None
        loss, _ = dpo_loss(model_w, ref_l, ref_w, ref_l, beta=100.0, label_smoothing=1 - torch.full((3,), p))
        loss.backward()
        assert model_w.grad[0].item() == pytest.approx(margin_gradient_at_reference, abs=1e-6)
    step = -model_w.grad[1:]  # gradient descent on the tied pairs that left the reference
    assert (torch.sign(step) == torch.sign(ref_w[1:] - model_w[1:].detach())).all()
