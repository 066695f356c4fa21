"""One seed of ``rift compare``: the AT model and its MRC table, every method's fine-tuning, sweep and test point."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from rift_dist.atomic import read_json
from rift_dist.compare.methods import AT, METRICS, CompareError, LogitMix, finetuned_method, method_modules
from rift_dist.compare.points import autoattack_point, evaluate_point, load_point, save_point, val_corruption_sets
from rift_dist.config import RunConfig
from rift_dist.layout import RunLayout, alpha_name


def _check_folder(folder: Path, signature: dict, is_main: bool) -> None:
    """Refuse a comparison folder made with another config (names the changed keys); record it otherwise."""
    from rift_dist.atomic import write_json

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


def run_seed(top, cfg: RunConfig, seed_dir: Path, runtime, progress: bool, test_sets, log, base: str = "",
             flat: bool = True) -> dict:
    """The whole comparison for one seed of one AT base: AT (trained, or imported when ``cfg.from_checkpoint``)
    + MRC, every method's fine-tuning, sweep and test point (with AutoAttack when ``compare.autoattack``).

    Args:
        cfg: the base's config (:func:`rift_dist.compare.bases.base_config`) with ``seed`` set.
        base: the base's name (MLflow tag ``rift.base``); flat: the one default base (children named and keyed
            as before bases existed: ``<method> seed=<s>``), else ``<method> base=<name> seed=<s>``.

    Returns {"at": {"val", "test"}, "methods": {method: {"modules", "sweep": [rows], "alpha", "test"}}}; a
    test point holds "autoattack" / "autoattack_n" when AutoAttack ran.
    """
    from rift_dist.data.loaders import get_dataset
    from rift_dist.models import build_model, module_names
    from rift_dist.pipeline import make_context, run_stages
    from rift_dist.stages import STAGES
    from rift_dist.stages import finetune
    from rift_dist.stages.context import StageContext, load_state, new_model
    from rift_dist.stages.done_markers import read_done, stage_signature
    from rift_dist.stages.evaluation import test_dataset
    from rift_dist.stages.interpolation import choose_alpha, interpolate_state_dicts, selection_attack
    from rift_dist.seeding import stream_seed
    from rift_dist.tracking import Tracker

    import numpy as np

    s = cfg.seed
    label = f"seed={s}" if flat else f"base={base} seed={s}"
    key = f"seed-{s}" if flat else f"base-{base}-seed-{s}"
    who = "" if flat else f"base {base} "  # in log lines and progress bars
    at_run = top.child(f"AT + MRC {label}", key=f"{key}-at", params={"seed": s, "base": base},
                       tags={"rift.method": AT, "rift.compare": "1", "rift.base": base})
    ctx = make_context(cfg, seed_dir, runtime, progress, parent_run_id=getattr(at_run, "run_id", None))
    try:
        run_stages(ctx, list(STAGES[: STAGES.index("mrc") + 1]))  # the AT model and its MRC table
    finally:
        ctx.tracker.finish("FINISHED", end_parent=False)
    mrc_rows = read_json(RunLayout(seed_dir).mrc_result)["rows"]
    names = module_names(build_model(cfg))
    at_path = RunLayout(seed_dir).model("train")
    theta_at = load_state(at_path, "the adversarially trained model")
    selection = get_dataset(cfg, "selection")
    val_sets = val_corruption_sets(cfg, selection)
    test = test_dataset(ctx)
    sel_attack, sel_seed = selection_attack(cfg), stream_seed(s, "interpolation-sweep")
    test_seed = stream_seed(s, "eval-pgd")
    alphas = sorted(set(cfg.interpolation.alphas) | {0.0})
    cmp_dir = seed_dir / "compare"
    rt = runtime
    n_aa = cfg.compare.autoattack_examples
    aa_set = test.subset(np.arange(n_aa)) if 0 < n_aa < len(test) else test  # AutoAttack's images (test split)

    def point(path: Path, make_model, split: str, desc: str) -> dict:
        cached = rt.broadcast_object(path.is_file() and path.with_suffix(".npz").is_file())
        p = load_point(path) if cached else None
        model, fresh = None, p is None
        if fresh:
            model = make_model()
            if split == "val":
                p = evaluate_point(ctx, model, selection, val_sets, sel_attack, cfg.eval.selection_restarts, sel_seed,
                                   desc)
            else:
                p = evaluate_point(ctx, model, test, test_sets, cfg.eval.attack, cfg.eval.restarts, test_seed, desc)
        with_aa = split == "test" and cfg.compare.autoattack and (p.get("autoattack") is None
                                                                  or p.get("autoattack_n") != len(aa_set))
        if with_aa:  # also when the point was evaluated before compare.autoattack was switched on (or on other
            # images: compare.autoattack_examples is not in the folder's signature; eval.autoattack_* are)
            p.update(autoattack_point(ctx, model if model is not None else make_model(), aa_set,
                                      path.stem, path.parent / "progress", desc))
        if fresh or with_aa:
            if rt.is_main:
                path.parent.mkdir(parents=True, exist_ok=True)
                save_point(path, p)
            rt.barrier()
        return p

    _check_folder(cmp_dir / AT, stage_signature(cfg, "evaluate"), rt.is_main)
    at_model = lambda: new_model(ctx, theta_at)  # noqa: E731
    at_val = point(cmp_dir / AT / "val.json", at_model, "val", f"{who}seed {s} AT val")
    at_test = point(cmp_dir / AT / "test.json", at_model, "test", f"{who}seed {s} AT test")
    log(f"[compare] {who}seed {s} AT: val clean {100 * at_val['clean']:.2f}% robust {100 * at_val['robust']:.2f}%")
    at_run.log_metrics(test_metrics("at", at_test))
    top.end(at_run)
    result = {"at": {"val": at_val, "test": at_test}, "methods": {}}
    ft_states: dict[str, dict] = {}
    for method in cfg.compare.methods:
        modules = method_modules(method, mrc_rows, names, list(cfg.mrc.exclude), s, list(cfg.finetune.modules))
        source = finetuned_method(method)
        folder = cmp_dir / source
        cfg_m = copy.deepcopy(cfg)
        cfg_m.finetune.modules = list(modules or [])
        run = top.child(f"{method} {label}", key=f"{key}-{method}",
                        params={"method": method, "seed": s, "base": base, "data.dataset": cfg.data.dataset,
                                "model.arch": cfg.model.arch, "model.width": cfg.model.width,
                                "model.widen_factor": cfg.model.widen_factor},
                        tags={"rift.method": method, "rift.compare": "1", "rift.base": base,
                              "rift.modules": ",".join(modules) if modules else finetune.ALL_PARAMETERS})
        if source not in ft_states:
            _check_folder(folder, stage_signature(cfg_m, "evaluate"), rt.is_main)
            tracker = Tracker(cfg_m, folder, active=rt.is_main, parent_run_id=getattr(run, "run_id", None))
            ctx_m = StageContext(cfg_m, folder, rt, tracker, ctx.precision, progress, extra={"at_model": str(at_path)})
            try:
                if read_done(ctx_m, "finetune") is None:
                    log(f"[compare] {who}seed {s} {source}: fine-tuning {', '.join(modules) if modules else 'every parameter'}")
                    finetune.run(ctx_m, modules, all_parameters=modules is None)
            finally:
                tracker.finish("FINISHED", end_parent=False)
            ft_states[source] = load_state(RunLayout(folder).finetuned_model(), f"the fine-tuned model of {source}")
        theta_ft = ft_states[source]
        mdir = cmp_dir / method
        if method == "logit-mix":
            at_net, ft_net = new_model(ctx, theta_at), new_model(ctx, theta_ft)
            make = lambda a: (lambda: LogitMix(at_net, ft_net, a))  # noqa: E731
        else:
            make = lambda a: (lambda: new_model(ctx, interpolate_state_dicts(theta_at, theta_ft, a)))  # noqa: E731
        rows = []
        for i, a in enumerate(alphas):
            p = at_val if a == 0.0 else point(mdir / "sweep" / alpha_name(a), make(a), "val",
                                              f"{who}seed {s} {method} alpha {a:g}")
            rows.append({"alpha": a, "clean_accuracy": p["clean"], "robust_accuracy": p["robust"],
                         "corruption_accuracy": p["corruption"], "n": p["n"]})
            run.log_metrics({"val.clean_accuracy": p["clean"], "val.robust_accuracy": p["robust"], "alpha": a}, step=i)
        best = choose_alpha(rows, at_val["robust"], cfg.interpolation.tolerance)
        alpha = best["alpha"]
        test_point = at_test if alpha == 0.0 else point(mdir / f"test-alpha-{alpha:.4f}.json", make(alpha), "test",
                                                        f"{who}seed {s} {method} test")
        aa = (f" AutoAttack {100 * test_point['autoattack']:.2f}%" if test_point.get("autoattack") is not None
              else "")
        log(f"[compare] {who}seed {s} {method}: alpha* {alpha:g}; test clean "
            f"{100 * test_point['clean']:.2f}% robust {100 * test_point['robust']:.2f}%{aa}"
            + (" (alpha* = 0: the AT model itself)" if alpha == 0 else ""))
        run.log_metrics({"alpha_star": alpha, **test_metrics("method", test_point), **test_metrics("at", at_test)})
        top.end(run)
        result["methods"][method] = {"modules": modules, "sweep": rows, "alpha": alpha, "test": test_point}
    return result



def test_metrics(prefix: str, point: dict) -> dict:
    """MLflow metrics ``<prefix>.clean_accuracy`` ... of a test point (``autoattack_accuracy`` when it ran)."""
    out = {f"{prefix}.{m}": point[k] for k, m in METRICS if point[k] is not None}
    if point.get("autoattack") is not None:
        out[f"{prefix}.autoattack_accuracy"] = point["autoattack"]
    return out
