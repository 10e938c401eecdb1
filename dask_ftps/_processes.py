"""Real scheduler and worker processes, and the one way dask_ftps kills them.

Shared by ``dask-ftps chaos``, the benchmarks and the tests (which may start
the same command lines with distributed's ``popen``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

#: The checkout (or site-packages folder) that holds dask_ftps: importable by
#: every process started here.
PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, timeout: float = 0.2) -> bool:
    with socket.socket() as s:
        s.settimeout(timeout)
        try:
            s.connect(("127.0.0.1", port))
            return True
        except OSError:
            return False


def wait_port(port: int, timeout: float = 60.0, interval: float = 0.005) -> float:
    """Wait until ``127.0.0.1:port`` accepts connections; return when it did."""
    deadline = time.perf_counter() + timeout
    while not port_open(port, 0.5):
        if time.perf_counter() > deadline:
            raise TimeoutError(f"nothing listens on port {port}")
        time.sleep(interval)
    return time.perf_counter()


def environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the processes started here: dask_ftps importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p
    )
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def scheduler_args(
    port: int,
    store: str | None = None,
    storage_options: dict | None = None,
    preloads: tuple[str, ...] = (),
    extra: tuple[str, ...] = (),
) -> list[str]:
    """``dask scheduler`` on ``127.0.0.1:port``; with ``store``, the dask_ftps
    preload that resumes the run the store holds. ``preloads`` come first (a
    module or file whose ``dask_setup`` takes no options)."""
    args = [
        sys.executable,
        "-m",
        "distributed.cli.dask_scheduler",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-dashboard",
    ]
    for preload in preloads:
        args += ["--preload", preload]
    if store is not None:
        args += ["--preload", "dask_ftps.preload", "--ftps-store", str(store)]
        if storage_options:
            args += ["--ftps-storage-options", json.dumps(storage_options)]
    return [*args, *extra]


def worker_args(
    address: str,
    n: int = 2,
    death_timeout: int = 60,
    resources: dict[str, float] | None = None,
) -> list[str]:
    """``dask worker``: ``n`` worker processes of one thread, behind nannies;
    with ``resources`` (``{"ftps-server": 1}``: they may serve shards)."""
    extra = []
    if resources:
        extra = [
            "--resources",
            " ".join(f"{k}={v:g}" for k, v in sorted(resources.items())),
        ]
    return [
        sys.executable,
        "-m",
        "distributed.cli.dask_worker",
        address,
        "--nworkers",
        str(n),
        "--nthreads",
        "1",
        "--no-dashboard",
        "--death-timeout",
        str(death_timeout),
        *extra,
    ]


class Process:
    """A process group started here (a scheduler, or workers), logged to a file;
    signalled by its own id, never by name.

    Parameters
    ----------
    args
        The command line.
    log
        Where its standard output and error go.
    env
        Extra environment variables.
    """

    def __init__(
        self, args: list[str], log: Path, env: dict[str, str] | None = None
    ) -> None:
        self.args = args
        self.log = Path(log)
        self._log_file = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        self.started = time.perf_counter()
        self.popen = subprocess.Popen(
            args,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=environment(env),
            start_new_session=True,  # its own process group: workers and nannies
        )
        self.pid = self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the main process only (a SIGKILLed scheduler, a paused one)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (a worker host going down)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def pause(self) -> None:
        self.kill(signal.SIGSTOP)

    def resume(self) -> None:
        self.kill(signal.SIGCONT)

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    def stop(self, timeout: float = 10.0, *, kill: bool = False) -> None:
        """Terminate the whole group (``kill``: SIGKILL it at once), then kill what
        is left."""
        if self.alive and not kill:
            self.kill_group(signal.SIGCONT)  # a paused process cannot terminate
            self.kill_group(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        self.kill_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout)
        self._log_file.close()

    def output(self) -> str:
        if not self._log_file.closed:
            self._log_file.flush()
        return self.log.read_text(errors="replace")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_scheduler(
    port: int,
    log: Path,
    store: str | None = None,
    env: dict[str, str] | None = None,
    storage_options: dict | None = None,
    preloads: tuple[str, ...] = (),
) -> Process:
    """A ``dask scheduler`` process (see :func:`scheduler_args`)."""
    return Process(scheduler_args(port, store, storage_options, preloads), log, env)


def start_workers(
    address: str,
    n: int,
    log: Path,
    env: dict[str, str] | None = None,
    resources: dict[str, float] | None = None,
) -> Process:
    """A ``dask worker`` process group of ``n`` one-thread workers."""
    return Process(
        worker_args(address, n, death_timeout=30, resources=resources), log, env
    )
