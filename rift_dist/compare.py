"""``rift compare CONFIG``: RiFT against its alternatives on one adversarially trained model (issue 16).

Per seed (``compare.seeds``; one run directory ``<run_dir>/seed-<s>/`` each) the AT model is trained and the
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
every method (bit-identical weights; logit-mix returns z_AT), so it is evaluated once per seed.

Statistics (:func:`paired_difference`): with one seed, the difference of two methods on the same test images
is a per-image paired mean with the McNemar-style standard error; with two or more seeds, a paired t interval
over the seeds' accuracies.  Outputs in ``<run_dir>/compare/``: ``pareto.csv``, ``summary.md``, ``summary.json``
and ``pareto.png``; MLflow: one parent run, a child per (method, seed) and per seed's AT model.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import statistics
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rift_dist.atomic import atomic_write_text, read_json, read_json_piece
from rift_dist.config import RunConfig, flatten
from rift_dist.errors import RiftError

AT = "at"
CSV_FIELDS = ("method", "seed", "alpha", "split", "clean", "robust", "corruption", "n", "selected", "on_front")
METRICS = (("clean", "clean_accuracy"), ("robust", "robust_accuracy"), ("corruption", "corruption_accuracy"))
PAPER_ROWS = {  # RiFT (Zhu et al., ICCV 2023): clean / OOD / PGD-10 robust accuracy (%), CIFAR-10 ResNet-18
    ("cifar10", "resnet18"): {"at": (81.46, 73.56, 53.63), "rift": (83.44, 75.69, 53.65),  # Table 1
                              "all-layers": (83.56, 75.48, 52.66)},  # Table 3 (fine-tuning all layers)
}
"""The paper's numbers for the rows it has (clean, OOD, robust); Table 4's top-k numbers are not on hand."""


class CompareError(RiftError, RuntimeError):
    """``rift compare`` cannot run: a method without what it needs, or a stale comparison folder."""


# ------------------------------------------------------------------------------ methods


def method_modules(method: str, mrc_rows: list[dict], names_in_order: list[str], exclude: list[str],
                   seed: int, rift_modules: list[str] | None = None) -> list[str] | None:
    """The modules whose weights ``method`` fine-tunes; None for every parameter (all-layers, logit-mix).

    Args:
        mrc_rows: the MRC table ([{"module", "mrc", ...}], RiFT Eq. 2).
        names_in_order: module names in network order (for ``first`` / ``last`` in ``exclude``).
        exclude: ``mrc.exclude``, applied to every choice.
        seed: the comparison seed (random-module's draw: stream ``compare-random-module``).
        rift_modules: ``finetune.modules`` when set (rift then fine-tunes that hand-picked module).

    Raises:
        CompareError: an unknown method, or top-k with k above the number of candidate modules.
    """
    from rift_dist.seeding import stream_seed
    from rift_dist.stages.criticality import choose_modules

    if method in ("all-layers", "logit-mix"):
        return None
    ranked = choose_modules(mrc_rows, names_in_order, exclude, len(mrc_rows))  # ascending MRC, exclusions out
    if method == "rift":
        return list(rift_modules) if rift_modules else ranked[:1]
    if method == "most-critical":
        return ranked[-1:]
    if method == "random-module":
        rng = np.random.default_rng(stream_seed(seed, "compare-random-module"))
        return [ranked[int(rng.integers(len(ranked)))]]
    if method.startswith("top-") and method[4:].isdigit():
        k = int(method[4:])
        if k > len(ranked):
            raise CompareError(f"method {method}: only {len(ranked)} modules can be chosen (after mrc.exclude); "
                               f"use top-<k> with k <= {len(ranked)}")
        return ranked[:k]
    raise CompareError(f"unknown method {method!r}; see compare.methods in rift_dist/config.py")


def finetuned_method(method: str) -> str:
    """The method whose fine-tuned model ``method`` uses (logit-mix mixes with the all-layers model)."""
    return "all-layers" if method == "logit-mix" else method


class LogitMix(nn.Module):
    """Logits (1 - alpha) z_AT(x) + alpha z_FT(x) of two models (MixedNUTS-style mixing; no weight interpolation).

    Input: images [B, 3, H, W] in [0, 1]; output: logits [B, classes] in the models' dtype.  alpha 0 and 1
    return the AT / FT model's logits themselves (exactly, not ``1 * z + 0 * z'``).

    Raises:
        ValueError: alpha outside [0, 1].
    """

    def __init__(self, at_model: nn.Module, ft_model: nn.Module, alpha: float):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.at_model, self.ft_model, self.alpha = at_model, ft_model, float(alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102 - see the class docstring
        if self.alpha == 0.0:
            return self.at_model(x)
        if self.alpha == 1.0:
            return self.ft_model(x)
        return (1.0 - self.alpha) * self.at_model(x) + self.alpha * self.ft_model(x)


# ------------------------------------------------------------------------------ statistics


def accuracy_se(p: float, n: int) -> float:
    """Binomial standard error sqrt(p (1 - p) / n) of an accuracy p (fraction) on n images (0 when n = 0)."""
    return math.sqrt(max(p * (1.0 - p), 0.0) / n) if n else 0.0


def paired_difference(a, b, confidence: float = 0.95, per_image: bool = True) -> dict:
    """Mean of a - b with its standard error and confidence interval.

    Args:
        a, b: per-image scores of two models on the same images ([n] of 0/1, or fractions for corruption
            accuracy) when ``per_image``; else per-seed accuracies ([S], the same seeds in the same order).
        confidence: the interval's level.
        per_image: per-image paired difference, s.e. = sqrt(sum (d_i - mean)^2) / n (for 0/1 scores the
            McNemar-style sqrt(b + c - (b - c)^2 / n) / n, b and c the discordant counts), normal interval;
            else a paired t interval over the seeds, s.e. = sd(d_s) / sqrt(S) (sample sd), t with S - 1 d.o.f.

    Returns:
        {"mean", "se", "low", "high", "n", "method"} (fractions).

    Raises:
        ValueError: different lengths, no values, or one seed for the t interval.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired_difference needs two equal-length 1-d score lists, got {a.shape} and {b.shape}")
    d = a - b
    n = d.size
    mean = float(d.mean())
    if per_image:
        se = float(math.sqrt(((d - mean) ** 2).sum()) / n)
        q = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
        how = "per-image paired difference, McNemar-style s.e., normal interval"
    else:
        if n < 2:
            raise ValueError("a paired t interval over seeds needs at least 2 seeds; use per_image=True for one")
        from scipy import stats

        se = float(d.std(ddof=1) / math.sqrt(n))
        q = float(stats.t.ppf(0.5 + confidence / 2, n - 1))
        how = f"paired t over {n} seeds"
    return {"mean": mean, "se": se, "low": mean - q * se, "high": mean + q * se, "n": n, "method": how}


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """Which (clean, robust) points no other point dominates (>= in both, > in one); equal points both stay."""
    out = []
    for i, (c, r) in enumerate(points):
        out.append(not any(c2 >= c and r2 >= r and (c2 > c or r2 > r) for j, (c2, r2) in enumerate(points) if j != i))
    return out


# ------------------------------------------------------------------------------ evaluation pieces


def val_corruption_sets(cfg: RunConfig, val) -> list:
    """The configured corruptions x severities applied to the validation images: [(name, severity, ArrayDataset)].

    The test split has its own corruption set (``data.corruption_root`` or the re-generated one); the
    validation images get the same corruptions here (re-generated, seeded by stream ``compare-val-corruption``
    of ``data.corruption_seed``), so alpha* never sees test images.  [] when no corruption set is configured.
    """
    from rift_dist.data.corruptions import CIFAR_CORRUPTIONS
    from rift_dist.data.corruptions.kernels import corrupt_batch
    from rift_dist.data.sources import ArrayDataset
    from rift_dist.seeding import stream_seed

    d = cfg.data
    if not d.corruption_root and not d.corruption_generate:
        return []
    out = []
    for i, name in enumerate(list(d.corruptions) or list(CIFAR_CORRUPTIONS)):
        for s in sorted(d.severities):
            rng = np.random.default_rng(stream_seed(d.corruption_seed, "compare-val-corruption", i, s))
            images = corrupt_batch(val.images, name, s, rng)
            out.append((name, s, ArrayDataset(images, val.labels, val.classes,
                                              f"validation split, {name} severity {s} (re-generated)")))
    return out


def evaluate_point(ctx, model: nn.Module, dataset, corruption_sets: list, attack, restarts: int, seed: int,
                   desc: str) -> dict:
    """Clean, robust and corruption accuracy of ``model`` with per-image scores.

    Returns:
        {"clean", "robust", "corruption" (None without sets), "n", "scores": {"clean", "robust",
        "corruption"} (numpy [n]: 0/1, and the fraction of corruption sets each image is right on)}.
    """
    from rift_dist.eval.protocol import evaluate_model

    ev = evaluate_model(ctx, model, dataset, attack, restarts, seed=seed, desc=desc, per_sample=True)
    scores = {"clean": ev["clean_correct"].astype(np.float64), "robust": ev["robust_correct"].astype(np.float64)}
    corr = None
    if corruption_sets:
        per = [evaluate_model(ctx, model, ds, None, desc=f"{desc} {n}-{s}", in_memory=True,
                              per_sample=True)["clean_correct"] for n, s, ds in corruption_sets]
        scores["corruption"] = np.mean(np.stack(per).astype(np.float64), axis=0)
        corr = float(scores["corruption"].mean())
    return {"clean": ev["clean_accuracy"], "robust": ev["robust_accuracy"], "corruption": corr,
            "n": ev["num_examples"], "scores": scores}


def save_point(path: Path, point: dict, extra: dict | None = None) -> None:
    """Write a point (without its scores) as JSON and its per-image scores as ``.npz`` beside it (atomically)."""
    from rift_dist.stages.common import write_json

    scores = point.get("scores", {})
    buf = io.BytesIO()
    np.savez(buf, **scores)
    tmp = path.with_suffix(".npz.tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path.with_suffix(".npz"))
    write_json(path, {**{k: v for k, v in point.items() if k != "scores"}, **(extra or {})})


def load_point(path: Path) -> dict | None:
    """A point written by :func:`save_point` (scores included), or None when it is not there."""
    if not path.is_file() or not path.with_suffix(".npz").is_file():
        return None
    point = read_json_piece(path)
    if point is None:  # corrupt (reported): evaluated again
        return None
    with np.load(path.with_suffix(".npz")) as z:
        point["scores"] = {k: z[k] for k in z.files}
    return point


# ------------------------------------------------------------------------------ one seed


def _check_folder(folder: Path, signature: dict, is_main: bool) -> None:
    """Refuse a comparison folder made with another config (names the changed keys); record it otherwise."""
    from rift_dist.stages.common import write_json

    marker = folder / "compare.json"
    now = json.loads(json.dumps(signature, default=str))
    if marker.is_file():
        before = read_json(marker)
        changed = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
        if changed:
            raise CompareError(f"{folder} was made with a different config (changed: {', '.join(changed)}); "
                               f"use a new --run-dir or delete {folder} to redo it")
    elif is_main:
        write_json(marker, now)


def run_seed(top, cfg: RunConfig, seed_dir: Path, runtime, progress: bool, test_sets, log) -> dict:
    """The whole comparison for one seed: AT + MRC, every method's fine-tuning, sweep and test point.

    Returns {"at": {"val", "test"}, "methods": {method: {"modules", "sweep": [rows], "alpha", "test"}}}.
    """
    from rift_dist.data.loaders import get_dataset
    from rift_dist.models import build_model, module_names
    from rift_dist.pipeline import make_context, run_stages
    from rift_dist.stages import STAGES
    from rift_dist.stages import finetune
    from rift_dist.stages.common import StageContext, load_state, new_model, read_done, stage_signature
    from rift_dist.stages.evaluation import test_dataset
    from rift_dist.stages.interpolation import choose_alpha, interpolate_state_dicts, selection_attack
    from rift_dist.seeding import stream_seed
    from rift_dist.tracking import Tracker

    s = cfg.seed
    at_run = top.child(f"AT + MRC seed={s}", key=f"seed-{s}-at", params={"seed": s},
                       tags={"rift.method": AT, "rift.compare": "1"})
    ctx = make_context(cfg, seed_dir, runtime, progress, parent_run_id=getattr(at_run, "run_id", None))
    try:
        run_stages(ctx, list(STAGES[: STAGES.index("mrc") + 1]))  # the AT model and its MRC table
    finally:
        ctx.tracker.finish("FINISHED", end_parent=False)
    mrc_rows = read_json(seed_dir / "mrc" / "mrc.json")["rows"]
    names = module_names(build_model(cfg))
    at_path = seed_dir / "train" / "model.pt"
    theta_at = load_state(at_path, "the adversarially trained model")
    selection = get_dataset(cfg, "selection")
    val_sets = val_corruption_sets(cfg, selection)
    test = test_dataset(ctx)
    sel_attack, sel_seed = selection_attack(cfg), stream_seed(s, "interpolation-sweep")
    test_seed = stream_seed(s, "eval-pgd")
    alphas = sorted(set(cfg.interpolation.alphas) | {0.0})
    cmp_dir = seed_dir / "compare"
    rt = runtime

    def point(path: Path, make_model, split: str, desc: str) -> dict:
        cached = rt.broadcast_object(path.is_file() and path.with_suffix(".npz").is_file())
        if cached:
            return load_point(path)
        model = make_model()
        if split == "val":
            p = evaluate_point(ctx, model, selection, val_sets, sel_attack, cfg.eval.selection_restarts, sel_seed, desc)
        else:
            p = evaluate_point(ctx, model, test, test_sets, cfg.eval.attack, cfg.eval.restarts, test_seed, desc)
        if rt.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_point(path, p)
        rt.barrier()
        return p

    _check_folder(cmp_dir / AT, stage_signature(cfg, "evaluate"), rt.is_main)
    at_model = lambda: new_model(ctx, theta_at)  # noqa: E731
    at_val = point(cmp_dir / AT / "val.json", at_model, "val", f"seed {s} AT val")
    at_test = point(cmp_dir / AT / "test.json", at_model, "test", f"seed {s} AT test")
    log(f"[compare] seed {s} AT: val clean {100 * at_val['clean']:.2f}% robust {100 * at_val['robust']:.2f}%")
    at_run.log_metrics({f"at.{m}": at_test[k] for k, m in METRICS if at_test[k] is not None})
    top.end(at_run)
    result = {"at": {"val": at_val, "test": at_test}, "methods": {}}
    ft_states: dict[str, dict] = {}
    for method in cfg.compare.methods:
        modules = method_modules(method, mrc_rows, names, list(cfg.mrc.exclude), s, list(cfg.finetune.modules))
        source = finetuned_method(method)
        folder = cmp_dir / source
        cfg_m = copy.deepcopy(cfg)
        cfg_m.finetune.modules = list(modules or [])
        run = top.child(f"{method} seed={s}", key=f"seed-{s}-{method}",
                        params={"method": method, "seed": s, "data.dataset": cfg.data.dataset,
                                "model.arch": cfg.model.arch, "model.width": cfg.model.width,
                                "model.widen_factor": cfg.model.widen_factor},
                        tags={"rift.method": method, "rift.compare": "1",
                              "rift.modules": ",".join(modules) if modules else finetune.ALL_PARAMETERS})
        if source not in ft_states:
            _check_folder(folder, stage_signature(cfg_m, "evaluate"), rt.is_main)
            tracker = Tracker(cfg_m, folder, active=rt.is_main, parent_run_id=getattr(run, "run_id", None))
            ctx_m = StageContext(cfg_m, folder, rt, tracker, ctx.precision, progress, extra={"at_model": str(at_path)})
            try:
                if read_done(ctx_m, "finetune") is None:
                    log(f"[compare] seed {s} {source}: fine-tuning {', '.join(modules) if modules else 'every parameter'}")
                    finetune.run(ctx_m, modules, all_parameters=modules is None)
            finally:
                tracker.finish("FINISHED", end_parent=False)
            ft_states[source] = load_state(folder / "finetune" / "model.pt", f"the fine-tuned model of {source}")
        theta_ft = ft_states[source]
        mdir = cmp_dir / method
        if method == "logit-mix":
            at_net, ft_net = new_model(ctx, theta_at), new_model(ctx, theta_ft)
            make = lambda a: (lambda: LogitMix(at_net, ft_net, a))  # noqa: E731
        else:
            make = lambda a: (lambda: new_model(ctx, interpolate_state_dicts(theta_at, theta_ft, a)))  # noqa: E731
        rows = []
        for i, a in enumerate(alphas):
            p = at_val if a == 0.0 else point(mdir / "sweep" / f"alpha-{a:.4f}.json", make(a), "val",
                                              f"seed {s} {method} alpha {a:g}")
            rows.append({"alpha": a, "clean_accuracy": p["clean"], "robust_accuracy": p["robust"],
                         "corruption_accuracy": p["corruption"], "n": p["n"]})
            run.log_metrics({"val.clean_accuracy": p["clean"], "val.robust_accuracy": p["robust"], "alpha": a}, step=i)
        best = choose_alpha(rows, at_val["robust"], cfg.interpolation.tolerance)
        alpha = best["alpha"]
        test_point = at_test if alpha == 0.0 else point(mdir / f"test-alpha-{alpha:.4f}.json", make(alpha), "test",
                                                        f"seed {s} {method} test")
        log(f"[compare] seed {s} {method}: alpha* {alpha:g}; test clean {100 * test_point['clean']:.2f}% "
            f"robust {100 * test_point['robust']:.2f}%" + (" (alpha* = 0: the AT model itself)" if alpha == 0 else ""))
        run.log_metrics({"alpha_star": alpha, **{f"method.{m}": test_point[k] for k, m in METRICS
                                                  if test_point[k] is not None},
                         **{f"at.{m}": at_test[k] for k, m in METRICS if at_test[k] is not None}})
        top.end(run)
        result["methods"][method] = {"modules": modules, "sweep": rows, "alpha": alpha, "test": test_point}
    return result


# ------------------------------------------------------------------------------ tables, figure, summary


def pareto_rows(results: dict[int, dict]) -> list[dict]:
    """The rows of ``pareto.csv``: AT and every (method, alpha) on the validation split, AT and every alpha* on
    the test split, per seed; ``on_front`` = on the clean-vs-robust Pareto front of that seed and split."""
    rows = []
    for seed, res in sorted(results.items()):
        for split in ("val", "test"):
            block = [{"method": AT, "seed": seed, "alpha": 0.0, "split": split, **_acc(res["at"][split]),
                      "selected": 1}]
            for method, m in res["methods"].items():
                if split == "val":
                    block += [{"method": method, "seed": seed, "alpha": r["alpha"], "split": split,
                               "clean": r["clean_accuracy"], "robust": r["robust_accuracy"],
                               "corruption": r["corruption_accuracy"], "n": r["n"],
                               "selected": int(r["alpha"] == m["alpha"])} for r in m["sweep"] if r["alpha"] > 0]
                else:
                    block.append({"method": method, "seed": seed, "alpha": m["alpha"], "split": split,
                                  **_acc(m["test"]), "selected": 1})
            for r, on in zip(block, pareto_front([(r["clean"], r["robust"]) for r in block])):
                r["on_front"] = int(on)
            rows += block
    return rows


def _acc(p: dict) -> dict:
    return {"clean": p["clean"], "robust": p["robust"], "corruption": p["corruption"], "n": p["n"]}


def write_pareto_csv(path: Path, rows: list[dict]) -> None:
    """``pareto.csv``: method, seed, alpha, split, clean, robust, corruption (fractions), n, selected, on_front."""
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r[k]) for k in CSV_FIELDS})
    atomic_write_text(path, buf.getvalue())


def method_table(results: dict[int, dict], methods: list[str], confidence: float) -> list[dict]:
    """Per method (AT first): alpha* per seed, the test accuracies (mean, std over seeds, mean binomial s.e.),
    and the paired differences to AT and to rift (:func:`paired_difference`) for each metric."""
    seeds = sorted(results)
    per_image = len(seeds) == 1
    out = []
    for method in [AT] + list(methods):
        pts = [results[s]["at"]["test"] if method == AT else results[s]["methods"][method]["test"] for s in seeds]
        row = {"method": method, "seeds": seeds,
               "alpha": [0.0 if method == AT else results[s]["methods"][method]["alpha"] for s in seeds],
               "modules": None if method == AT else results[seeds[0]]["methods"][method]["modules"]}
        for key, _ in METRICS:
            vals = [p[key] for p in pts]
            if any(v is None for v in vals):
                row[key] = None
                continue
            row[key] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None,
                        "se": statistics.fmean(accuracy_se(p[key], p["n"]) for p in pts) if key != "corruption"
                        else statistics.fmean(float(np.std(p["scores"]["corruption"]) / math.sqrt(p["n"]))
                                              for p in pts)}
            for ref in (AT, "rift"):
                if ref == method or (ref != AT and ref not in methods):
                    continue
                refs = [results[s]["at"]["test"] if ref == AT else results[s]["methods"][ref]["test"] for s in seeds]
                if per_image:
                    d = paired_difference(pts[0]["scores"][key], refs[0]["scores"][key], confidence, True)
                else:
                    d = paired_difference(vals, [p[key] for p in refs], confidence, False)
                row[f"delta_{ref}_{key}"] = d
        out.append(row)
    return out


def _pp(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}"


def _acc_cell(v: dict | None) -> str:
    if v is None:
        return "-"
    return f"{_pp(v['mean'])} ± {_pp(v['std'] if v['std'] is not None else v['se'])}"


def _delta_cell(d: dict | None) -> str:
    if d is None:
        return "-"
    return f"{_pp(d['mean'], True)} (s.e. {_pp(d['se'])}) [{_pp(d['low'], True)}, {_pp(d['high'], True)}]"


def noise_verdict(table: list[dict]) -> tuple[str, list[str]]:
    """Whether the differences to rift are inside the sampling noise: (sentence, [differences outside])."""
    outside = []
    for row in table:
        for key, _ in METRICS:
            d = row.get(f"delta_rift_{key}")
            if d is not None and not (d["low"] <= 0.0 <= d["high"]):
                outside.append(f"{row['method']} {key} {_pp(d['mean'], True)} pp")
    if not outside:
        return ("At this scale every difference to rift is inside the sampling noise: each confidence interval "
                "contains 0.", outside)
    return (f"{len(outside)} difference(s) to rift are outside the sampling noise (interval without 0): "
            + "; ".join(outside) + ".", outside)


def summary_markdown(cfg: RunConfig, results: dict[int, dict], table: list[dict], info: dict) -> str:
    """``compare/summary.md``: the method table with its noise, the per-seed alpha*, the paper's rows."""
    seeds = sorted(results)
    per_image = len(seeds) == 1
    conf = f"{100 * cfg.compare.confidence:g} %"
    n_test = results[seeds[0]]["at"]["test"]["n"]
    spread = ("± = binomial standard error (one seed)" if per_image else f"± = std over {len(seeds)} seeds")
    how = (f"per-image paired difference on the {n_test} test images, McNemar-style standard error, normal {conf} "
           f"interval" if per_image else f"paired t {conf} interval over {len(seeds)} seeds")
    lines = [f"# rift compare — {cfg.name} ({cfg.data.dataset}, {cfg.model.arch} width {cfg.model.width})", "",
             f"Test split ({n_test} images), accuracies in %; {spread}. alpha* per method by the paper's rule on the "
             f"{cfg.selection_split} split (best clean accuracy with robust accuracy at most "
             f"{100 * cfg.interpolation.tolerance:g} pp below AT's). Δ = method − reference in pp, [{conf} interval: "
             f"{how}]. Robust: PGD-{cfg.eval.attack.num_steps}, worst of {cfg.eval.restarts}. Corruption: "
             f"{info.get('corruption', 'none')}.", "",
             "| method | trains | alpha* | clean | robust | corruption | Δ clean vs AT | Δ robust vs AT | "
             "Δ corruption vs AT | Δ clean vs rift | Δ robust vs rift | Δ corruption vs rift | paper (clean / OOD / robust) |",
             "|" + "---|" * 13]
    paper = PAPER_ROWS.get((cfg.data.dataset, cfg.model.arch), {}) if _paper_width(cfg) else {}
    for row in table:
        m = row["method"]
        trains = ("-" if m == AT else "every parameter" if row["modules"] is None else ", ".join(row["modules"]))
        if m == "logit-mix":
            trains = "nothing (mixes AT and all-layers logits)"
        cells = [m, trains, ", ".join(f"{a:g}" for a in row["alpha"])]
        cells += [_acc_cell(row[k]) for k, _ in METRICS]
        cells += [_delta_cell(row.get(f"delta_{ref}_{k}")) for ref in (AT, "rift") for k, _ in METRICS]
        p = paper.get(m)
        cells.append(" / ".join(f"{x:.2f}" for x in p) if p else "-")
        lines.append("| " + " | ".join(cells) + " |")
    verdict, _ = noise_verdict(table)
    ses = [100 * row[k]["se"] for row in table for k, _ in METRICS if row.get(k)]
    lines += ["", f"**Noise.** {verdict} One test image is {100 / n_test:.2f} pp; the binomial standard error of "
              f"an accuracy here is {min(ses):.2f}-{max(ses):.2f} pp, and each difference's standard error is "
              f"printed with it (s.e.)."]
    lines += ["", "Pareto front (clean vs robust, validation split, all methods and alphas): "
              + "; ".join(f"seed {s}: " + ", ".join(f"{r['method']}@{r['alpha']:g}" for r in info["front"][s])
                          for s in seeds), "", "![pareto](pareto.png)", ""]
    if not paper:
        lines.append("The paper has no row for this configuration (its numbers are for full-width models on the full "
                     "data sets; see configs/cifar10_resnet18.yaml).")
    else:
        lines.append("Paper: Table 1 (AT, RiFT) and Table 3 (all layers), CIFAR-10 ResNet-18, mean of 3 seeds; "
                     "Table 4's top-k numbers are not on hand.")
    return "\n".join(lines) + "\n"


def _paper_width(cfg: RunConfig) -> bool:
    return (cfg.model.arch.startswith("resnet") and cfg.model.width == 64) or (
        cfg.model.arch.startswith("wrn") and cfg.model.widen_factor == 10)


def plot_pareto(path: Path, results: dict[int, dict], methods: list[str]) -> None:
    """``pareto.png``: clean vs robust accuracy on the validation split (mean over seeds), one curve per method
    over its alphas (alpha marked at the end, every seed's alpha* starred), AT as a black point, the Pareto front dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rift_dist.plotting import save_figure

    seeds = sorted(results)
    fig, ax = plt.subplots(figsize=(7.2, 5.4))
    pts_all = []
    at = [(100 * statistics.fmean(results[s]["at"]["val"][k] for s in seeds)) for k in ("clean", "robust")]
    for method in methods:
        sweep = results[seeds[0]]["methods"][method]["sweep"]
        xs = [100 * statistics.fmean(results[s]["methods"][method]["sweep"][i]["clean_accuracy"] for s in seeds)
              for i in range(len(sweep))]
        ys = [100 * statistics.fmean(results[s]["methods"][method]["sweep"][i]["robust_accuracy"] for s in seeds)
              for i in range(len(sweep))]
        line, = ax.plot(xs, ys, "o-", ms=3, lw=1.2, label=method)
        ax.annotate(f"α={sweep[-1]['alpha']:g}", (xs[-1], ys[-1]), fontsize=7, color=line.get_color(),
                    xytext=(3, 3), textcoords="offset points")
        for star in sorted({results[s]["methods"][method]["alpha"] for s in seeds}):  # each seed's alpha*
            i = [r["alpha"] for r in sweep].index(star)
            ax.plot([xs[i]], [ys[i]], "*", ms=12, color=line.get_color(), mec="k", mew=0.5)
        pts_all += list(zip(xs, ys))
    front = sorted(p for p, on in zip(pts_all, pareto_front(pts_all)) if on)
    if front:
        ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=0.8, alpha=0.6, label="Pareto front")
    ax.plot([at[0]], [at[1]], "ko", ms=8, label="AT model (α=0)")
    ax.set_xlabel("clean accuracy (%)", fontsize=10)
    ax.set_ylabel("robust accuracy (%, PGD)", fontsize=10)
    n = results[seeds[0]]["at"]["val"]["n"]
    ax.set_title(f"Clean vs robust on the validation split (n = {n}, mean of {len(seeds)} seed(s)); ★ = a seed's alpha*",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    save_figure(fig, ax, path)


# ------------------------------------------------------------------------------ the command


def plan_text(cfg: RunConfig) -> str:
    """What ``rift compare`` will do for ``cfg`` (``--dry-run``): seeds, methods and what each trains, the sweep,
    the evaluations and the outputs.  Builds the model on the CPU; reads no data."""
    from rift_dist.models import build_model, module_names

    model = build_model(cfg)
    names = module_names(model)
    n_params = sum(p.numel() for p in model.parameters())
    seeds = list(cfg.compare.seeds) or [cfg.seed]
    alphas = sorted(set(cfg.interpolation.alphas) | {0.0})
    trains = {"rift": "the lowest-MRC module" + (f" (finetune.modules: {', '.join(cfg.finetune.modules)})"
                                                 if cfg.finetune.modules else ""),
              "most-critical": "the highest-MRC module", "random-module": "one module drawn per seed",
              "all-layers": f"every parameter ({n_params:,})", "logit-mix": "nothing (all-layers model's logits)"}
    ft = {finetuned_method(m) for m in cfg.compare.methods}
    lines = [f"rift compare plan — {cfg.name}: {cfg.data.dataset}, {cfg.model.arch} ({len(names)} modules, "
             f"{n_params:,} parameters)",
             f"  seeds {seeds}: per seed one AT training ({cfg.train.epochs} epochs) and one MRC table, in "
             f"{cfg.run_dir}/seed-<s>/",
             f"  fine-tunings per seed: {len(ft)} ({cfg.finetune.epochs} epochs each), in seed-<s>/compare/<method>/"]
    for m in cfg.compare.methods:
        what = trains.get(m) or f"the {m[4:]} lowest-MRC modules"
        lines.append(f"    {m:14s} trains {what}")
    evals = len(cfg.compare.methods) * (len(alphas) - 1) + 1
    lines += [f"  sweep: alphas {', '.join(f'{a:g}' for a in alphas)} -> {evals} validation evaluations per seed "
              f"(clean, PGD-{cfg.eval.selection_attack_steps}, corruptions); alpha* by the 0.1-pp rule",
              f"  test: AT + one alpha* per method = {len(cfg.compare.methods) + 1} evaluations per seed "
              f"(clean, PGD-{cfg.eval.attack.num_steps} worst of {cfg.eval.restarts}, corruptions)",
              f"  statistics: {'per-image paired (McNemar-style s.e.)' if len(seeds) == 1 else 'paired t over seeds'}"
              f", {100 * cfg.compare.confidence:g} % intervals",
              f"  writes {cfg.run_dir}/compare/pareto.csv, summary.md, summary.json, pareto.png; MLflow experiment "
              f"'{cfg.tracking.experiment}': a parent run, a child per (method, seed)"]
    return "\n".join(lines)


def compare_seeds(cfg: RunConfig) -> list[int]:
    """The seeds of a comparison: ``compare.seeds``, or the run's ``seed`` when that list is empty."""
    return list(cfg.compare.seeds) or [cfg.seed]


def check_compare(cfg: RunConfig) -> None:
    """Every check ``rift compare`` makes before it writes anything (local run and submission alike).

    Raises:
        ConfigError / StageError: bad module names or inputs; CompareError: ``rift`` not among the methods.
    """
    from rift_dist.pipeline import check_module_names
    from rift_dist.preflight import check_inputs
    from rift_dist.stages import STAGES

    check_module_names(cfg)
    check_inputs(cfg, STAGES)
    if "rift" not in cfg.compare.methods:
        raise CompareError("compare.methods must include rift (every difference is reported against it)")


def run_compare(cfg: RunConfig, run_dir: str | Path | None = None, progress: bool = True,
                seeds: list[int] | None = None, summarize: bool = True) -> dict:
    """Run the comparison of ``cfg.compare`` in ``run_dir`` (default ``cfg.run_dir``) on this process's runtime.

    Validates first (module names, inputs, the run directory's lock), then runs every seed
    (:func:`run_seed`), then writes ``compare/`` and logs it to MLflow.  Re-running resumes: finished
    stages, fine-tunings and evaluated points are reused.

    Args:
        seeds: run only these seeds (default: :func:`compare_seeds`); with ``summarize=False`` exactly one,
            and the lock taken is that seed's folder ``seed-<s>/`` (a SLURM job per seed, side by side).
        summarize: write ``compare/`` and end the MLflow parent run (False: a seed job of a submission,
            whose last job summarises; the seeds' results stay on disk and are read back by it).

    Returns:
        {"rows": pareto rows, "table": method table, "verdict": str}; {"seeds": [...]} without ``summarize``.

    Raises:
        ConfigError / StageError / CompareError / RunDirLockedError: before anything is written where possible.
    """
    from rift_dist.pipeline import cap_num_workers, configure_torch
    from rift_dist.parallel.runtime import Runtime
    from rift_dist.run_lock import RunDirLock
    from rift_dist.stages.common import write_json
    from rift_dist.stages.evaluation import corruption_sets
    from rift_dist.tracking import Tracker

    run_dir = Path(run_dir or cfg.run_dir)
    cfg.run_dir = str(run_dir)
    check_compare(cfg)
    all_seeds = compare_seeds(cfg)
    seeds = list(seeds) if seeds else all_seeds
    if not set(seeds) <= set(all_seeds) or (not summarize and len(seeds) != 1):
        raise CompareError(f"seeds {seeds} are not one seed of compare.seeds {all_seeds}")
    note = cap_num_workers(cfg)
    configure_torch(cfg)
    runtime = Runtime(cfg)
    lock = RunDirLock(run_dir if summarize else run_dir / f"seed-{seeds[0]}")
    top = None
    status = "FAILED"
    try:
        if runtime.is_main:
            lock.acquire()
            lock.record_holder()
        runtime.barrier()
        top = Tracker(cfg, run_dir, active=runtime.is_main)
        top.parent.set_tags({"rift.kind": "compare", "rift.run_dir": str(run_dir.resolve())})
        top.parent.log_params({k: v for k, v in flatten(cfg).items() if k.startswith(("compare.", "data.", "model."))})
        log = (lambda m: print(m, flush=True)) if runtime.is_main else (lambda m: None)
        if note:
            log(note)
        results, test_sets, cinfo = {}, None, None
        for s in seeds:
            cfg_s = copy.deepcopy(cfg)
            cfg_s.seed = s
            seed_dir = run_dir / f"seed-{s}"
            cfg_s.run_dir = str(seed_dir)
            if test_sets is None:
                from rift_dist.pipeline import make_context

                probe = make_context(cfg_s, seed_dir, runtime, progress)
                probe.tracker.active = False
                test_sets, cinfo = corruption_sets(probe)
            results[s] = run_seed(top, cfg_s, seed_dir, runtime, progress, test_sets, log)
        if not summarize:
            status = "FINISHED"
            return {"seeds": seeds}
        rows = pareto_rows(results)
        table = method_table(results, list(cfg.compare.methods), cfg.compare.confidence)
        verdict, _ = noise_verdict(table)
        front = {s: [r for r in rows if r["seed"] == s and r["split"] == "val" and r["on_front"]] for s in seeds}
        info = {"corruption": (cinfo or {}).get("label", "none") + (
                f" on the test split; the validation split gets the same corruptions re-generated" if cinfo else ""),
                "front": front}
        out = run_dir / "compare"
        if runtime.is_main:
            out.mkdir(parents=True, exist_ok=True)
            write_pareto_csv(out / "pareto.csv", rows)
            plot_pareto(out / "pareto.png", results, list(cfg.compare.methods))
            atomic_write_text(out / "summary.md", summary_markdown(cfg, results, table, info))
            write_json(out / "summary.json", {"table": table, "verdict": verdict, "seeds": seeds})
            for name in ("pareto.csv", "summary.md", "summary.json", "pareto.png"):
                top.parent.log_artifact(out / name, "compare")
            print((out / "summary.md").read_text(), flush=True)
            print(f"rift compare: wrote {out}/pareto.csv, summary.md, pareto.png", flush=True)
        status = "FINISHED"
        return {"rows": rows, "table": table, "verdict": verdict}
    finally:
        try:
            if top is not None:
                top.finish(status, end_parent=summarize or status != "FINISHED")
        finally:
            if runtime.is_main:
                lock.release()
            runtime.close()


def compare_command(args, cfg: RunConfig) -> int:
    """``rift compare CONFIG [--run-dir] [--nproc] [--dry-run]``; returns the exit status (``--submit``:
    :func:`rift_dist.cluster.compare_jobs.submit_command`)."""
    if args.local or args.debug or args.profile or args.profile_overrides:
        raise CompareError("--profile, --profile-set, --local and --debug go with --submit")
    if args.dry_run:
        print(plan_text(cfg))
        return 0
    run_compare(cfg, cfg.run_dir, progress=not args.no_progress)
    return 0
