"""Start SGLang's HTTP server as a subprocess and stop it cleanly (tests, demo, benchmarks).

With no CUDA device, the server runs SGLang's real engine on CPU (``SGLANG_USE_CPU_ENGINE=1``,
``--device cpu --attention-backend torch_native``, CUDA graphs off) with the
``bacon_sglang.cpu_shim`` standing in for ``sgl_kernel``, and with ``--tp-size``/``--dp-size``
above 1 each scheduler rank bound to its own share of the cores
(``SGLANG_CPU_OMP_THREADS_BIND``, unless set). No SGLang import here: the server is another
process.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import requests

from bacon_sglang.cpu_shim import cpu_engine_env, cuda_device_present

CPU_ENGINE_ARGS = (
    "--device",
    "cpu",
    "--attention-backend",
    "torch_native",
    "--disable-cuda-graph",
)


# Server ports come from here: below the kernel's ephemeral range (32768+), where bind(0) and
# connect() never hand a port out while the server starts, and below SGLang's own range for the
# ports it picks (22000-29999). A port from bind(0) was once taken by another socket between
# the draw and uvicorn's bind (CI: "address already in use"; launch_server then retries).
PORT_RANGE = (15000, 21999)


def free_port(port_range: tuple[int, int] = PORT_RANGE) -> int:
    """An unused TCP port on the loopback interface, drawn at random from ``port_range``
    (bind(0) if none of 64 draws is free)."""
    ports = range(port_range[0], port_range[1] + 1)
    for port in random.sample(ports, min(64, len(ports))):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_engine() -> bool:
    """Whether servers started here run on the CPU engine (no CUDA device present)."""
    return not cuda_device_present()


@dataclass
class ServerProcess:
    """A running ``python -m sglang.launch_server``; use :func:`launch_server` to start one."""

    process: subprocess.Popen
    base_url: str
    log_path: Path
    argv: list[str] = field(default_factory=list)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM the server's process group, wait, then SIGKILL; returns the exit code."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=timeout)
        # Children (scheduler, detokenizer) share the group; make sure none is left.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        return self.process.returncode


def server_argv(model_path: str | Path, port: int, extra: Sequence[str] = ()) -> list[str]:
    """Command line of a small local server (CPU-engine flags added when there is no GPU)."""
    argv = [
        sys.executable,
        "-m",
        "sglang.launch_server",
        "--model-path",
        str(model_path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--skip-server-warmup",
    ]
    if cpu_engine():
        argv += CPU_ENGINE_ARGS
    return argv + list(extra)


# Flags (and their aliases) whose product is the number of scheduler ranks of one server.
RANK_FLAGS = {
    "--tp-size": "tp", "--tp": "tp", "--tensor-parallel-size": "tp",
    "--dp-size": "dp", "--dp": "dp", "--data-parallel-size": "dp",
}  # fmt: skip


def scheduler_ranks(argv: Sequence[str]) -> int:
    """How many scheduler processes ``argv`` starts (``tp_size * dp_size``)."""
    sizes = {"tp": 1, "dp": 1}
    for i, arg in enumerate(argv):
        flag, _, value = arg.partition("=")
        if flag in RANK_FLAGS:
            sizes[RANK_FLAGS[flag]] = int(value or argv[i + 1])
    return sizes["tp"] * sizes["dp"]


def cpu_threads_bind(ranks: int, cores: int | None = None) -> str:
    """``SGLANG_CPU_OMP_THREADS_BIND`` for ``ranks`` CPU-engine ranks: the cores split into
    that many contiguous groups, e.g. ``0|1`` (2 ranks, 2 cores), ``0-1|2-3`` (2 ranks, 4
    cores). SGLang's CPU engine asks for it when ranks outnumber NUMA nodes. With more ranks
    than cores, ranks share cores round-robin."""
    cores = cores or os.cpu_count() or 1
    if ranks > cores:
        return "|".join(str(r % cores) for r in range(ranks))
    groups = []
    for r in range(ranks):
        first, last = r * cores // ranks, (r + 1) * cores // ranks - 1
        groups.append(str(first) if first == last else f"{first}-{last}")
    return "|".join(groups)


def launch_server(
    model_path: str | Path,
    extra_args: Sequence[str] = (),
    *,
    startup_timeout: float = 300.0,
    log_path: str | Path | None = None,
    env: dict[str, str] | None = None,
) -> ServerProcess:
    """Start a server, wait until ``/health`` answers 200, and return it.

    Raises RuntimeError with the server's log tail if it exits or times out first; a start
    that fails because its port was taken meanwhile is retried on another port (twice)."""
    for _ in range(2):
        with contextlib.suppress(PortTaken):
            return _launch(model_path, extra_args, startup_timeout, log_path, env)
    return _launch(model_path, extra_args, startup_timeout, log_path, env)


class PortTaken(RuntimeError):
    """The server could not bind its HTTP port (another process took it after it was drawn)."""


def _launch(model_path, extra_args, startup_timeout, log_path, env) -> ServerProcess:
    port = free_port()
    argv = server_argv(model_path, port, extra_args)
    if log_path is None:
        log_path = Path(tempfile.mkstemp(prefix="sglang-server-", suffix=".log")[1])
    log_path = Path(log_path)
    base_env = cpu_engine_env(env) if cpu_engine() else dict(os.environ if env is None else env)
    base_env.setdefault("HF_HUB_OFFLINE", "1")
    base_env.setdefault("TRANSFORMERS_OFFLINE", "1")
    ranks = scheduler_ranks(argv)
    if cpu_engine() and ranks > 1:
        base_env.setdefault("SGLANG_CPU_OMP_THREADS_BIND", cpu_threads_bind(ranks))
    with open(log_path, "wb") as log:
        # cwd outside the repository: its top-level kernels/ folder would shadow the
        # `kernels` package SGLang depends on.
        process = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=base_env,
            cwd=tempfile.gettempdir(),
            start_new_session=True,
        )
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log_path, argv)
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log = server.log()
            error = (
                PortTaken
                if f"address ('127.0.0.1', {port}): address already in use" in log
                else RuntimeError
            )
            raise error(f"server exited with {process.returncode} during start-up:\n{log[-4000:]}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(server.base_url + "/health", timeout=5).status_code == 200:
                return server
        time.sleep(0.25)
    server.stop()
    raise RuntimeError(f"server not healthy after {startup_timeout}s:\n{server.log()[-4000:]}")


@contextlib.contextmanager
def running_server(
    model_path: str | Path, extra_args: Sequence[str] = (), **kwargs
) -> Iterator[ServerProcess]:
    """Context manager around :func:`launch_server` that always stops the server."""
    server = launch_server(model_path, extra_args, **kwargs)
    try:
        yield server
    finally:
        server.stop()
