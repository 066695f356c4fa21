"""The one evaluator of a run (RiFT §5.1; Croce & Hein 2020).

- :mod:`rift_dist.eval.protocol` — the attack protocol (per-sample outcomes of a sequence of attacks, projected
  into the threat model), PGD, the two drivers (``evaluate_model`` over the run's loader: selection, the
  sweep, corruptions, ``rift compare``; ``evaluate_sequence``, resumable: the final numbers) with one
  accounting, and the suite of the final evaluation.
- :mod:`rift_dist.eval.corruption` — the corruption sets of ``eval.corruption_protocol`` and the accuracy on each.
- :mod:`rift_dist.eval.autoattack` — standard AutoAttack through torchattacks' classes.
- :mod:`rift_dist.eval.sanity` — checks against false robustness on the measured figures.
- :mod:`rift_dist.eval.report` — the final numbers as tables (Markdown, CSV, MLflow metrics, terminal).
"""
