"""The benchmark suite: every workload against a caching-on and a caching-off server, in one run.

By default it starts two `radixserve serve` subprocesses on free loopback ports, one as given and
one with `--no-prefix-caching`, both with the same engine options (so `--device cuda --model
dummy:llama3.2-1b` runs the same suite on a GPU). For each workload it warms both servers up,
empties their prefix caches, and sends the same requests in the same order to each, one server
after the other (which goes first alternates between workloads). The caching-on server starts
cold, so the first request of every shared prefix pays full price. Point it at
other servers instead with `on_url` / `off_url` (for instance another engine started with and
without its prefix cache).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from radixserve.benchmark.loadgen import (
    LoadConfig,
    calibrate_token_scale,
    reset_prefix_cache,
    run_load_sync,
    served_model,
    warm_up,
)
from radixserve.benchmark.results import Pricing, SuiteResult, WorkloadResult
from radixserve.benchmark.workloads import DEFAULT_WORKLOADS, WORKLOADS, make_workload
from radixserve.errors import RadixServeError

MODES = ("on", "off")  # prefix caching on / off: the labels of a workload's two runs


class ServerStartError(RadixServeError):
    """A `radixserve serve` subprocess exited or never became ready (its log tail says why)."""


@dataclass(slots=True)
class SuiteConfig:
    """What to run. server_args are `radixserve serve` engine options shared by both servers
    (e.g. ["--device", "cuda", "--model", "dummy:llama3.2-1b"]); server_threads sets torch's
    thread count in them (OMP_NUM_THREADS); on_url / off_url skip starting servers."""

    workloads: list[str] = field(default_factory=lambda: list(DEFAULT_WORKLOADS))
    quick: bool = False
    scale: float = 1.0
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # workload -> field values
    concurrency: int | None = 1
    request_rate: float | None = None
    seed: int = 0
    label: str = "cpu"
    server_args: list[str] = field(default_factory=list)
    server_threads: int | None = None
    startup_timeout: float = 900.0
    on_url: str | None = None
    off_url: str | None = None
    model: str | None = None  # the model name to send (default: what /v1/models lists)
    api_key: str | None = None
    calibrate: bool = True
    warmup_tokens: int | None = None  # warm-up prompt length (default: 256, or 64 with quick)
    ignore_eos: bool = True
    pricing: Pricing = field(default_factory=Pricing)
    progress: bool = True
    command: str = ""
    machine: str = ""
    notes: list[str] = field(default_factory=list)  # printed under the report's method paragraph
    # Seconds from the start (servers' start-up included) after which no further workload
    # starts: one that would likely end past it (judged by the longest so far) is skipped and
    # the report says so. For runs with a hard limit, like a GPU machine's command.
    time_limit: float | None = None
    checkpoint: Path | None = None  # save the results here after every workload

    def __post_init__(self) -> None:
        unknown = [w for w in self.workloads if w not in WORKLOADS]
        if unknown:
            raise ValueError(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
        if (self.on_url is None) != (self.off_url is None):
            raise ValueError("give both on_url and off_url (or neither, to start radixserve servers)")
        if self.scale <= 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")


class LocalServer:
    """A `radixserve serve` subprocess on a free loopback port; its log goes to a file."""

    def __init__(self, args: list[str], *, caching: bool, threads: int | None = None,
                 log_dir: Path | None = None) -> None:
        self.args = list(args) + ([] if caching else ["--no-prefix-caching"])
        self.caching = caching
        self.threads = threads
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        log_dir = log_dir or Path(tempfile.mkdtemp(prefix="radixserve-bench-"))
        self.log_path = log_dir / f"server-{'on' if caching else 'off'}-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "radixserve.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                "--log-level", "warning", *self.args]

    def start(self) -> None:
        env = dict(os.environ)
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)  # torch reads it at start-up
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float) -> None:
        """Until /health answers 200 (the model is loaded and the engine thread runs)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ServerStartError(f"the server exited with code {self.process.returncode}; "
                                       f"`{shlex.join(self.command)}` logged:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/health", timeout=5).status_code == 200:
                    return
            time.sleep(0.5)
        raise ServerStartError(
            f"the server did not become ready in {timeout:.0f} s; its log ends:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if getattr(self, "_log", None) is not None:
            self._log.close()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


GPU_NUM_BLOCKS = 4096  # per server when two share a GPU: 64k tokens at block size 16


def _option(args: list[str], name: str) -> str | None:
    """The value of `--name V` / `--name=V` in an argument list (the last one wins)."""
    value = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def server_args_for(config: SuiteConfig) -> list[str]:
    """The engine options both servers get. Two servers on one GPU cannot both size their KV
    pool from free memory (each would claim what the other needs, and whichever starts second
    gets almost nothing), so on CUDA they get the same fixed pool unless --num-blocks is given;
    that also gives caching on and off the same capacity."""
    args = list(config.server_args)
    device = _option(args, "--device") or "cpu"
    if device.startswith("cuda") and _option(args, "--num-blocks") is None:
        args += ["--num-blocks", str(GPU_NUM_BLOCKS)]
    return args


@contextlib.contextmanager
def local_servers(config: SuiteConfig) -> Iterator[dict[str, str]]:
    """Start the caching-on and caching-off servers (loading in parallel); yield their URLs."""
    args = server_args_for(config)
    log_dir = Path(tempfile.mkdtemp(prefix="radixserve-bench-"))
    servers = {mode: LocalServer(args, caching=mode == "on", threads=config.server_threads, log_dir=log_dir)
               for mode in MODES}
    try:
        for server in servers.values():
            server.start()
        for server in servers.values():
            server.wait_ready(config.startup_timeout)
        yield {mode: server.base_url for mode, server in servers.items()}
    finally:
        for server in servers.values():
            server.stop()


def run_suite(config: SuiteConfig) -> SuiteResult:
    """Run every workload against both servers; returns all measurements (see report.py)."""
    load_before = _loadavg()
    started = time.monotonic()
    if config.on_url is not None:
        servers: contextlib.AbstractContextManager[dict[str, str]] = contextlib.nullcontext(
            {"on": config.on_url, "off": config.off_url})
    else:
        servers = local_servers(config)
    notes = list(config.notes)
    if config.server_threads and config.on_url is None:
        notes.append(f"each server ran with {config.server_threads} torch thread(s) (OMP_NUM_THREADS)")
    with servers as urls:
        model = config.model or served_model(urls["on"], config.api_key)
        token_scale = calibrate_token_scale(urls["on"], model, config.api_key) if config.calibrate else 1.0
        warmup_tokens = config.warmup_tokens or (64 if config.quick else 256)
        workloads: list[WorkloadResult] = []

        def suite_result(run_notes: list[str]) -> SuiteResult:
            return SuiteResult(
                label=config.label,
                command=config.command,
                machine=config.machine,
                date=datetime.date.today().isoformat(),
                model=model,
                discipline=LoadConfig(base_url="", model="", concurrency=config.concurrency,
                                      request_rate=config.request_rate).discipline,
                seed=config.seed,
                token_scale=token_scale,
                server_args=server_args_for(config) if config.on_url is None else [f"on: {config.on_url}",
                                                                                    f"off: {config.off_url}"],
                load_before=load_before,
                load_after=_loadavg(),
                pricing=config.pricing,
                workloads=workloads,
                duration=time.monotonic() - started,
                notes=run_notes,
            )

        for url in urls.values():
            warm_up(url, model, config.api_key, num_tokens=warmup_tokens, ignore_eos=config.ignore_eos)
        longest = 0.0
        for position, name in enumerate(config.workloads):
            if config.time_limit is not None and time.monotonic() - started + longest > config.time_limit:
                skipped = config.workloads[position:]
                notes.append(f"the run stopped at its time limit ({config.time_limit:.0f} s) before "
                             f"{', '.join(skipped)}")
                print(f"time limit: skipping {', '.join(skipped)}", file=sys.stderr)
                break
            workload_started = time.monotonic()
            workload = make_workload(name, seed=config.seed, token_scale=token_scale, quick=config.quick,
                                     scale=config.scale, **config.overrides.get(name, {}))
            requests = workload.build()
            result = WorkloadResult(name=name, summary=workload.summary(), shares_prefix=workload.shares_prefix,
                                    kind=workload.kind)
            # Alternate which server goes first, so a drift in the machine's load (shared
            # machines) does not always favour the same side.
            for mode in MODES if position % 2 == 0 else MODES[::-1]:
                url = urls[mode]
                # a short request right before timing: the server may have idled through the
                # other server's run (CPU caches, thread pools and clocks went cold)
                warm_up(url, model, config.api_key, num_tokens=32, num_requests=2, ignore_eos=config.ignore_eos)
                if not reset_prefix_cache(url, config.api_key) and mode == "on":
                    notes.append(f"{name}: could not reset the caching-on server's prefix cache before the run")
                load = LoadConfig(base_url=url, model=model, api_key=config.api_key, concurrency=config.concurrency,
                                  request_rate=config.request_rate, seed=config.seed, ignore_eos=config.ignore_eos,
                                  progress=config.progress, description=f"{name} [cache {mode}]")
                result.runs[mode] = run_load_sync(requests, load, label=mode)
            workloads.append(result)
            longest = max(longest, time.monotonic() - workload_started)
            if config.checkpoint is not None:  # what a run killed later still leaves behind
                partial = f"partial results: {len(workloads)} of {len(config.workloads)} workloads"
                suite_result([*notes, partial]).save(config.checkpoint)
    return suite_result(notes)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _loadavg() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None
