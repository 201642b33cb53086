"""Prefect flow over the DVC pipeline: one task run per dvc.yaml stage, in topological order.

    python -m flows.pipeline [--repo PATH] [--stages a,b] [--retries N] [--force]
                             [--set key=value ...] [--params-overlay FILE] [--experiment NAME]
                             [--pull] [--push] [--wait]

Flow -> ``dvc repro --single-item <stage>`` -> ``python -m stages.<name>``; dvc.yaml is the only DAG.
On a worker that shares a DVC remote: ``--pull`` runs ``dvc pull --run-cache --allow-missing`` first and
``dvc repro --pull`` per stage (a stage computed anywhere else is restored, not recomputed); ``--push``
ends with ``dvc push --run-cache`` (also after a failed stage, so finished upstream stages are shared).
One flow run owns a workspace at a time (``--wait`` queues behind the current one instead of failing).
"""

from __future__ import annotations

import os

# the ephemeral API builds its SQLite DB on first start (~26 s on a busy 2-core box)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# no network here: the ephemeral server's telemetry heartbeat only fails (and races the fresh DB)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import posixpath  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import yaml  # noqa: E402

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_table_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from flows.dvc_tasks import (  # noqa: E402,F401  (stage_graph/stage_order re-exported)
    DvcStageError,
    TransientDvcError,
    WorkspaceBusy,
    apply_params_overlay,
    classify_failure,
    default_remote,
    is_transient_failure,
    load_dvc_yaml,
    load_stages,
    run_dvc,
    stage_graph,
    stage_order,
    workspace_lock,
)

METRICS_ARTIFACT_KEY = "eval-metrics"


class PipelineStageFailed(RuntimeError):
    """A stage failed (after retries); the stages after it were not run."""


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


SYNC_ARGS = {"pull": ["pull", "--run-cache", "--allow-missing"], "push": ["push", "--run-cache"]}


@task(name="dvc-sync", task_run_name="dvc-{command}", cache_policy=NO_CACHE, retry_condition_fn=is_transient_failure)
def dvc_sync(command: str, cwd: str) -> dict[str, Any]:
    """``dvc pull --run-cache --allow-missing`` or ``dvc push --run-cache`` against the default remote."""
    logger = get_run_logger()
    result = run_dvc(SYNC_ARGS[command], cwd=cwd, log=logger.info)
    if result.returncode != 0:
        raise classify_failure(f"dvc {command}", result)
    return {"command": command, "tail": result.lines[-3:]}


@task(name="dvc-exp-save", cache_policy=NO_CACHE)
def save_experiment(name: str, cwd: str) -> str:
    """``dvc exp save --name <name> --force``: the workspace (params overlay, dvc.lock, metrics) as a
    named experiment, listed by ``dvc exp show`` and shareable with ``dvc exp push``."""
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


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "c": [2]} -> {"a.b": 1, "c.0": 2}."""
    if isinstance(d, dict):
        items = d.items()
    elif isinstance(d, list):
        items = enumerate(d)
    else:
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in items:
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def metrics_files(dvc_yaml: Path, stage: str) -> list[Path]:
    """Metrics of ``stage``: its own ``metrics:``; else top-level ``metrics:`` lying under its outs;
    else (when ``stage`` is the DAG's last stage) every top-level ``metrics:`` entry."""
    spec = load_stages(dvc_yaml)[stage]
    top = [posixpath.normpath(str(next(iter(m))) if isinstance(m, dict) else str(m))
           for m in load_dvc_yaml(dvc_yaml).get("metrics") or []]
    paths = list(spec.metrics) or [m for m in top if any(m == o or m.startswith(o + "/") for o in spec.outs)]
    if not paths and stage_order(dvc_yaml)[-1] == stage:
        paths = top
    return [dvc_yaml.parent / p for p in paths]


def publish_metrics(dvc_yaml: Path, stage: str) -> dict[str, Any]:
    """Flatten the metrics files of ``stage`` into {"model.BLEU_4": ...} and publish a table artifact."""
    logger = get_run_logger()
    files = [f for f in metrics_files(dvc_yaml, stage) if f.is_file()]
    flat: dict[str, Any] = {}
    for f in files:
        rel = f.relative_to(dvc_yaml.parent).as_posix()
        data = flatten(json.loads(f.read_text(encoding="utf-8")))
        flat.update({(f"{rel}:{k}" if len(files) > 1 else k): v for k, v in data.items()})
    if not flat:
        logger.warning("no metrics found for stage %r", stage)
        return flat
    create_table_artifact(
        key=METRICS_ARTIFACT_KEY,
        table=[{"metric": k, "value": v} for k, v in flat.items()],
        description=f"Metrics after stage `{stage}`: " + ", ".join(f"`{f.relative_to(dvc_yaml.parent)}`" for f in files),
    )
    return flat


@flow(name="amrg-pipeline")
def pipeline(repo: str = ".", stages: list[str] | None = None, retries: int = 2,
             retry_delay_seconds: float = 10.0, force: bool = False,
             params_overlay: dict[str, Any] | str | None = None, experiment: str | None = None,
             pull: bool = False, push: bool = False, wait_for_workspace: bool = False) -> dict[str, Any]:
    """Reproduce dvc.yaml's stages one task run each, in order; return the flat final metrics.

    ``params_overlay``: ``{"hopfield.beta": 8}`` (dotted or nested keys) or a YAML file in the repo,
    merged into params.yaml and validated before anything runs. ``experiment``: save the finished
    workspace as that DVC experiment. ``pull``/``push``: share stages through the default DVC remote
    (run-cache included); skipped with a warning when no remote is configured.
    ``wait_for_workspace``: wait for a pipeline run already using this workspace instead of failing."""
    logger = get_run_logger()
    repo_dir = Path(repo).resolve()
    dvc_yaml = repo_dir / "dvc.yaml"
    order = select_stages(stage_order(dvc_yaml), stages)
    logger.info("stage order: %s", " -> ".join(order))
    with workspace_lock(repo_dir, wait=wait_for_workspace, owner=f"flow pid {os.getpid()}", log=logger.info):
        if params_overlay:
            changed = apply_params_overlay(repo_dir, params_overlay)
            logger.info("params overlay: %s", changed or "no change")
        remote = default_remote(repo_dir) if (pull or push) else None
        if (pull or push) and remote is None:
            logger.warning("no default DVC remote configured: skipping pull/push (`dvc remote add -d ...`)")
        sync = dvc_sync.with_options(retries=retries, retry_delay_seconds=retry_delay_seconds)
        if pull and remote:
            sync("pull", cwd=str(repo_dir))
        run = repro_stage.with_options(retries=retries, retry_delay_seconds=retry_delay_seconds)
        for i, name in enumerate(order):
            try:
                run(name, cwd=str(repo_dir), force=force, pull=bool(pull and remote))
            except Exception as exc:
                rest = ", ".join(order[i + 1:]) or "none"
                if push and remote:  # share what did finish: upstream stages stay cached for every worker
                    try:
                        sync("push", cwd=str(repo_dir))
                    except Exception as push_exc:  # the stage failure is the error to report
                        logger.error("push after the failure of %r failed too: %s", name, push_exc)
                raise PipelineStageFailed(f"stage {name!r} failed; not run: {rest}. {exc}") from exc
        if push and remote:
            sync("push", cwd=str(repo_dir))
        if experiment:
            save_experiment(experiment, cwd=str(repo_dir))
    return publish_metrics(dvc_yaml, order[-1]) if order else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=".", help="directory holding dvc.yaml (default: .)")
    parser.add_argument("--stages", default=None, help="comma-separated stages to run (default: all)")
    parser.add_argument("--retries", type=int, default=2, help="retries per stage for transient failures")
    parser.add_argument("--retry-delay", type=float, default=10.0, help="seconds between retries")
    parser.add_argument("--force", action="store_true", help="pass --force to dvc repro")
    parser.add_argument("--set", "-S", action="append", default=[], metavar="KEY=VALUE",
                        help="params overlay, like `dvc exp run -S` (repeatable; VALUE is YAML)")
    parser.add_argument("--params-overlay", default=None, metavar="FILE",
                        help="YAML file merged into params.yaml before the run")
    parser.add_argument("--experiment", default=None, help="save the finished run as this DVC experiment")
    parser.add_argument("--pull", action="store_true", help="dvc pull --run-cache first; dvc repro --pull")
    parser.add_argument("--push", action="store_true", help="dvc push --run-cache at the end")
    parser.add_argument("--wait", action="store_true", help="wait for another run using the workspace")
    args = parser.parse_args(argv)
    wanted = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    try:
        select_stages(stage_order(Path(args.repo) / "dvc.yaml"), wanted)
    except (ValueError, NotImplementedError, OSError) as exc:
        parser.error(str(exc))
    overlay: dict[str, Any] | str | None = args.params_overlay
    if args.set:
        if overlay:
            parser.error("use either --set or --params-overlay")
        bad = [kv for kv in args.set if "=" not in kv]
        if bad:
            parser.error(f"--set expects KEY=VALUE, got {bad}")
        overlay = {k.strip(): yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    try:
        metrics = pipeline(repo=args.repo, stages=wanted, retries=args.retries,
                           retry_delay_seconds=args.retry_delay, force=args.force, params_overlay=overlay,
                           experiment=args.experiment, pull=args.pull, push=args.push,
                           wait_for_workspace=args.wait)
    except (PipelineStageFailed, WorkspaceBusy, ValueError, FileNotFoundError) as exc:
        print(f"pipeline failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
