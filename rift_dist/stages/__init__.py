"""The stage table: the RiFT stage graph, declared once (RiFT §3, Alg. 1; RIFT.md "Stages").

train -> mrc -> finetune -> interpolate -> evaluate.  Each :class:`Stage` entry says everything the
rest of the package needs to know about a stage:

* ``external``: config keys naming inputs outside the run directory it reads (checked by
  :mod:`rift_dist.preflight` before anything is written).
* ``name``: its one name on the command line (``rift mrc``), as the folder of its artefacts
  (``<run_dir>/mrc/``) and in ``rift submit --stages``; ``run_name``: the MLflow child run it logs into
  (kept distinct where existing runs' MLflow trees use another name: ``adversarial_training``,
  ``interpolation``, ``evaluation``; resumed runs continue them).
* ``run``: its ``run(ctx) -> outputs`` function; ``needs``: the stages whose artefacts it reads;
  ``reads`` / ``writes``: those artefacts, relative to the run directory
  (paths of :class:`rift_dist.layout.RunLayout`; ``tests/unit/test_layout.py`` checks each one).
* ``keys``: the config keys its result depends on (a key ending in ``.`` is a whole section);
  ``keys_when``: keys it depends on only under a setting (``(key, value, keys)``: with ``selection_split:
  test`` training selects its epoch on the test split, so ``data.test_subset`` matters; with ``val`` it
  is never read).  The
  done marker of a stage records the values of its own keys and those of every stage before it, so
  a changed setting redoes that stage and the ones after it; keys that change only speed or
  bookkeeping (workers, loader, caches, threads, tracking, the engine) are left out on purpose, so a
  run may resume on another machine.  The keys are checked, not trusted:
  ``tests/integration/test_stage_keys.py`` runs every stage on a config that records each field read
  and fails on a read field that is neither declared here nor a speed / bookkeeping setting;
  ``tests/unit/test_stage_contract.py`` checks which changed settings make which stages stale.
* ``shards``: how ``rift submit`` splits the stage into SLURM jobs and job arrays (prepare / tasks /
  compute / gather; see :class:`Shards`); None = always one job running ``run`` on all its ranks.

Functions are named ``"module:function"`` and imported when used (:func:`resolve`), as engine
plugins are: this module imports nothing from the package, so every module may read the table
without an import circle.  The pipeline (:mod:`rift_dist.pipeline`), the cluster planner
(:mod:`rift_dist.cluster.plan`), the job runtime, the done markers (:mod:`rift_dist.stages.done_markers`)
and the CLI read this table; nothing else lists stages (``tests/unit/test_stage_table.py``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from rift_dist.errors import RiftError


class StageError(RiftError, RuntimeError):
    """A stage cannot run: a missing input artefact, a stale artefact, or a bad module name."""


@dataclass(frozen=True)
class Part:
    """One job of a stage run as several jobs (SLURM), and the function its tasks run.

    Attributes:
        job: the job's name (``rift status``, ``--only JOB:NAME``, ``jobs/<job>/``, sbatch ``rift-<job>``).
        part: the name recorded in ``submission.json`` (how a re-submission or ``rift status`` finds
            this entry again; never renamed).
        resources: the profile's ``stages:`` key whose resources the job gets (``gather`` = the small
            file-reading jobs).
        run: ``"module:function"``, called as ``function(ctx, args, run) -> dict`` on every rank of the
            task (``args``: the task's JSON arguments; ``run``: its MLflow run handle).
        what: what the job does, for the comment header of its sbatch script.
        done: ``"module:function"``, ``function(run_dir, args) -> bool``: whether the task's work is on
            disk (for ``rift status``); empty = the stage's done marker.
        own_run: the task's MLflow run is its own (the job ends it); else the stage code ends it.
        run_key / run_name: the MLflow run of a one-task job (prepare / gather), created ahead of time;
            empty = the stage's run.
        progress: ``"module:function"``, ``function(run_dir, args) -> dict``: where a requeued task
            resumes (logged at each start and requeue); empty = nothing to say.
    """

    job: str
    part: str
    resources: str
    run: str
    what: str
    done: str = ""
    own_run: bool = False
    run_key: str = ""
    run_name: str = ""
    progress: str = ""


@dataclass(frozen=True)
class Shards:
    """How ``rift submit`` splits a stage: ``prepare`` (one job), an array of ``compute`` tasks, ``gather``.

    Attributes:
        options: the stage's own options in a launch profile (``stages.<name>.<option>``):
            {option: (type, default)}.
        sharded: ``"module:function"``, ``function(cfg, options, candidates) -> bool``: whether the
            stage runs as this array (False: one job running the stage's ``run``).  ``options``: the
            stage's profile options; ``candidates``: the profile's fine-tuning candidates (k).
        tasks: ``"module:function"``, ``function(cfg, run_dir, options, candidates, wanted) ->
            (tasks, gather_args)``: the array's tasks not yet done (``wanted``: the names ``--only``
            gives this job, [] = the whole job, None = no ``--only``); each task a dict with index,
            label, names, args and optionally run_key, run_name, child_runs ([{key, params}] created
            ahead of time) and what (its line in the sbatch script's array map).  ``gather_args``: the
            gather job's arguments.
        prepare / compute / gather: the jobs (``compute`` is the array).
        prepare_done: ``"module:function"``, ``function(run_dir) -> bool``: whether the prepare job's
            output exists (it is then not planned, unless ``--only`` names it).
        check: ``"module:function"``, ``function(cfg, options, selected, profile_name) -> str``: why the
            profile's options cannot work with this config ("" = they can); ``selected``: the stage is planned.
    """

    options: dict
    sharded: str
    tasks: str
    compute: Part
    prepare: Part | None = None
    prepare_done: str = ""
    gather: Part | None = None
    check: str = ""

    def parts(self) -> tuple[Part, ...]:
        """The jobs in the order they run."""
        return tuple(p for p in (self.prepare, self.compute, self.gather) if p is not None)


@dataclass(frozen=True)
class Stage:
    """One stage of the graph (see the module docstring for each field)."""

    name: str
    run_name: str
    run: str
    needs: tuple[str, ...]
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    keys: tuple[str, ...]
    keys_when: tuple[tuple[str, Any, tuple[str, ...]], ...] = ()
    """``(key, value, keys)``: ``keys`` count among the stage's keys when config ``key`` equals ``value``."""
    external: tuple[str, ...] = ()
    """Config keys naming inputs outside the run directory that the stage reads (checked before a run)."""
    checkpoints: bool = False
    """Whether the stage saves resumable checkpoints in ``<stage>/checkpoints/`` (``rift status`` reads them)."""
    optional_needs: str = ""
    """``"module:function"``, ``function(cfg, candidates) -> tuple``: needs the config makes unnecessary."""
    results: str = ""
    """``"module:function"``, ``function(run_dir) -> str``: partial results on disk ("3 module(s) measured")."""
    shards: Shards | None = None

    def keys_for(self, flat: dict[str, Any]) -> tuple[str, ...]:
        """The keys of this stage under the flattened config ``flat`` (``keys`` and the ``keys_when`` that apply)."""
        return self.keys + tuple(k for key, value, keys in self.keys_when if flat.get(key) == value for k in keys)


_MRC = "rift_dist.stages.criticality_array"
_FT = "rift_dist.stages.finetune"
_INT = "rift_dist.stages.interpolation"

STAGE_TABLE: tuple[Stage, ...] = (
    Stage(
        name="train", run_name="adversarial_training",
        run="rift_dist.stages.adversarial_training:run_or_import",
        needs=(), reads=(), writes=("train/model.pt", "train/history.json", "train/checkpoints/"),
        # training picks its best epoch with eval.attack (and the selection split); autocast and sync BN
        # change the trained weights, gradient accumulation the optimiser's steps
        keys=("seed", "selection_split", "from_checkpoint", "data.dataset", "data.train_subset", "data.val_size",
              "data.split_seed", "data.batch_size", "data.order", "model.", "train.", "eval.attack.",
              "precision.autocast", "distributed.sync_bn", "distributed.gradient_accumulation_steps"),
        # the selection split is the test split only with selection_split: test (else the test split is not read)
        keys_when=(("selection_split", "test", ("data.test_subset",)),),
        external=("from_checkpoint",), checkpoints=True,
    ),
    Stage(
        name="mrc", run_name="mrc", run="rift_dist.stages.criticality:run",
        needs=("train",), reads=("train/model.pt",),
        writes=("mrc.csv", "mrc/mrc.json", "mrc/mrc.png", "mrc/adversarial_set.pt", "mrc/modules/"),
        keys=("mrc.",), results=f"{_MRC}:results_on_disk",
        shards=Shards(
            options={"mode": (str, "array"), "array_size": (int, 0)},
            sharded=f"{_MRC}:runs_as_array", tasks=f"{_MRC}:array_tasks",
            prepare=Part("mrc-prepare", "mrc_prepare", "mrc_prepare", f"{_MRC}:prepare_task",
                         "the fixed adversarial set of the MRC search", done=f"{_MRC}:prepare_task_done",
                         own_run=True, run_key="mrc.prepare", run_name="mrc-prepare"),
            prepare_done=f"{_MRC}:adversarial_set_exists",
            compute=Part("mrc", "mrc_modules", "mrc", f"{_MRC}:compute_task",
                         "MRC of a group of modules per array task", done=f"{_MRC}:compute_task_done",
                         own_run=True, progress=f"{_MRC}:compute_task_progress"),
            gather=Part("mrc-gather", "mrc_gather", "gather", f"{_MRC}:gather_task",
                        "mrc.csv and the module choice from the per-module results (reads files, no GPU work)"),
        ),
    ),
    Stage(
        name="finetune", run_name="finetune", run=f"{_FT}:run",
        needs=("train", "mrc"), optional_needs=f"{_FT}:needs_not_needed",
        reads=("train/model.pt", "mrc/mrc.json"),
        writes=("finetune/model.pt", "finetune/history.json", "finetune/checkpoints/", "finetune/candidates/"),
        keys=("finetune.", "mrc.top_k", "mrc.exclude"), checkpoints=True,
        shards=Shards(
            options={"candidates": (int, 1)},
            sharded=f"{_FT}:runs_as_array", tasks=f"{_FT}:array_tasks", check=f"{_FT}:check_candidates",
            compute=Part("finetune", "finetune_candidate", "finetune", f"{_FT}:candidate_task",
                         "fine-tuning of one candidate module per array task", done=f"{_FT}:candidate_task_done"),
        ),
    ),
    Stage(
        name="interpolate", run_name="interpolation", run=f"{_INT}:run",
        needs=("train", "finetune"), reads=("train/model.pt", "finetune/model.pt"),
        writes=("interpolation.csv", "interpolate/model.pt", "interpolate/alpha.json", "interpolate/interpolation.png",
                "interpolate/alphas/"),
        keys=("interpolation.", "eval.attack.", "eval.selection_attack_steps", "eval.selection_restarts",
              "data.test_subset"),
        results=f"{_INT}:results_on_disk",
        shards=Shards(
            options={"mode": (str, "array"), "array_size": (int, 0)},
            sharded=f"{_INT}:runs_as_array", tasks=f"{_INT}:array_tasks",
            compute=Part("interpolate", "interpolate_alphas", "interpolate", f"{_INT}:alphas_task",
                         "the interpolation sweep, a run of alphas per array task", done=f"{_INT}:alphas_task_done"),
            gather=Part("interpolate-gather", "interpolate_gather", "gather", f"{_INT}:gather_task",
                        "alpha* (and the candidate) from the per-alpha results (reads files, no GPU work)"),
        ),
    ),
    Stage(
        name="evaluate", run_name="evaluation", run="rift_dist.stages.evaluation:run",
        needs=("train", "finetune", "interpolate"),
        reads=("train/model.pt", "finetune/model.pt", "interpolate/model.pt", "interpolate/alpha.json"),
        writes=("summary.json", "summary.md", "evaluate/"),
        keys=("eval.", "data.test_subset", "data.corruption", "data.severities"),
        external=("data.corruption_root",),
    ),
)
"""Every stage, in the order they run."""

STAGES: tuple[str, ...] = tuple(s.name for s in STAGE_TABLE)
"""The stage names in order (``train``, ``mrc``, ``finetune``, ``interpolate``, ``evaluate``)."""

_BY_NAME = {s.name: s for s in STAGE_TABLE}


def stage(name: str) -> Stage:
    """The table entry of stage ``name``.

    Raises:
        StageError: for an unknown name (lists the valid ones).
    """
    try:
        return _BY_NAME[name]
    except KeyError:
        raise StageError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}") from None


def stage_of_run_name(run_name: str) -> Stage | None:
    """The stage whose MLflow child run is called ``run_name`` (None when none is)."""
    return next((s for s in STAGE_TABLE if s.run_name == run_name), None)


def parts() -> dict[str, tuple[Stage, Part]]:
    """{part name: (stage, part)} of every stage's SLURM jobs (see :class:`Shards`)."""
    return {p.part: (s, p) for s in STAGE_TABLE if s.shards for p in s.shards.parts()}


def resolve(ref: str) -> Callable[..., Any]:
    """The function a ``"module:function"`` reference of the table names (imported on first use)."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


__all__ = ["Part", "STAGES", "STAGE_TABLE", "Shards", "Stage", "StageError", "parts", "resolve", "stage",
           "stage_of_run_name"]
