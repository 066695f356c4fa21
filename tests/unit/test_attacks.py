"""Attack properties (issue: pipeline): input gradients only, eval mode, box and ball, epsilon 0."""

import pytest
import torch

from rift_dist.attacks import fgsm, margin_loss, pgd, predict, robust_correct
from rift_dist.models import build_model_from

EPS = 8 / 255


@pytest.fixture()
def model():
    torch.manual_seed(0)
    m = build_model_from("resnet18", 10, width=4, mean=(0.5,) * 3, std=(0.25,) * 3)
    m.train()
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(2):
            m(torch.rand(16, 3, 32, 32))
    return m


@pytest.fixture()
def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 3, 32, 32, generator=g)
    x[0] = 0.0  # corners of the box
    x[1] = 1.0
    return x, torch.randint(0, 10, (8,), generator=g)


def test_bn_statistics_and_mode_restored(model, batch):
    bn_before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    model.train()
    model.layer1.eval()  # a mixed mode must come back as it was
    pgd(model, *batch, EPS, 2 / 255, 3)
    assert model.training and not model.layer1.training and model.layer2.training
    for k, v in model.state_dict().items():
        if k in bn_before:
            assert torch.equal(v, bn_before[k]), k


def test_parameter_grads_untouched(model, batch):
    for p in model.parameters():
        p.grad = None
    pgd(model, *batch, EPS, 2 / 255, 3)
    assert all(p.grad is None for p in model.parameters())
    sentinel = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, s in zip(model.parameters(), sentinel):
        p.grad = s.clone()
    fgsm(model, *batch, EPS)
    for p, s in zip(model.parameters(), sentinel):
        assert torch.equal(p.grad, s)


def test_iterates_in_box_and_ball(model, batch):
    x, y = batch
    seen = []

    def check(step, x_adv):
        seen.append(step)
        assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
        assert (x_adv - x).abs().max() <= EPS + 1e-6

    out = pgd(model, x, y, EPS, 3 / 255, 5, True, callback=check)
    assert seen == list(range(6))
    assert (out - x).abs().max() > 0  # it moved
    assert out.dtype == torch.float32 and out.shape == x.shape


def test_epsilon_zero_gives_clean_predictions(model, batch):
    x, y = batch
    out = pgd(model, x, y, 0.0, 2 / 255, 5, True)
    assert torch.equal(out, x)
    clean, robust = robust_correct(model, x, y, 0.0, 2 / 255, 5, restarts=2)
    assert torch.equal(clean, robust)
    assert torch.equal(predict(model, out), predict(model, x))


def test_attack_lowers_accuracy_and_restarts_are_worst_case():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))  # input-sensitive
    x = torch.rand(64, 3, 32, 32)
    y = predict(model, x)  # labels = predictions: clean accuracy 100 %
    clean, robust1 = robust_correct(model, x, y, 16 / 255, 4 / 255, 5, restarts=1,
                                    generator=torch.Generator().manual_seed(0))
    assert clean.all()
    assert robust1.float().mean() < 1.0
    _, robust3 = robust_correct(model, x, y, 16 / 255, 4 / 255, 5, restarts=3,
                                generator=torch.Generator().manual_seed(0))
    # the first restart is the same draw, so 3 restarts can only remove robust samples
    assert not (robust3 & ~robust1).any()


def test_margin_loss():
    logits = torch.tensor([[2.0, 1.0, 0.5], [0.0, 3.0, 1.0]])
    torch.testing.assert_close(margin_loss(logits, torch.tensor([0, 0])), torch.tensor([-1.0, 3.0]))


def test_bad_arguments(model, batch):
    with pytest.raises(ValueError, match="epsilon"):
        pgd(model, *batch, -0.1)
    with pytest.raises(ValueError, match="target_probs"):
        pgd(model, *batch, EPS, loss="kl")

