"""The Accelerator: owns devices, processes and communication; wraps diffusers pipelines.

Process-group setup is delegated to Lightning Fabric, so the same script runs under ``torchrun``,
under ``accel run``, with ``Accelerator(devices=2).launch()`` at the top of a script (which re-runs the
script once per extra device, as ``Fabric.launch()`` does), or with ``Accelerator(...).launch(fn)``
(spawns processes that call ``fn``).
"""

from __future__ import annotations

import datetime
import logging
import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from accel.compile.runner import StageRunner
from accel.errors import AccelError
from accel.launch import launched_environment
from accel.runtime.comm import Communicator, FailureMonitor
from accel.runtime.groups import GroupLayout
from accel.settings import AccelSettings, SettingsError, check_pipeline_settings
from accel.wrapper import AcceleratedPipeline, ProcessContext, wrap_pipeline

if TYPE_CHECKING:
    from lightning.fabric import Fabric

log = logging.getLogger(__name__)


class DeviceUnavailableError(AccelError, RuntimeError):
    """The requested devices do not exist on this machine."""


class Accelerator:
    """Runs a diffusers pipeline across devices; one per process.

    Every argument is keyword-only and validated on construction (see :class:`AccelSettings`), on
    every rank, before any process group or collective exists.

    Example::

        acc = accel.Accelerator(devices=2)
        acc.launch()                      # no-op under torchrun / accel run
        pipe = acc.wrap(pipe)
    """

    def __init__(self, *, settings: AccelSettings | None = None, **kwargs: Any) -> None:
        if settings is not None and kwargs:
            raise SettingsError("pass either settings=AccelSettings(...) or keyword settings, not both.")
        self.settings = _launcher_layout(settings if settings is not None else AccelSettings(**kwargs))
        self._accelerator = resolve_accelerator(self.settings)
        self._fabric: Fabric | None = None
        self._comm: Communicator | None = None
        self._monitor: FailureMonitor | None = None
        # Compiled stages per (denoiser, backend, engines, strict): wrapping the same pipeline again (other
        # strategy or window guidance) reuses them instead of compiling again.
        self._runners: dict[tuple[int, str, str | None, bool], tuple[torch.nn.Module, StageRunner]] = {}

    # -- launching ----------------------------------------------------------------------------------

    @property
    def is_launched(self) -> bool:
        """Whether this process has joined its process group (or needs none)."""
        return self._fabric is not None

    def launch(self, function: Callable[..., Any] | None = None, *args: Any, **kwargs: Any) -> Any:
        """Start or join the processes.

        Without ``function``: join the process group of an external launcher (torchrun, ``accel run``),
        or, in a plain ``python script.py`` with ``devices > 1``, re-run the script once per extra device.
        With ``function``: spawn ``devices`` processes, each calling ``function(accelerator, *args,
        **kwargs)`` with its own launched Accelerator; returns rank 0's result. Under an external launcher
        the processes exist already: this process joins and calls ``function`` itself, returning its own
        result.
        """
        external = launched_environment() is not None
        if function is None or external:
            if self._fabric is None:
                _join_restarted_group(self.settings, self._accelerator)
                fabric = self._make_fabric(spawn=False)
                fabric.launch()
                self._attach(fabric)
            if function is None:
                return None
            try:
                return function(self, *args, **kwargs)
            except BaseException as exc:
                self.report_failure(exc)
                raise
        fabric = self._make_fabric(spawn=True)
        # Everything travels pickled: Lightning walks launch arguments and refuses frozen dataclasses.
        payload = pickle.dumps((self.settings, function, args, kwargs))
        worker: Callable[..., Any] = _spawned_worker
        with tempfile.TemporaryDirectory(prefix="accel-launch-") as tmp:
            result_file = Path(tmp) / "rank0-result.pkl"
            out = fabric.launch(worker, payload, str(result_file))
            if not result_file.exists():  # one process: the function ran here and returned directly
                return out
            with result_file.open("rb") as f:
                return pickle.load(f)  # written by our own rank-0 worker a moment ago

    def _make_fabric(self, *, spawn: bool) -> Fabric:
        from lightning.fabric import Fabric
        from lightning.fabric.strategies import DDPStrategy

        s = self.settings
        fabric_accelerator = "gpu" if self._accelerator == "cuda" else "cpu"
        if s.world_size == 1:
            return Fabric(accelerator=fabric_accelerator, devices=1, num_nodes=1)
        strategy = DDPStrategy(
            start_method="spawn" if spawn else "popen",
            process_group_backend="nccl" if self._accelerator == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=s.collective_timeout_s),
        )
        return Fabric(
            accelerator=fabric_accelerator, devices=s.devices, num_nodes=s.num_nodes, strategy=strategy
        )

    def _attach(self, fabric: Fabric) -> None:
        self._fabric = fabric
        if fabric.world_size > 1:
            self._comm = Communicator(rank=fabric.global_rank, world_size=fabric.world_size)
            self._monitor = FailureMonitor.for_default_group(fabric.global_rank, fabric.world_size)
            if self._monitor is not None:
                self._monitor.start()
            try:
                # The first collective: all ranks must agree on the settings before any work starts.
                self._comm.check_same("accel settings", f"{self.settings!r}")
                # Once per Accelerator, not per call: group creation is collective and slow on NCCL.
                self._comm.create_groups(self.settings.collective_timeout_s)
            except BaseException:
                # Every rank raises here (they all see the disagreement): leave the group now, so that
                # the process exits with this error rather than abort while tearing the group down.
                self._leave_group()
                raise
            if self.rank == 0:
                log.info("group layout: %s", self._comm.layout.describe())
        log.info("rank %d/%d on %s", self.rank, self.world_size, self.device)

    # -- properties ---------------------------------------------------------------------------------

    def _launched(self) -> Fabric:
        if self._fabric is None:
            raise RuntimeError("the Accelerator is not launched yet: call accelerator.launch() first.")
        return self._fabric

    @property
    def rank(self) -> int:
        """Global rank of this process."""
        return self._launched().global_rank

    @property
    def world_size(self) -> int:
        """Number of processes."""
        return self._launched().world_size

    @property
    def device(self) -> torch.device:
        """This process's device."""
        return self._launched().device

    @property
    def comm(self) -> Communicator | None:
        """The communicator (``None`` with one process)."""
        return self._comm

    @property
    def layout(self) -> GroupLayout:
        """The CFG group layout: ranks ``[0, k)`` run the unconditional branch, ``[k, 2k)`` the conditional."""
        return GroupLayout(self.world_size)

    def report_failure(self, exc: BaseException) -> None:
        """Tell every other rank that this rank failed, so that they stop instead of waiting."""
        if self._monitor is not None:
            self._monitor.post(exc)

    def on_peer_failure(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(message)`` when another rank reports a failure, just before this process stops
        because of it (a server answers its clients first). It runs on the failure monitor's thread and
        should return within seconds. Nothing happens with one process."""
        if self._monitor is not None:
            self._monitor.before_exit(callback)

    def teardown(self) -> None:
        """Leave the process group cleanly (every rank calls it once its work is done)."""
        self._leave_group(barrier=True)

    def _leave_group(self, *, barrier: bool = False) -> None:
        if self._monitor is not None:
            self._monitor.stop()
        if self._comm is not None and dist.is_initialized():
            if barrier:
                dist.barrier()
            dist.destroy_process_group()
        self._comm = None

    def barrier(self) -> None:
        """Wait for every rank."""
        self._launched().barrier()

    # -- wrapping -----------------------------------------------------------------------------------

    def wrap(self, pipe: Any, **pipeline_settings: Any) -> AcceleratedPipeline:
        """Accelerate a diffusers pipeline in place; returns a wrapper with the same call signature.

        ``pipeline_settings`` may override the per-pipeline settings (``strategy``, ``window_guidance``,
        ``schedule``, ``plan``, ``backend``, ``engines``, ``strict``, ``compile_vae``: ``PIPELINE_SETTINGS``)
        of this Accelerator for this pipeline only; they are validated like the rest.
        """
        check_pipeline_settings(pipeline_settings)
        settings = self.settings.replace(**pipeline_settings) if pipeline_settings else self.settings
        if not self.is_launched:
            self.launch()
        process = ProcessContext(
            owner=self,
            settings=self.settings,
            device=self.device,
            rank=self.rank,
            world_size=self.world_size,
            layout=self.layout,
            comm=self.comm,
            stage_runner=self.stage_runner,
            report_failure=self.report_failure,
        )
        return wrap_pipeline(pipe, process, settings)

    def stage_runner(self, denoiser: torch.nn.Module, settings: AccelSettings) -> StageRunner:
        """The compiled stage callables of ``denoiser`` for ``settings``' backend, shared by its wraps."""
        key = (id(denoiser), settings.backend, settings.engines, settings.strict)
        entry = self._runners.get(key)
        if entry is None or entry[0] is not denoiser:
            runner = StageRunner(settings.backend, engines=settings.engines, strict=settings.strict)
            runner.backend.check_available()
            entry = self._runners[key] = (denoiser, runner)
        return entry[1]

    def __repr__(self) -> str:
        where = f"rank {self.rank}/{self.world_size} on {self.device}" if self.is_launched else "not launched"
        return f"Accelerator({self.settings!r}, {where})"


def _launcher_layout(settings: AccelSettings) -> AccelSettings:
    """Under an external launcher (``accel run``, torchrun) the processes exist already: their layout
    decides ``devices`` and ``num_nodes``, so one script runs unchanged on any layout it is launched with."""
    env = launched_environment()
    if env is None:
        return settings
    local, world = env["local_world_size"], env["world_size"]
    if world % local:
        raise SettingsError(
            f"the launcher started {world} processes with {local} on this node: accel needs the same number "
            "of processes on every node (torchrun --nproc-per-node / accel run --devices)."
        )
    layout = (local, world // local)
    if layout == (settings.devices, settings.num_nodes):
        return settings
    log.info(
        "launched as %d process(es) per node on %d node(s); using that instead of devices=%d, num_nodes=%d",
        *layout,
        settings.devices,
        settings.num_nodes,
    )
    return settings.replace(devices=layout[0], num_nodes=layout[1])


def _join_restarted_group(settings: AccelSettings, accelerator: str) -> None:
    """In a worker group the launcher restarted (``--max-restarts``), join the process group through a
    store of this attempt's own.

    torch's static rendezvous (what ``accel run``/``accel serve`` launch with) keeps one key-value store
    across restarts and, unlike its other rendezvous, adds no per-attempt prefix: a restarted group would
    read the dead group's keys (the collectives' peer addresses, accel's failure records, the server's
    batches) and fail at random. Fabric joins a process group that already exists as it is.
    """
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt == 0 or settings.world_size == 1 or dist.is_initialized():
        return
    timeout = datetime.timedelta(seconds=settings.collective_timeout_s)
    address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    store = dist.TCPStore(address, port, is_master=False, timeout=timeout)
    if accelerator == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(
        "nccl" if accelerator == "cuda" else "gloo",
        store=dist.PrefixStore(f"accel/attempt_{attempt}/", store),
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=timeout,
    )
    log.info("joined restarted worker group (attempt %d)", attempt)


def resolve_accelerator(settings: AccelSettings) -> str:
    """``"cuda"`` or ``"cpu"``, checked against what this machine has."""
    kind = settings.accelerator
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if kind == "auto":
        kind = "cuda" if n_cuda > 0 else "cpu"
    if kind == "cuda" and n_cuda < settings.devices:
        raise DeviceUnavailableError(
            f"devices={settings.devices} CUDA devices were requested but this machine has {n_cuda}. "
            "Lower devices (--devices), or pass accelerator='cpu' (--accelerator cpu) to run that many CPU "
            "processes (gloo)."
        )
    return kind


def _spawned_worker(
    fabric: Fabric,
    payload: bytes,
    result_file: str,
) -> Any:
    settings, function, args, kwargs = pickle.loads(payload)  # from our own parent process
    accelerator = Accelerator(settings=settings)
    accelerator._attach(fabric)
    try:
        result = function(accelerator, *args, **kwargs)
    except BaseException as exc:
        accelerator.report_failure(exc)
        raise
    if fabric.world_size == 1:
        return result
    if accelerator.rank == 0:
        # Not through the launcher's return queue: a child that exits with a large result still in its
        # pipe would wait forever for a parent that only reads after the child exits.
        with open(result_file, "wb") as f:
            pickle.dump(result, f)
    accelerator.teardown()
    return None
