"""Prefect flow over the DVC pipeline: one task run per stage of DVC's graph, in topological order.

    python -m flows.pipeline [--repo PATH] [--stages a,b] [--retries N] [--force]
                             [--set key=value ...] [--params-overlay FILE] [--experiment NAME]
                             [--pull] [--push] [--wait]

Flow -> ``dvc repro --single-item <stage>`` -> ``python -m stages.<name>``. The stages and their order
are DVC's own (``dvc.repo.Repo(...).index.graph``, templated and foreach stages resolved by DVC), so
dvc.yaml is the only DAG. On a worker that shares a DVC remote: ``--pull`` runs
``dvc pull --run-cache --allow-missing`` first and ``dvc repro --pull`` per stage (a stage computed
anywhere else is restored, not recomputed); ``--push`` ends with ``dvc push --run-cache`` (also after a
failed stage, so finished upstream stages are shared). One flow run owns a workspace at a time
(``--wait`` queues behind the current one instead of failing).

A params overlay (``--set key=value``, ``--params-overlay FILE``) never touches the workspace: it is
validated against params.yaml, then run as one temporary DVC experiment
(``dvc exp run --temp --name NAME -S key=value ...``) in a copy that DVC makes under ``.dvc/tmp/exps``.
params.yaml, dvc.lock and the outputs stay as they were, even if the flow is killed; the results are
the experiment ``NAME`` (``dvc exp show``, ``dvc exp apply NAME``).
"""

from __future__ import annotations

import os

# the ephemeral API builds its SQLite DB on first start (~26 s on a busy 2-core box)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# no network here: the ephemeral server's telemetry heartbeat only fails (and races the fresh DB)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import yaml  # noqa: E402

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_table_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from flows.dvc_tasks import (  # noqa: E402,F401  (stage_graph/stage_order re-exported)
    DvcPipelineError,
    DvcStageError,
    TransientDvcError,
    WorkspaceBusy,
    classify_failure,
    default_remote,
    failed_stage,
    is_transient_failure,
    params_overlay as validated_overlay,
    read_metrics,
    remove_experiments,
    run_dvc,
    set_args,
    stage_graph,
    stage_order,
    workspace_lock,
)
from amrg.metrics.table import caption, headline_table, systems, to_markdown  # noqa: E402

METRICS_ARTIFACT_KEY = "eval-metrics"


class PipelineStageFailed(RuntimeError):
    """A stage failed (after retries); the stages after it were not run."""


class PipelineConfigError(ValueError):
    """The run cannot start: an unknown stage, a bad params overlay, a dvc.yaml DVC cannot load."""


@task(name="dvc-repro", task_run_name="dvc-repro-{stage}", cache_policy=NO_CACHE,
      retry_condition_fn=is_transient_failure)
def repro_stage(stage: str, cwd: str, force: bool = False, pull: bool = False) -> dict[str, Any]:
    """``dvc repro --single-item [--force] [--pull] <stage>``; raises TransientDvcError (retried) or
    DvcStageError. With ``pull`` DVC fetches the run-cache and the outputs of a cached run from the
    remote, so a stage already computed by another worker is restored instead of run."""
    logger = get_run_logger()
    args = ["repro", "--single-item", *(["--force"] if force else []), *(["--pull"] if pull else []), stage]
    result = run_dvc(args, cwd=cwd, log=logger.info)
    if result.returncode != 0:
        exc = classify_failure(stage, result)
        logger.error("stage %r failed (%s, exit %d)", stage, type(exc).__name__, result.returncode)
        raise exc
    return {"stage": stage, "skipped": result.skipped, "restored": result.restored}


@task(name="dvc-exp-run-temp", task_run_name="dvc-exp-run-temp-{name}", cache_policy=NO_CACHE,
      retry_condition_fn=is_transient_failure)
def run_temp_experiment(name: str, overlay: dict[str, Any], cwd: str, targets: list[str] | None = None,
                        force: bool = False) -> dict[str, Any]:
    """``dvc exp run --temp --name <name> -S key=value ... [targets]``: the stages run with the overlay in
    a temporary copy of the workspace (committed code plus uncommitted changes to tracked files); the
    workspace itself is never written. Unchanged stages come from the run-cache, so a retry reruns only
    what had not finished. A same-named experiment of this commit is replaced."""
    logger = get_run_logger()
    remove_experiments(cwd, [name], log=logger.info)
    args = ["exp", "run", "--temp", "--name", name, *(["--force"] if force else []), *set_args(overlay),
            *(targets or [])]
    result = run_dvc(args, cwd=cwd, log=logger.info)
    if result.returncode != 0:
        exc = classify_failure(failed_stage(result) or f"experiment {name}", result)
        logger.error("experiment %r failed in stage %r (%s, exit %d)", name, exc.stage, type(exc).__name__,
                     result.returncode)
        raise exc
    return {"experiment": name, "stages": result.outcomes}


SYNC_ARGS = {"pull": ["pull", "--run-cache", "--allow-missing"], "push": ["push", "--run-cache"],
             "fetch": ["fetch", "--run-cache"]}


@task(name="dvc-sync", task_run_name="dvc-{command}", cache_policy=NO_CACHE, retry_condition_fn=is_transient_failure)
def dvc_sync(command: str, cwd: str) -> dict[str, Any]:
    """``dvc pull --run-cache --allow-missing``, ``dvc fetch --run-cache`` (the cache only, for an overlay
    run: the workspace is not checked out) or ``dvc push --run-cache`` against the default remote."""
    logger = get_run_logger()
    result = run_dvc(SYNC_ARGS[command], cwd=cwd, log=logger.info)
    if result.returncode != 0:
        raise classify_failure(f"dvc {command}", result)
    return {"command": command, "tail": result.lines[-3:]}


@task(name="dvc-exp-save", cache_policy=NO_CACHE)
def save_experiment(name: str, cwd: str) -> str:
    """``dvc exp save --name <name> --force``: the workspace (dvc.lock, metrics) as a named experiment,
    listed by ``dvc exp show`` and shareable with ``dvc exp push``."""
    result = run_dvc(["exp", "save", "--name", name, "--force"], cwd=cwd, log=get_run_logger().info)
    if result.returncode != 0:
        raise classify_failure(f"exp save {name}", result)
    return name


def select_stages(order: list[str], wanted: list[str] | None) -> list[str]:
    """Restrict ``order`` to ``wanted`` (kept in topological order); unknown names raise ValueError."""
    if not wanted:
        return order
    unknown = [s for s in wanted if s not in order]
    if unknown:
        raise ValueError(f"unknown stage(s): {', '.join(unknown)}; valid stages: {', '.join(order)}")
    return [s for s in order if s in wanted]


def plan(repo: Path, stages: list[str] | None,
         overlay: dict[str, Any] | str | None) -> tuple[list[str], dict[str, Any]]:
    """The one validation of a run, before anything runs: (stages to run in DVC's order, the overlay's
    changed ``{"a.b": value}`` leaves checked with amrg.config.parse_params). PipelineConfigError otherwise."""
    try:
        return select_stages(stage_order(repo), stages), validated_overlay(repo, overlay)
    except (ValueError, OSError) as exc:  # ParamsError and DvcPipelineError are ValueErrors
        raise PipelineConfigError(str(exc)) from exc


def publish_metrics(repo: Path, stage: str, experiment: str | None = None) -> dict[str, Any]:
    """The headline table (model and baselines x headline metrics, 95% CIs) of the metrics DVC lists for
    ``stage`` (in the workspace, or in ``experiment``), published as the table artifact ``eval-metrics``."""
    logger = get_run_logger()
    files = read_metrics(repo, stage, experiment)
    path, data = next(((p, d) for p, d in files.items() if isinstance(d, dict) and systems(d)), (None, None))
    if path is None:
        logger.warning("no model metrics after stage %r (metrics files: %s)", stage, ", ".join(files) or "none")
        return {"metrics": None, "experiment": experiment, "caption": "", "table": []}
    rows, note = headline_table(data), caption(data)
    where = f"`{path}` after stage `{stage}`" + (f" of experiment `{experiment}`" if experiment else "")
    create_table_artifact(key=METRICS_ARTIFACT_KEY, table=rows, description=f"{where}" + (f": {note}" if note else ""))
    logger.info("%s%s\n%s", where, f" ({note})" if note else "", to_markdown(rows))
    return {"metrics": path, "experiment": experiment, "caption": note, "table": rows}


@flow(name="amrg-pipeline")
def pipeline(repo: str = ".", stages: list[str] | None = None, retries: int = 2,
             retry_delay_seconds: float = 10.0, force: bool = False,
             params_overlay: dict[str, Any] | str | None = None, experiment: str | None = None,
             pull: bool = False, push: bool = False, wait_for_workspace: bool = False) -> dict[str, Any]:
    """Reproduce DVC's stages one task run each, in order; return the headline metrics table.

    ``params_overlay``: ``{"hopfield.beta": 8}`` (dotted or nested keys) or a YAML file in the repo,
    validated against params.yaml before anything runs, then run as the temporary DVC experiment
    ``experiment`` (default ``overlay-<time>``): params.yaml, dvc.lock and the outputs in the workspace
    are not modified. ``experiment`` without an overlay: save the finished workspace as that DVC
    experiment. ``pull``/``push``: share stages through the default DVC remote (run-cache included);
    skipped with a warning when no remote is configured. ``wait_for_workspace``: wait for a pipeline run
    already using this workspace instead of failing."""
    logger = get_run_logger()
    repo_dir = Path(repo).resolve()
    order, overlay = plan(repo_dir, stages, params_overlay)
    logger.info("stage order: %s", " -> ".join(order))
    if params_overlay and not overlay:
        logger.info("params overlay: no change to params.yaml; running in the workspace")
    exp_name = (experiment or time.strftime("overlay-%Y%m%d-%H%M%S")) if overlay else None
    with workspace_lock(repo_dir, wait=wait_for_workspace, owner=f"flow pid {os.getpid()}", log=logger.info):
        remote = default_remote(repo_dir) if (pull or push) else None
        if (pull or push) and remote is None:
            logger.warning("no default DVC remote configured: skipping pull/push (`dvc remote add -d ...`)")
        sync = dvc_sync.with_options(retries=retries, retry_delay_seconds=retry_delay_seconds)
        if pull and remote:
            sync("fetch" if overlay else "pull", cwd=str(repo_dir))

        def failed(exc: Exception, stage: str) -> PipelineStageFailed:
            rest = ", ".join(order[order.index(stage) + 1:] if stage in order else order) or "none"
            if push and remote:  # share what did finish: upstream stages stay cached for every worker
                try:
                    sync("push", cwd=str(repo_dir))
                except Exception as push_exc:  # the stage failure is the error to report
                    logger.error("push after the failure of %r failed too: %s", stage, push_exc)
            return PipelineStageFailed(f"stage {stage!r} failed; not run: {rest}. {exc}")

        if overlay:
            logger.info("params overlay %s: runs as the temporary DVC experiment %r (params.yaml is not modified)",
                        overlay, exp_name)
            run_exp = run_temp_experiment.with_options(retries=retries, retry_delay_seconds=retry_delay_seconds)
            try:
                run_exp(exp_name, overlay, cwd=str(repo_dir), targets=order if stages else None, force=force)
            except Exception as exc:
                raise failed(exc, getattr(exc, "stage", "?")) from exc
        else:
            run = repro_stage.with_options(retries=retries, retry_delay_seconds=retry_delay_seconds)
            for name in order:
                try:
                    run(name, cwd=str(repo_dir), force=force, pull=bool(pull and remote))
                except Exception as exc:
                    raise failed(exc, name) from exc
        if push and remote:
            sync("push", cwd=str(repo_dir))
        if experiment and not overlay:
            save_experiment(experiment, cwd=str(repo_dir))
    result = publish_metrics(repo_dir, order[-1], exp_name) if order else {"metrics": None, "caption": "", "table": []}
    return {**result, "experiment": exp_name or experiment}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=".", help="directory holding dvc.yaml (default: .)")
    parser.add_argument("--stages", default=None, help="comma-separated stages to run (default: all)")
    parser.add_argument("--retries", type=int, default=2, help="retries per stage for transient failures")
    parser.add_argument("--retry-delay", type=float, default=10.0, help="seconds between retries")
    parser.add_argument("--force", action="store_true", help="pass --force to dvc repro")
    parser.add_argument("--set", "-S", action="append", default=[], metavar="KEY=VALUE",
                        help="params overlay, like `dvc exp run -S` (repeatable; VALUE is YAML); runs as a "
                             "temporary DVC experiment, params.yaml is not modified")
    parser.add_argument("--params-overlay", default=None, metavar="FILE",
                        help="YAML file of params to override (e.g. configs/tiny.yaml); like --set")
    parser.add_argument("--experiment", default=None,
                        help="the DVC experiment name of the run (with an overlay: of the temporary experiment)")
    parser.add_argument("--pull", action="store_true", help="dvc pull --run-cache first; dvc repro --pull")
    parser.add_argument("--push", action="store_true", help="dvc push --run-cache at the end")
    parser.add_argument("--wait", action="store_true", help="wait for another run using the workspace")
    args = parser.parse_args(argv)
    wanted = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    overlay: dict[str, Any] | str | None = args.params_overlay
    if args.set:  # command-line syntax only; what the values mean is checked once, by the flow (plan)
        if overlay:
            parser.error("use either --set or --params-overlay")
        bad = [kv for kv in args.set if "=" not in kv]
        if bad:
            parser.error(f"--set expects KEY=VALUE, got {bad}")
        overlay = {k.strip(): yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    try:
        result = pipeline(repo=args.repo, stages=wanted, retries=args.retries,
                          retry_delay_seconds=args.retry_delay, force=args.force, params_overlay=overlay,
                          experiment=args.experiment, pull=args.pull, push=args.push,
                          wait_for_workspace=args.wait)
    except PipelineConfigError as exc:
        parser.error(str(exc))
    except (PipelineStageFailed, WorkspaceBusy) as exc:
        print(f"pipeline failed: {exc}", file=sys.stderr)
        return 1
    if result["experiment"]:
        print(f"experiment {result['experiment']} (`dvc exp show`, `dvc exp apply {result['experiment']}`)")
    if result["table"]:
        print(f"{result['metrics']}" + (f": {result['caption']}" if result["caption"] else ""))
        print(to_markdown(result["table"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
