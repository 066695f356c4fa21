"""Run the RiFT stage graph on a cluster: SLURM jobs and job arrays through submitit, every run in MLflow.

``rift submit CONFIG --profile launch/<cluster>.yaml`` turns one config into jobs:

=====================  ==========================  =========================================================
job                    what                        shape
=====================  ==========================  =========================================================
``train``              adversarial training        one job, ``nodes`` x ``tasks_per_node`` ranks (DDP/DeepSpeed)
``mrc-prepare``        the fixed adversarial set   one job (sharded PGD over its ranks); skipped when it exists
``mrc``                MRC of the modules          job ARRAY: task i = the i-th balanced group of modules
                                                   (``assign_modules`` with the array size); or, with
                                                   ``stages.mrc.mode: job``, one multi-rank job
``mrc-gather``         ``mrc.csv``, the choice     one small job (no GPU): reads the per-module files
``finetune``           fine-tuning                 one job; with ``stages.finetune.candidates: k`` > 1 an
                                                   ARRAY: task j fine-tunes the j-th lowest-MRC module alone
``interpolate``        the alpha sweep             job ARRAY over alpha (x candidate); or one job
``interpolate-gather`` alpha* (and the candidate)  one small job
``evaluate``           final evaluation            one job, sharded over its ranks
=====================  ==========================  =========================================================

How stages chain: by SLURM dependencies.  Every job is submitted at once with
``--dependency=afterok:<the job before it>`` (an array counts as one job: all its
tasks must succeed) and ``--kill-on-invalid-dep=yes``, so when a job fails the
jobs after it are cancelled by SLURM instead of waiting forever.  No driver job
holds an allocation while others run.  ``--local`` (submitit's local executor:
subprocesses on this machine) and ``--debug`` (submitit's debug executor: in this
process) run the same jobs in the same order, and this process waits for each
before starting the next.

How arrays split: the MRC array gets ``stages.mrc.array_size`` tasks (default:
one per module); the modules, in network order, are cut into that many
contiguous groups of balanced estimated cost (the MRC stage's own
``assign_modules``: contiguity keeps the modules of one residual block in one
task, which then shares one activation cache).  The interpolation array gets
``stages.interpolate.array_size`` tasks (default: one per alpha, per candidate)
over contiguous runs of alphas.  Each task writes the stage's own per-module /
per-alpha result files, so a gather job finishes the stage exactly as ``rift
run`` would (same numbers; see the stage table, :mod:`rift_dist.stages`).

Fine-tuning candidates: with ``stages.finetune.candidates: k`` the MRC gather
records the k lowest-MRC modules (after ``mrc.exclude``), an array fine-tunes
each alone in ``finetune/candidates/<module>/``, the interpolation array sweeps
alpha for each, and the interpolation gather applies the paper's alpha rule over
every (candidate, alpha) pair on the validation split: the best clean accuracy
whose robust accuracy is at most ``interpolation.tolerance`` below the AT model's.
The chosen candidate becomes the run's fine-tuned model; all are listed in
``interpolate/candidates.json``.  k = 1 (the default) is exactly ``rift run``.

Preemption and time limits: every job runs :class:`StageJob`, a
``submitit.helpers.Checkpointable``.  SLURM sends USR2 ``signal_delay_s`` before
the time limit or on preemption; submitit calls :meth:`StageJob.checkpoint` on
global rank 0 only, which saves nothing itself: every rank already saves its
resumable state on the stage's schedule (``train.checkpoint_every`` steps, each
fine-tuning epoch, each MRC module, each alpha).  It returns a
``DelayedSubmission`` of the same task, the job is requeued (same job id), and on
restart every rank resumes from the newest checkpoint on disk — never from state
in the pickle — so all ranks restart at the same step and the result equals an
uninterrupted run's.  Each start and checkpoint is appended to
``<run_dir>/jobs/events.jsonl`` with the step on disk (a start also with rank 0's device, the GPUs
SLURM made visible and the NCCL_* variables the job runs with).

GPU jobs: ``gpus_per_node: N`` asks for N GPUs per node (``--gpus-per-node=N``, or ``--gres=gpu:N``
with ``gpu_request: gres``) and runs N ranks per node (``--ntasks-per-node=N``); each rank uses
``cuda:LOCAL_RANK`` (LOCAL_RANK = SLURM_LOCALID).  A profile's ``env:`` (NCCL_SOCKET_IFNAME, ...) is
exported at the top of every script.  Jobs without GPUs (the gathers) go to the profile's
``cpu_partition`` and inherit no GPU-only option.  Every script starts with a comment header saying
what it runs (:func:`script_header`); the job names are ``rift-<job>``.

MLflow: ``rift submit`` creates the pipeline's parent run (params = the config)
and, ahead of time (status SCHEDULED), one child run per stage and per array
task (MRC task, fine-tuning candidate, alpha), remembered in
``<run_dir>/mlflow/<key>.json``; the jobs only continue those runs, so a requeued
task continues its own run and no job needs the store to be up to start.  Only
global rank 0 logs.  The last job of a submission marks the parent FINISHED; a
failed job marks it FAILED (a re-submission sets it RUNNING again).  Use a
tracking server (``tracking.uri: http://host:5000`` or ``MLFLOW_TRACKING_URI``)
when the run directory is on a shared filesystem: SQLite's file locks are not
reliable over NFS/Lustre.  See :mod:`rift_dist.tracking` for buffering when the
server is down.

The run directory keeps the submission: ``submission.json`` (job ids per job,
array task -> modules / alphas / candidate, dependencies, resources, state of
local runs), ``config.yaml``, ``jobs/<job>/`` (submitit's pickles and logs).
``rift status RUN`` shows every job and task with its state and names failed
tasks with the command that re-submits them; ``rift cancel RUN`` cancels them;
``rift submit RUN`` (a run directory instead of a config) re-submits what is not
done — only the failed array tasks, and the jobs after them — and ``--only
JOB:NAME`` re-submits one task alone.

The package, split the way submitit splits its core from its backends:

=======================  ======================================================================
``profile.py``           launch profiles: Resources, Profile, load_profile and their checks; ClusterError
``plan.py``              the job plan from the stage table (plan_jobs), cluster limits, split_arrays, check_plan
``job.py``               what every job runs: StageJob (requeue), run_task, launcher environment, rendezvous ports
``submission.py``        rift submit: submitit executors, sbatch scripts and their headers, MLflow runs, rollback
``monitor.py``           rift status / cancel, waiting, submission.json, job and stage states
``cli.py``               the submit / status / cancel / report subcommands
=======================  ======================================================================

This module re-exports the names scripts use (and ``StageJob``, which the pickles of jobs submitted
before the split name as ``rift_dist.cluster.StageJob``).
"""

from rift_dist.cluster.cli import add_arguments, main
from rift_dist.cluster.job import StageJob, read_events, run_task
from rift_dist.cluster.monitor import cancel, job_states, local_status, read_submission, status, wait
from rift_dist.cluster.plan import ClusterLimits, JobPlan, TaskPlan, check_plan, plan_jobs, query_cluster_limits, split_arrays
from rift_dist.cluster.profile import PROFILE_STAGES, ClusterError, Profile, Resources, load_profile, profile_from_dict
from rift_dist.cluster.submission import submit

__all__ = ["PROFILE_STAGES", "ClusterError", "ClusterLimits", "JobPlan", "Profile", "Resources", "StageJob", "TaskPlan",
           "add_arguments", "cancel", "check_plan", "job_states", "load_profile", "local_status", "main", "plan_jobs",
           "profile_from_dict", "query_cluster_limits", "read_events", "read_submission", "run_task", "split_arrays",
           "status", "submit", "wait"]
