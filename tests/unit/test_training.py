"""Adversarial-training stage helpers that need no training run."""


def test_best_epoch_selection_breaks_robust_ties_by_clean_accuracy():
    from rift_dist.stages.adversarial_training import improves

    best = {"robust_accuracy": 0.248, "clean_accuracy": 0.336, "epoch": 5}
    assert improves({"robust_accuracy": 0.25, "clean_accuracy": 0.30}, best)       # robust first
    assert not improves({"robust_accuracy": 0.246, "clean_accuracy": 0.50}, best)  # clean never buys robustness
    assert improves({"robust_accuracy": 0.248, "clean_accuracy": 0.394}, best)     # tie -> cleaner model
    assert not improves({"robust_accuracy": 0.248, "clean_accuracy": 0.336}, best)  # full tie -> earlier epoch
    assert improves({"robust_accuracy": 0.0, "clean_accuracy": 0.1}, {"robust_accuracy": -1.0, "epoch": -1})


def test_trades_kl_is_exactly_zero_when_adversarial_equals_clean():
    """TRADES (Zhang et al. 2019, Eq. 5): with x' = x the KL term vanishes, so the loss is the clean CE exactly."""
    import torch
    import torch.nn.functional as F

    from rift_dist.stages.adversarial_training import at_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 10, generator=g) * 5
    labels = torch.randint(0, 10, (64,), generator=g)
    loss = at_loss("trades", logits, logits.clone(), labels, beta=6.0)
    assert loss.item() == F.cross_entropy(logits, labels).item()
