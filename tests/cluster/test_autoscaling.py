"""docs/serve-autoscaling.yaml: a valid Serve config whose overrides name our deployments, and
the same layout deployed for real with `serve run` (Ray's own CLI, its own local Ray): under load
Serve's autoscaler adds an engine replica, and the router sends it requests."""

from __future__ import annotations

import concurrent.futures
import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

yaml = pytest.importorskip("yaml")
pytest.importorskip("ray.serve")

from ray.serve.schema import ServeDeploySchema  # noqa: E402

from radixserve.cluster.deployments import REPLICA_HEADER  # noqa: E402
from radixserve.cluster.launch import app_from_options  # noqa: E402
from tests.live_server import free_port, wait_until_healthy  # noqa: E402

pytestmark = pytest.mark.slow

DOC = Path(__file__).resolve().parents[2] / "docs" / "serve-autoscaling.yaml"


def documented_config() -> dict:
    return yaml.safe_load(DOC.read_text())


def test_the_documented_config_is_valid_and_names_our_deployments():
    config = documented_config()
    ServeDeploySchema.model_validate(config)  # what `serve deploy` checks first
    (app_config,) = config["applications"]
    app = app_from_options(app_config["args"])
    ingress = app._bound_deployment
    engine = ingress.init_args[0]._bound_deployment
    assert {d["name"] for d in app_config["deployments"]} <= {ingress.name, engine.name}
    assert engine.init_args[0].cache.kv_store == app_config["args"]["kv_store"]


def test_serve_adds_an_engine_replica_under_load_and_the_router_uses_it(tmp_path):
    config = copy.deepcopy(documented_config())
    port = free_port()
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    (app_config,) = config["applications"]
    app_config["args"] = {"replicas": 1, "model": "dummy:tiny", "num_blocks": 64, "replica_cpus": 0.5}
    engine = next(d for d in app_config["deployments"] if d["name"] == "Engine")
    # the smallest range that shows a scale-up, reached in seconds instead of Serve's 30
    engine["autoscaling_config"].update(min_replicas=1, max_replicas=2, target_ongoing_requests=1,
                                        upscale_delay_s=1)
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    log = tmp_path / "serve-run.log"
    serve_cli = Path(sys.executable).parent / "serve"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(serve_cli), "run", str(path)], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(base, proc, lambda: tail(log), timeout=180)
        replicas, statuses = load_until_two_replicas(base, seconds=120)
        assert statuses == {200}, statuses
        assert len(replicas) == 2, f"one replica served everything: {replicas}\n{tail(log)}"
    finally:
        stop(proc)


def load_until_two_replicas(base: str, seconds: float) -> tuple[set[str], set[int]]:
    """Eight clients at a time, each request long enough that requests pile up on one replica."""

    def one(i: int) -> tuple[int, str | None]:
        r = httpx.post(f"{base}/v1/completions", json={"model": "dummy:tiny", "prompt": f"p{i} " * 200,
                                                       "max_tokens": 200, "temperature": 0}, timeout=120)
        return r.status_code, r.headers.get(REPLICA_HEADER)

    replicas: set[str] = set()
    statuses: set[int] = set()
    deadline = time.monotonic() + seconds
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        while len(replicas) < 2 and time.monotonic() < deadline:
            for status, replica in pool.map(one, range(8)):
                statuses.add(status)
                replicas.add(replica)
    return replicas, statuses


def stop(proc: subprocess.Popen) -> None:
    """Ctrl-C, as a user stops `serve run`: it shuts Serve and its own Ray down."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
