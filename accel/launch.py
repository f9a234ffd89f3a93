"""Start worker processes on this node through torch.distributed's elastic launcher (what torchrun uses).

``accel run`` calls these so that nobody writes a torchrun line; they work for any code that joins a
process group from the environment (``accel.wrap``, ``accel.Accelerator``, Lightning Fabric)::

    spec = LaunchSpec(devices=2)                              # one node, a free port
    results = launch_function(spec, work, job)                # {global rank: work(job)} for this node
    launch_script(spec, "generate.py", ["--steps", "20"])     # the script runs in every worker

Several nodes: start the same command on each node with ``num_nodes``, its own ``node_rank`` and the
same ``master_addr``/``master_port`` (node 0 listens there). Every worker gets ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` and
``TORCHELASTIC_RUN_ID``. When one worker fails, the launcher stops the other workers of its node and
raises :class:`LaunchError` naming the failed rank and its error; workers on other nodes stop through
accel's failure monitor or, at the latest, the collective timeout.
"""

from __future__ import annotations

import contextlib
import logging
import os
import runpy
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accel.errors import AccelError
from accel.settings import SettingsError, check_count

log = logging.getLogger(__name__)

#: The rendezvous run id; every node of one run must use the same one (it prefixes the store's keys).
RUN_ID = "accel-run"


class LaunchError(AccelError, RuntimeError):
    """A worker process failed; the message names the rank and its error (``failures``: rank -> error)."""

    def __init__(self, message: str, failures: Mapping[int, str]) -> None:
        super().__init__(message)
        self.failures = dict(failures)


@dataclass(frozen=True, kw_only=True)
class LaunchSpec:
    """The processes to start on this node and how the nodes find each other.

    Attributes:
        devices: worker processes on this node (one device each).
        num_nodes: nodes taking part; every node runs the same command with its own ``node_rank``.
        node_rank: this node's index, ``0 <= node_rank < num_nodes``; node 0 hosts the rendezvous store.
        master_addr: address of node 0, reachable from every node.
        master_port: a free TCP port on node 0; ``None`` picks one (only possible with one node).
        join_timeout_s: how long a node waits for the others to join before giving up.
        threads_per_worker: CPU threads per worker (``OMP_NUM_THREADS``) unless the environment sets it;
            ``None`` divides this machine's cores among the workers.
        max_restarts: how often the workers of this node are restarted after one fails (0: the failure
            ends the launch; a generation run fails the same way again, a server may recover).
        stop_timeout_s: after SIGTERM/SIGINT (forwarded to the workers), how long the workers may take to
            exit before they are killed.
    """

    devices: int = 1
    num_nodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    join_timeout_s: float = 300.0
    threads_per_worker: int | None = None
    max_restarts: int = 0
    stop_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        check_count("devices", self.devices)
        check_count("num_nodes", self.num_nodes)
        if not 0 <= self.node_rank < self.num_nodes:
            raise SettingsError(
                f"node_rank={self.node_rank} (--node-rank) is outside 0..{self.num_nodes - 1} for "
                f"num_nodes={self.num_nodes}; give each node its own rank, 0 for the node at master_addr."
            )
        if self.master_port is not None and not 1 <= self.master_port <= 65535:
            raise SettingsError(
                f"master_port={self.master_port} (--master-port) is not a TCP port (1-65535)."
            )
        if self.num_nodes > 1 and self.master_port is None:
            raise SettingsError(
                f"num_nodes={self.num_nodes} needs master_port (accel run --num-nodes {self.num_nodes} needs "
                "--master-port) and master_addr, the address of node 0: every node must be told the same port, "
                "so none can be picked at random."
            )
        if not self.join_timeout_s > 0:
            raise SettingsError(f"join_timeout_s must be > 0, got {self.join_timeout_s!r}.")
        if self.max_restarts < 0:
            raise SettingsError(f"max_restarts must be >= 0 (--max-restarts), got {self.max_restarts!r}.")
        if not self.stop_timeout_s > 0:
            raise SettingsError(f"stop_timeout_s must be > 0, got {self.stop_timeout_s!r}.")

    @property
    def world_size(self) -> int:
        """Processes on all nodes."""
        return self.devices * self.num_nodes


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def launch_function(spec: LaunchSpec, function: Callable[..., Any], *args: Any) -> dict[int, Any]:
    """Run ``function(*args)`` in ``spec.devices`` new processes on this node.

    ``function`` and ``args`` must be picklable (processes are spawned). Returns each of this node's
    workers' return value by global rank; raises :class:`LaunchError` when a worker fails.

    A run of one process in all (one device, one node) calls ``function`` in this process instead: a
    worker process would start a second interpreter and import torch and diffusers again (seconds of
    start-up) with no group to coordinate.
    """
    if spec.world_size == 1:
        return {0: _call_here(function, args)}
    return _launch(spec, function, list(args))


def _call_here(function: Callable[..., Any], args: Sequence[Any]) -> Any:
    try:
        return function(*args)
    except Exception as exc:
        text = f"{type(exc).__name__}: {str(exc).strip()}"
        raise LaunchError(f"rank 0 failed: {text}", {0: text}) from exc


def launch_script(spec: LaunchSpec, script: str | os.PathLike[str], args: Sequence[str] = ()) -> None:
    """Run ``python script args...`` in ``spec.devices`` new processes on this node.

    The script runs as ``__main__`` with ``sys.argv = [script, *args]``, exactly as ``python script.py``
    would run it, plus the process-group environment. Raises :class:`LaunchError` when a worker fails.
    """
    path = Path(script)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such script.")
    # Through a small runner so that an exception in the script is recorded (rank, type, message) for the
    # launcher's error, not only printed as a traceback among the other workers' output.
    _launch(spec, sys.executable, ["-m", "accel.launch", str(path.resolve()), *args])


def _launch(spec: LaunchSpec, entrypoint: Callable[..., Any] | str, args: list[Any]) -> dict[int, Any]:
    # Deferred: torch is imported when launching, not when the command line (which imports this) starts.
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    port = spec.master_port if spec.master_port is not None else free_port(spec.master_addr)
    threads = spec.threads_per_worker or max(1, (os.cpu_count() or 1) // spec.devices)
    # Workers share the cores: without a limit each would start one thread per core and they would spend
    # their time preempting each other.
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
    stopped_by: signal.Signals | None = None
    with (
        tempfile.TemporaryDirectory(prefix="accel-launch-") as log_dir,
        _scoped_env(env),
        _kept_signal_handlers(),
        _quiet_elastic_logs(),
        _temporary_files_in(log_dir),
    ):
        config = LaunchConfig(
            min_nodes=spec.num_nodes,
            max_nodes=spec.num_nodes,
            nproc_per_node=spec.devices,
            run_id=RUN_ID,
            rdzv_backend="static",
            rdzv_endpoint=f"{spec.master_addr}:{port}",
            rdzv_configs={"rank": spec.node_rank, "timeout": max(1, int(spec.join_timeout_s))},
            max_restarts=spec.max_restarts,
            # Long enough for a failing worker to record its error before the launcher stops it because a
            # peer that saw the failure (accel's failure monitor) exited first.
            monitor_interval=0.5,
            # SIGINT stays this process's (KeyboardInterrupt, or the command line's handler): the launcher
            # then stops the workers with SIGTERM, which ends them silently, where forwarding SIGINT would
            # make every worker print a KeyboardInterrupt traceback.
            signals_to_handle="SIGTERM,SIGHUP,SIGQUIT",
            start_method="spawn",
            logs_specs=DefaultLogsSpecs(log_dir=log_dir),
        )
        if "shutdown_timeout" in LaunchConfig.__dataclass_fields__:  # torch >= 2.12
            config.shutdown_timeout = max(1, int(spec.stop_timeout_s))
        log.info(
            "starting %d worker(s) on node %d/%d, rendezvous %s:%d",
            spec.devices,
            spec.node_rank,
            spec.num_nodes,
            spec.master_addr,
            port,
        )
        try:
            results: dict[int, Any] = elastic_launch(config, entrypoint)(*args)
        except ChildFailedError as exc:
            raise _launch_error(exc) from None
        except SignalException as exc:
            # The launcher has stopped the workers; the signal is delivered again below, once this
            # process's own handlers are back, so that it ends the process as it would have without us.
            stopped_by = signal.Signals(exc.sigval)
        except (RuntimeError, ValueError, TimeoutError, OSError) as exc:
            # Rendezvous problems (port taken, node 0 unreachable, other nodes never came).
            raise LaunchError(
                f"could not start the workers on node {spec.node_rank}: {type(exc).__name__}: {str(exc).rstrip('.')}. "
                + _rendezvous_hint(spec, port),
                {},
            ) from exc
    if stopped_by is not None:
        signal.raise_signal(stopped_by)
        raise LaunchError(f"the workers were stopped by {stopped_by.name}", {})
    return results


def _rendezvous_hint(spec: LaunchSpec, port: int) -> str:
    if spec.num_nodes == 1:
        return "Check that nothing else uses the port (pass another --master-port)."
    return (
        f"Check that node 0 runs the same command with --node-rank 0, that {spec.master_addr}:{port} is "
        f"reachable from this node, and that all {spec.num_nodes} nodes start within "
        f"{spec.join_timeout_s:g} s."
    )


def _recorded(failure: Any) -> bool:
    """Whether the worker recorded its exception (it raised, rather than being stopped or killed)."""
    return bool(failure.error_file) and os.path.isfile(failure.error_file)


def _failure_text(failure: Any) -> str:
    """The recorded error of one failed worker (type and message), else how it ended."""
    if _recorded(failure):
        message = failure.message
        if isinstance(message, dict):
            message = message.get("message", "")
        if str(message or "").strip():
            return str(message).strip()
    if failure.exitcode < 0:
        return f"stopped by signal {-failure.exitcode} ({failure.signal_name()})"
    return f"exited with code {failure.exitcode} (its output above says why)"


def _peer_failure(failure: Any) -> dict[str, Any] | None:
    """The failure (``{"rank", "error"}``) of the peer that made accel's failure monitor stop this worker."""
    from accel.runtime.comm import PEER_FAILURE  # deferred: imports torch.distributed

    if not _recorded(failure) or not isinstance(failure.message, dict):
        return None
    found = failure.message.get("extraInfo", {}).get(PEER_FAILURE)
    return found if isinstance(found, dict) and "rank" in found and "error" in found else None


def _launch_error(exc: Any) -> LaunchError:
    failures = {int(rank): _failure_text(f) for rank, f in exc.failures.items()}
    peers = {int(rank): _peer_failure(f) for rank, f in exc.failures.items()}
    own = [int(r) for r, f in exc.failures.items() if _recorded(f) and peers[int(r)] is None]
    # A worker that raised recorded its error; the others ended because of it (stopped by the launcher,
    # or by accel's failure monitor, which records the failed peer), so the earliest own error is the
    # cause. The failed worker itself may still be unwinding when a peer it stopped has already exited.
    stopped_by = [p for p in peers.values() if p is not None]
    if own:
        rank = min(own, key=lambda r: exc.failures[r].timestamp)
        cause = failures[rank]
    elif stopped_by:
        rank, cause = int(stopped_by[0]["rank"]), str(stopped_by[0]["error"])
        failures[rank] = cause
    else:
        rank = min(failures)
        cause = failures[rank]
    others = sorted(r for r in failures if r != rank)
    message = f"rank {rank} failed: {cause}"
    if others:
        message += f" (rank(s) {', '.join(map(str, others))} stopped as well)"
    return LaunchError(message, failures)


@contextlib.contextmanager
def _scoped_env(updates: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the workers (they inherit this process's), then put them back."""
    keys = [*updates, "TORCHELASTIC_SIGNALS_TO_HANDLE"]
    before = {k: os.environ.get(k) for k in keys}
    os.environ.update(updates)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _temporary_files_in(folder: str) -> Iterator[None]:
    """Make ``tempfile`` create its files in ``folder`` (removed after the launch): torch.multiprocessing
    gives each worker a ``pytorch-errorfile-*.pickle`` that it never deletes."""
    saved = tempfile.tempdir
    tempfile.tempdir = folder
    try:
        yield
    finally:
        tempfile.tempdir = saved


@contextlib.contextmanager
def _kept_signal_handlers() -> Iterator[None]:
    """The elastic launcher installs its own signal handlers (to stop the workers) and leaves them."""
    if sys.platform == "win32":  # pragma: no cover - the elastic launcher does not run there
        yield
        return
    signals = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT]
    saved = {s: signal.getsignal(s) for s in signals}
    try:
        yield
    finally:
        if threading.current_thread() is threading.main_thread():
            for s, handler in saved.items():
                signal.signal(s, handler)


class _ToDebug(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        log.debug("%s: %s", record.name, record.getMessage())


@contextlib.contextmanager
def _quiet_elastic_logs() -> Iterator[None]:
    """The elastic launcher logs each start and failure at WARNING/ERROR with a page of internals; accel
    reports failures itself (LaunchError), so the launcher's records go to accel's log at DEBUG."""
    names = ("torch.distributed.elastic", "torch.distributed.launcher", "torch.multiprocessing")
    loggers = [logging.getLogger(name) for name in names]
    handler = _ToDebug()
    saved = [(logger, logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.propagate = False
    try:
        yield
    finally:
        for logger, propagate in saved:
            logger.removeHandler(handler)
            logger.propagate = propagate


def launched_environment() -> dict[str, int] | None:
    """The process layout an external launcher (``accel run``, torchrun) gave this process, else ``None``.

    Keys: ``rank``, ``local_rank``, ``world_size``, ``local_world_size``, ``node_rank``.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    try:
        world = int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        return {
            "rank": int(os.environ["RANK"]),
            "local_rank": int(os.environ.get("LOCAL_RANK", 0)),
            "world_size": world,
            "local_world_size": local,
            "node_rank": int(os.environ.get("GROUP_RANK", 0)),
        }
    except (KeyError, ValueError):
        return None


def _run_script(argv: Sequence[str]) -> None:
    """Run ``argv[0]`` as ``__main__`` with ``sys.argv = argv``, recording an exception for the launcher."""
    from torch.distributed.elastic.multiprocessing.errors import record

    script = argv[0]
    sys.argv = list(argv)
    # The script's folder comes first on sys.path, as with `python script.py`.
    sys.path[0] = str(Path(script).resolve().parent)
    record(runpy.run_path)(script, run_name="__main__")


if __name__ == "__main__":
    _run_script(sys.argv[1:])
