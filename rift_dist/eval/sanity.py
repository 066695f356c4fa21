"""Checks against false robustness on measured figures (Carlini et al. 2019, "On evaluating adversarial
robustness", §5; Croce & Hein 2020, §5).

Robust <= clean accuracy; robust accuracy falls as epsilon grows and the largest epsilon breaks something;
epsilon 0 gives the clean accuracy; the gradient-free Square attack does not beat the gradient attacks by a
wide margin; AutoAttack is not weaker than PGD; the margin-loss PGD agrees with the cross-entropy PGD; every
attack output stays inside the threat model.  The attacks that produce the figures run in
:func:`rift_dist.eval.protocol.robustness_suite`; this module only judges them.
"""

from __future__ import annotations

from rift_dist.eval.report import fmt_pct as _fmt_pct


def _pct(x: float | None) -> str:
    return _fmt_pct(x) + ("%" if x is not None else "")


def sanity_checks(figures: dict, tolerance: float = 0.005, square_margin: float = 0.02, loss_gap: float = 0.02) -> dict:
    """Checks against false robustness on already measured figures (Carlini et al. 2019 §5; Croce & Hein 2020 §5).

    Args:
        figures: {"clean_accuracy": float, "robust": {attack name: robust accuracy},
            "epsilon_sweep": [(epsilon, robust accuracy), ...] (PGD, including the main epsilon),
            "epsilon0_accuracy": float or None, "square_gain": float or None (fraction of samples
            that Square broke after the gradient attacks failed on them), "square_source": str,
            "autoattack_accuracy": float or None, "pgd_accuracy": float, "violations": int,
            "margin_accuracy": float or None (PGD with the CW margin loss)}.
        tolerance: slack of the monotonicity and AutoAttack-vs-PGD checks (fraction of samples).
        square_margin: the most Square may add over the gradient attacks before masking is flagged.
        loss_gap: the most the margin-loss PGD may fall below the cross-entropy PGD before the
            cross-entropy attack is flagged as weak (a gap means the CE gradients are uninformative,
            e.g. saturated softmax; Carlini & Wagner 2017 §V, Croce & Hein 2020 §3).

    Returns:
        {"passed": bool, "failed": [names], "checks": [{"name", "passed" (True/False/None = not run),
        "detail"}]}.
    """
    checks = []
    fmt_pct = _pct

    def add(name: str, passed, detail: str):
        checks.append({"name": name, "passed": passed, "detail": detail})

    clean = figures["clean_accuracy"]
    over = {k: v for k, v in figures.get("robust", {}).items() if v > clean + 1e-12}
    add("robust_le_clean", not over,
        "every robust accuracy <= clean accuracy " + fmt_pct(clean) if not over else
        "robust accuracy above clean accuracy " + fmt_pct(clean) + ": " +
        ", ".join(f"{k} {fmt_pct(v)}" for k, v in over.items()))

    sweep = sorted(figures.get("epsilon_sweep", []))
    if len(sweep) >= 2:
        rises = [(e1, a1, e2, a2) for (e1, a1), (e2, a2) in zip(sweep, sweep[1:]) if a2 > a1 + tolerance]
        text = ", ".join(f"{255 * e:g}/255: {fmt_pct(a)}" for e, a in sweep)
        add("falls_with_epsilon", not rises,
            f"PGD robust accuracy by epsilon: {text}" + (" — rises with epsilon" if rises else ""))
        e_max, a_max = sweep[-1]
        broke = a_max < clean or clean == 0
        add("largest_epsilon_breaks", broke,
            f"at {255 * e_max:g}/255 the attack breaks {fmt_pct(clean - a_max)} of the samples"
            + ("" if broke else " — nothing; the attack is not working (gradient masking?)"))
    else:
        add("falls_with_epsilon", None, "not run (eval.sanity_epsilons is empty)")

    e0 = figures.get("epsilon0_accuracy")
    if e0 is None:
        add("epsilon0_equals_clean", None, "not run")
    else:
        add("epsilon0_equals_clean", abs(e0 - clean) < 1e-12,
            f"accuracy at epsilon 0: {fmt_pct(e0)}, clean: {fmt_pct(clean)}"
            + ("" if abs(e0 - clean) < 1e-12 else " — the model is not deterministic, or the attack moves the input"))

    gain = figures.get("square_gain")
    if gain is None:
        add("square_not_better_than_gradients", None, "not run")
    else:
        ok = gain <= square_margin
        add("square_not_better_than_gradients", ok,
            f"Square broke {fmt_pct(gain)} of the samples after the gradient attacks "
            f"({figures.get('square_source', '')}; limit {fmt_pct(square_margin)})"
            + ("" if ok else " — gradient-free beats gradient attacks: gradients are masked or broken"))

    aa, pgd_acc = figures.get("autoattack_accuracy"), figures.get("pgd_accuracy")
    if aa is not None and pgd_acc is not None:
        ok = aa <= pgd_acc + tolerance
        add("autoattack_le_pgd", ok, f"AutoAttack {fmt_pct(aa)} vs PGD {fmt_pct(pgd_acc)}"
            + ("" if ok else " — AutoAttack weaker than PGD: check the attack settings"))

    margin_acc, pgd_acc = figures.get("margin_accuracy"), figures.get("pgd_accuracy")
    if margin_acc is None or pgd_acc is None:
        add("margin_pgd_agrees_with_ce_pgd", None, "not run (eval.margin_pgd_steps is 0)")
    else:
        ok = margin_acc >= pgd_acc - loss_gap
        add("margin_pgd_agrees_with_ce_pgd", ok,
            f"PGD with the margin loss {fmt_pct(margin_acc)} vs cross-entropy PGD {fmt_pct(pgd_acc)} "
            f"(limit {fmt_pct(loss_gap)} below)"
            + ("" if ok else " — the cross-entropy attack is weak here: report the margin-loss figure (or "
                             "AutoAttack) as the robust accuracy"))

    viol = int(figures.get("violations", 0))
    add("attacks_in_threat_model", viol == 0,
        "every attack output inside [0, 1] and the epsilon ball" if viol == 0 else
        f"{viol} attack outputs left the threat model (clamped before scoring)")
    failed = [c["name"] for c in checks if c["passed"] is False]
    return {"passed": not failed, "failed": failed, "checks": checks}

