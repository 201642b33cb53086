"""Bench: prefect.yaml against a real (local, temporary) Prefect server, and process workers running
scheduled runs of the tiny profile end to end, sharing stages through the DVC remote.

1. ``prefect server start`` on 127.0.0.1 (a fresh PREFECT_HOME in a temp dir, its own SQLite DB).
2. Work pools: ``amrg-process`` (process), ``amrg-gpu`` (docker, deploy/docker-gpu-job-template.json)
   and ``amrg-gpu-k8s`` (kubernetes, deploy/kubernetes-gpu-job-template.json): both GPU templates load.
3. ``prefect --no-prompt deploy`` of prefect.yaml's deployments from worker1's clone (``sweep`` too
   when flows/sweep.py exists). Checks: the nightly cron, parameters, the GPU job variables.
4. A cron schedule (every minute) is added to ``amrg-pipeline/nightly-process``; once the scheduler has
   made a run due, ``prefect worker start --pool amrg-process --run-once`` executes it: the flow pulls
   (empty remote), runs all stages, pushes with --run-cache. The schedule is then removed.
5. nightly-process is redeployed from worker2's clone and run once more: every stage is restored from
   the shared remote's run-cache (no stage runs).

    python bench/prefect_deploy.py [--workdir DIR] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _workspaces import ROOT, clone, env, make_origin, run  # noqa: E402

PREFECT = [sys.executable, "-m", "prefect"]
FLOW = "amrg-pipeline"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 300) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return time.perf_counter() - t0
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError("prefect server did not become healthy")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="amrg-prefect-"))
    tmp.mkdir(parents=True, exist_ok=True)
    log = tmp / "bench.log"
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    e = env(tmp, PREFECT_HOME=str(tmp / "prefect-home"), PREFECT_API_URL=api, CUDA_VISIBLE_DEVICES="",
            PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5",
            PREFECT_UI_ENABLED="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    os.environ.update({k: e[k] for k in ("PREFECT_HOME", "PREFECT_API_URL")})
    result: dict = {"api": "127.0.0.1 (temporary prefect server)"}
    server = subprocess.Popen(PREFECT + ["server", "start", "--host", "127.0.0.1", "--port", str(port)], cwd=tmp,
                              env=e, stdout=open(tmp / "server.log", "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        result["server_start_s"] = round(wait_healthy(api, server), 1)
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import (
            DeploymentFilter,
            DeploymentFilterId,
            FlowRunFilter,
            FlowRunFilterState,
            FlowRunFilterStateType,
            LogFilter,
            LogFilterFlowRunId,
        )
        from prefect.client.schemas.objects import StateType

        make_origin(tmp, True, e)
        w1 = clone(tmp, "worker1", e)
        w2 = clone(tmp, "worker2", e)
        run(PREFECT + ["work-pool", "create", "amrg-process", "--type", "process"], w1, e, log)
        run(PREFECT + ["work-pool", "create", "amrg-gpu", "--type", "docker", "--base-job-template",
                       ROOT / "deploy/docker-gpu-job-template.json"], w1, e, log)
        run(PREFECT + ["work-pool", "create", "amrg-gpu-k8s", "--type", "kubernetes", "--base-job-template",
                       ROOT / "deploy/kubernetes-gpu-job-template.json"], w1, e, log)
        names = ["nightly", "nightly-process"] + (["sweep"] if (w1 / "flows/sweep.py").exists() else [])
        t, out = run(PREFECT + ["--no-prompt", "deploy", *sum((["--name", n] for n in names), [])], w1, e, log)
        result["deploy_s"], result["deployed"] = round(t, 1), names

        with get_client(sync_client=True) as client:
            deps = {d.name: d for d in client.read_deployments()}
            nightly, proc = deps["nightly"], deps["nightly-process"]
            result["nightly"] = {
                "work_pool": nightly.work_pool_name,
                "schedules": [(s.schedule.cron, s.active) for s in nightly.schedules],
                "parameters": nightly.parameters,
                "gpu_request": nightly.job_variables.get("container_create_kwargs", {}).get("device_requests"),
                "pull_steps": nightly.pull_steps,
            }
            result["nightly_process"] = {"work_pool": proc.work_pool_name,
                                         "schedules": [(s.schedule.cron, s.active) for s in proc.schedules]}
            pools = {p.name: p.type for p in client.read_work_pools()}
            result["work_pools"] = pools

        def one_scheduled_run(ws: Path, via_cron: bool, label: str) -> dict:
            with get_client(sync_client=True) as client:
                dep = client.read_deployment_by_name(f"{FLOW}/nightly-process")
            if via_cron:
                run(PREFECT + ["deployment", "schedule", "create", f"{FLOW}/nightly-process", "--cron", "* * * * *"],
                    ws, e, log)
            else:
                run(PREFECT + ["deployment", "run", f"{FLOW}/nightly-process", "--param", "retry_delay_seconds=5"],
                    ws, e, log)
            t0 = time.perf_counter()
            due = None
            while time.perf_counter() - t0 < 180 and due is None:  # wait until the scheduler made a run due
                with get_client(sync_client=True) as client:
                    runs = client.read_flow_runs(
                        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
                        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                            type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))))
                now = time.time()
                due = next((r for r in sorted(runs, key=lambda r: r.expected_start_time)
                            if r.expected_start_time.timestamp() <= now + 5), None)
                if due is None:
                    time.sleep(2)
            if due is None:
                raise TimeoutError("no scheduled run became due")
            wait_s = time.perf_counter() - t0
            t_worker, wout = run(PREFECT + ["worker", "start", "--pool", "amrg-process", "--type", "process",
                                            "--run-once"], ws, e, log, timeout=1800)
            if via_cron:  # one scheduled run is what we want: drop the every-minute schedule again
                run(PREFECT + ["deployment", "schedule", "clear", f"{FLOW}/nightly-process", "-y"], ws, e, log,
                    check=False)
            with get_client(sync_client=True) as client:
                fr = client.read_flow_run(due.id)
                logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[due.id])),
                                        limit=200)
                task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [due.id]}))
            messages = [lg.message for lg in logs]
            ran_ = [m.split("'")[1] for m in messages if m.startswith("Running stage '")]
            cached = [m.split("'")[1] for m in messages if "is cached - skipping run" in m]
            return {"label": label, "flow_run": fr.name, "state": fr.state.type.value,
                    "auto_scheduled": fr.auto_scheduled, "scheduled_wait_s": round(wait_s, 1),
                    "worker_s": round(t_worker, 1), "stages_run": ran_, "stages_restored": cached,
                    "task_runs": sorted(tr.name for tr in task_runs),
                    "pushed": any("push --run-cache" in m for m in messages)}

        result["run1_worker1_cron"] = one_scheduled_run(w1, True, "worker1: cron-scheduled, computes")
        run(PREFECT + ["--no-prompt", "deploy", "--name", "nightly-process"], w2, e, log)
        result["run2_worker2"] = one_scheduled_run(w2, False, "worker2: restores from the shared remote")
    finally:
        os.killpg(server.pid, 15)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
        if not args.workdir:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result, indent=2, default=str))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    r1, r2 = result["run1_worker1_cron"], result["run2_worker2"]
    ok = (r1["state"] == r2["state"] == "COMPLETED" and r1["auto_scheduled"] and len(r1["stages_run"]) == 7
          and not r2["stages_run"] and len(r2["stages_restored"]) == 7)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
