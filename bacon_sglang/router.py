"""Start SGLang's router (``sglang-router``, the Rust gateway) in front of servers started
with :mod:`bacon_sglang.server`, for tests and benchmarks. Listens on 127.0.0.1 only (its
Prometheus endpoint too). No SGLang import here: the router is another process."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from bacon_sglang.server import ServerProcess, free_port, launch_server


def router_argv(
    worker_urls: Sequence[str], port: int, policy: str = "cache_aware", extra: Sequence[str] = ()
) -> list[str]:
    """``python -m sglang_router.launch_router`` for ``worker_urls`` on 127.0.0.1:``port``."""
    return [
        sys.executable, "-m", "sglang_router.launch_router",
        "--host", "127.0.0.1", "--port", str(port),
        "--worker-urls", *worker_urls,
        "--policy", policy,
        "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
        "--log-level", "warn", *extra,
    ]  # fmt: skip


def launch_router(
    worker_urls: Sequence[str],
    policy: str = "cache_aware",
    extra_args: Sequence[str] = (),
    *,
    startup_timeout: float = 120.0,
    log_path: str | Path | None = None,
) -> ServerProcess:
    """Start the router, wait until it answers ``/health`` with every worker registered,
    and return it (a :class:`ServerProcess`: ``stop()`` ends it)."""
    port = free_port()
    argv = router_argv(worker_urls, port, policy, extra_args)
    if log_path is None:
        log_path = Path(tempfile.mkstemp(prefix="sglang-router-", suffix=".log")[1])
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            cwd=tempfile.gettempdir(),
        )  # fmt: skip
    router = ServerProcess(process, f"http://127.0.0.1:{port}", Path(log_path), argv)
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"router exited with {process.returncode}:\n{router.log()[-4000:]}")
        with contextlib.suppress(requests.RequestException):
            workers = requests.get(router.base_url + "/workers", timeout=5)
            if workers.status_code == 200 and len(worker_list(workers.json())) == len(worker_urls):
                return router
        time.sleep(0.5)
    router.stop()
    raise RuntimeError(f"router not ready after {startup_timeout}s:\n{router.log()[-4000:]}")


def worker_list(reply) -> list:
    """The workers of a ``GET /workers`` reply (a list, or ``{"workers": [...]}``)."""
    return reply.get("workers", []) if isinstance(reply, dict) else list(reply)


@contextlib.contextmanager
def running_cluster(
    model_path: str | Path,
    n_workers: int,
    extra_args: Sequence[str] = (),
    policy: str = "cache_aware",
    router_args: Sequence[str] = (),
    **server_kwargs,
) -> Iterator[tuple[ServerProcess, list[ServerProcess]]]:
    """``n_workers`` servers (same flags) and the router in front of them (``policy``, more
    router flags in ``router_args``); stops them all."""
    workers: list[ServerProcess] = []
    router = None
    try:
        # Started together: a start is mostly waiting on imports and the model load.
        with ThreadPoolExecutor(n_workers) as pool:
            starts = [
                pool.submit(launch_server, model_path, extra_args, **server_kwargs)
                for _ in range(n_workers)
            ]
        failures = [f.exception() for f in starts if f.exception() is not None]
        workers += [f.result() for f in starts if f.exception() is None]
        if failures:
            raise failures[0]
        router = launch_router([w.base_url for w in workers], policy, router_args)
        yield router, workers
    finally:
        for process in ([router] if router else []) + workers:
            process.stop()
