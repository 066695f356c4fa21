"""Interpolation (RiFT Eq. 9) and the alpha* rule (RiFT §4)."""

import pytest
import torch

from rift_dist.models import build_model_from
from rift_dist.stages.interpolation import choose_alpha, interpolate_state_dicts


def _pair():
    torch.manual_seed(0)
    a = build_model_from("resnet18", 10, width=4)
    b = build_model_from("resnet18", 10, width=4)
    b.train()
    with torch.no_grad():
        b(torch.rand(4, 3, 32, 32))
    return a.state_dict(), b.state_dict()


def test_endpoints_exact():
    sa, sb = _pair()
    s0 = interpolate_state_dicts(sa, sb, 0.0)
    s1 = interpolate_state_dicts(sa, sb, 1.0)
    for k in sa:
        assert torch.equal(s0[k], sa[k]), k  # every entry, integer buffers included: the AT state exactly
        assert torch.equal(s1[k], sb[k]), k


def test_midpoint_and_integer_buffers_copied():
    sa, sb = _pair()
    s = interpolate_state_dicts(sa, sb, 0.3)
    k = "layer1.0.conv1.weight"
    torch.testing.assert_close(s[k], 0.7 * sa[k] + 0.3 * sb[k])
    rm = "layer1.0.bn1.running_mean"
    torch.testing.assert_close(s[rm], 0.7 * sa[rm] + 0.3 * sb[rm])  # BN statistics are blended too
    nb = "layer1.0.bn1.num_batches_tracked"
    assert s[nb].dtype == torch.int64 and torch.equal(s[nb], sb[nb]) and not torch.equal(sa[nb], sb[nb])


def test_mismatch_errors():
    sa, sb = _pair()
    sb = dict(sb)
    sb.pop("linear.bias")
    with pytest.raises(ValueError, match="linear.bias"):
        interpolate_state_dicts(sa, sb, 0.5)
    with pytest.raises(ValueError, match="alpha"):
        interpolate_state_dicts(sa, sa, 1.5)


def test_alpha_rule_on_hand_made_table():
    at_robust = 0.5000
    rows = [
        {"alpha": 0.0, "clean_accuracy": 0.80, "robust_accuracy": 0.5000},
        {"alpha": 0.5, "clean_accuracy": 0.82, "robust_accuracy": 0.4995},  # 0.05 pp below: allowed
        {"alpha": 0.7, "clean_accuracy": 0.83, "robust_accuracy": 0.4990},  # exactly 0.1 pp below: allowed
        {"alpha": 0.8, "clean_accuracy": 0.84, "robust_accuracy": 0.4989},  # 0.11 pp below: not allowed
        {"alpha": 1.0, "clean_accuracy": 0.86, "robust_accuracy": 0.45},
    ]
    assert choose_alpha(rows, at_robust, 0.001)["alpha"] == 0.7
    assert choose_alpha(rows, at_robust, 0.0)["alpha"] == 0.0
    assert choose_alpha(rows, at_robust, 0.1)["alpha"] == 1.0
    with pytest.raises(ValueError):
        choose_alpha(rows[3:], at_robust, 0.001)


def test_alpha_zero_model_is_recognised_as_the_at_model():
    """Evaluation skips re-evaluating theta(0): it is the AT state bit for bit (integer buffers included)."""
    from rift_dist.stages.evaluation import same_weights

    sa, sb = _pair()
    assert same_weights(sa, interpolate_state_dicts(sa, sb, 0.0))
    assert not same_weights(sa, interpolate_state_dicts(sa, sb, 0.1))
