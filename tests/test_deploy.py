"""A real Prefect server on loopback, the pipeline served as a cron deployment, one run triggered to completion."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(check, timeout: float, what: str, proc: subprocess.Popen, log: Path):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            pytest.fail(f"{what}: process exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            result = check()
            if result:
                return result
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(1)
    pytest.fail(f"{what}: not ready after {timeout}s: {log.read_text()[-2000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """Stop a process this test started, and its children (it leads its own process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_served_deployment_runs_on_a_loopback_server(tiny_task, raw_params, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    raw_params["tasks"] = {"tiny": {"source": "topic", "template": "{text} =", "verbalizer": {"neg": " no", "pos": " yes"}, "scoring": "auto"}}
    root = tiny_task()
    (root / "params.yaml").write_text(yaml.safe_dump(raw_params))
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           "PATH": f"{BIN}:{os.environ['PATH']}"}
    procs = []
    try:
        server_log = tmp_path / "server.log"
        server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                  env=env, stdout=server_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(server)
        _wait(lambda: urllib.request.urlopen(f"{api}/health", timeout=2).status == 200, 120, "server", server, server_log)

        serve_log = tmp_path / "serve.log"
        serve = subprocess.Popen([sys.executable, "flows/pipeline.py", "serve", "--root", str(root), "--stages", "validate",
                                  "--name", "nightly-test", "--cron", "0 2 * * *"], cwd=ROOT, env=env,
                                 stdout=serve_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(serve)

        with temporary_settings(updates={PREFECT_API_URL: api}):
            async def deployment():
                async with get_client() as client:
                    return await client.read_deployment_by_name("cpet-pipeline/nightly-test")

            import asyncio

            dep = _wait(lambda: asyncio.run(deployment()), 120, "deployment", serve, serve_log)
            assert [s.schedule.cron for s in dep.schedules] == ["0 2 * * *"] and dep.schedules[0].active
            assert dep.parameters["stages"] == ["validate"] and dep.parameters["root"] == str(root)

            run = run_deployment("cpet-pipeline/nightly-test", timeout=180, poll_interval=1)
            assert run.state.is_completed(), f"{run.state}: {serve_log.read_text()[-3000:]}"
        assert yaml.safe_load((root / "reports/validate.json").read_text())["success"] is True
    finally:
        for proc in reversed(procs):
            _stop(proc)
