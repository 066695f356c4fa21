"""``rift compare CONFIG``: RiFT against its alternatives on the same adversarially trained models (issue 16).

Per AT base (``compare.bases``, :mod:`rift_dist.compare.bases`: PGD-AT, TRADES or MART trained here, or an
imported checkpoint -- RiFT Table 2; default: the run's own ``train.method``) and seed (``compare.seeds``; one run
directory ``<run_dir>/seed-<s>/`` each, ``<run_dir>/base-<name>/seed-<s>/`` with bases listed) the AT model is
trained (or imported) and the
MRC table computed once (the ordinary ``train`` and ``mrc`` stages), then every method of
``compare.methods`` fine-tunes from that AT model in its own resumable folder ``seed-<s>/compare/<method>/``
(the ordinary fine-tuning stage, :func:`rift_dist.stages.finetune.run`, with the method's trainable set):

==============  =====================================================================================
rift            the lowest-MRC module's weight (RiFT §3.3; ``finetune.modules`` when set)
most-critical   the highest-MRC module's weight (RiFT §5, "fine-tuning the most critical module hurts")
random-module   one module drawn uniformly (stream ``compare-random-module`` of the seed; recorded)
top-<k>         the k lowest-MRC modules' weights (RiFT Table 4; k = 2, 3, 5 by default)
all-layers      every parameter (RiFT Table 3); with the alpha sweep this is WiSE-FT's recipe
logit-mix       no training and no weight interpolation: logits (1 - alpha) z_AT + alpha z_FT with the
                all-layers model (MixedNUTS-style logit mixing)
==============  =====================================================================================

``mrc.exclude`` applies to every module choice.  Each method gets the same interpolation grid
(``interpolation.alphas``; theta(alpha) = (1 - alpha) theta_AT + alpha theta_FT, RiFT Eq. 9), evaluated on the
validation split (selection split) for clean accuracy, robust accuracy (PGD with
``eval.selection_attack_steps`` steps, ``eval.selection_restarts`` restarts, the sweep's noise stream) and
corruption accuracy (the configured corruptions and severities applied to the validation images, stream
``compare-val-corruption``); alpha* by the paper's rule (:func:`rift_dist.stages.interpolation.choose_alpha`).
Only theta(alpha*) is evaluated on the test split, once: clean, PGD (``eval.attack``, ``eval.restarts``, worst
case) and corruption accuracy on the test corruption set of the evaluate stage.  alpha = 0 is the AT model for
every method (bit-identical weights; logit-mix returns z_AT), so it is evaluated once per seed.  With
``compare.autoattack`` the test points also get AutoAttack (``eval.autoattack_*``, the first
``compare.autoattack_examples`` test images; :func:`rift_dist.compare.points.autoattack_point`).

Statistics (:func:`paired_difference`): with one seed, the difference of two methods on the same test images
is a per-image paired mean with the McNemar-style standard error; with two or more seeds, a paired t interval
over the seeds' accuracies; always within one base.  Outputs in ``<run_dir>/compare/``: ``pareto.csv`` (a
``base`` column), ``summary.md`` (a table per base), ``summary.json`` and ``pareto.png`` (a panel per base);
MLflow: one parent run, a child per (base, method, seed) and per (base, seed)'s AT model, tagged ``rift.base``.

Modules: :mod:`.methods` (trainable sets, logit mixing), :mod:`.stats`, :mod:`.points` (evaluated points on
disk), :mod:`.bases`, :mod:`.seed` (one base and seed), :mod:`.report` (the outputs), :mod:`.run` (the command).
"""

from __future__ import annotations

from rift_dist.compare.bases import base_config, base_dir, check_base_checkpoints, compare_bases, is_flat
from rift_dist.compare.methods import AT, METRICS, CompareError, LogitMix, finetuned_method, method_modules
from rift_dist.compare.points import autoattack_point, evaluate_point, load_point, save_point, val_corruption_sets
from rift_dist.compare.report import (CSV_FIELDS, PAPER_ROWS, csv_fields, method_table, noise_verdict, pareto_rows,
                                      plot_pareto, summary_markdown, write_pareto_csv)
from rift_dist.compare.run import check_compare, compare_command, compare_seeds, plan_text, run_compare
from rift_dist.compare.seed import run_seed
from rift_dist.compare.stats import accuracy_se, paired_difference, pareto_front

__all__ = ["AT", "CSV_FIELDS", "METRICS", "PAPER_ROWS", "CompareError", "LogitMix", "accuracy_se", "autoattack_point",
           "base_config", "base_dir", "check_base_checkpoints", "check_compare", "compare_bases", "csv_fields",
           "is_flat", "compare_command", "compare_seeds", "evaluate_point", "finetuned_method", "load_point", "method_modules",
           "method_table", "noise_verdict", "paired_difference", "pareto_front", "pareto_rows", "plan_text",
           "plot_pareto", "run_compare", "run_seed", "save_point", "summary_markdown", "val_corruption_sets",
           "write_pareto_csv"]
