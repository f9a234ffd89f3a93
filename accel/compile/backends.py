"""Compile backends behind one interface: ``eager``, ``inductor``, ``aot``, ``onnx``, ``tensorrt``.

>>> backend = get_backend("aot")
>>> backend.available()                       # None: usable; else why not and how to fix it
>>> fn = backend.compile(stage, example_inputs)            # an in-memory compiled callable
>>> backend.export(stage, example_inputs, "engines/s0.pt2")   # an engine file ...
>>> fn = backend.load("engines/s0.pt2", module=stage)          # ... loaded in a later run

Every callable takes the stage's flat input tensors and returns a tuple of output tensors (see
:mod:`accel.compile.stage`). :func:`compile_stage` wraps ``compile`` with the per-stage fallback: a
failure becomes a warning naming the stage and the eager module is used, unless ``strict=True``.

Engine files can contain executable code (AOTInductor packages hold shared libraries; inductor cache
artifacts hold generated code): load them only from a directory you trust. :mod:`accel.compile.store`
adds checksums, fingerprints and version checks on top.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from accel.atomic import atomic_path, write_text_atomic
from accel.compile import launches
from accel.compile.cxxruntime import loaded_libstdcxx, share_libstdcxx
from accel.compile.loader_check import MARKER_PREFIX, cache_folder, check_lock
from accel.compile.stage import stage_model
from accel.errors import AccelError
from accel.settings import Tuning

logger = logging.getLogger(__name__)

StageCallable = Callable[..., Any]

#: Inductor settings of a stage compiled with coordinate descent. Kernels read back from the cache through
#: torch's static CUDA launcher lose the mark that their launch parameters came from a search (torch 2.11;
#: pytorch/pytorch#172819), so every load of the engine searched again (GPU host: a small block 60-68
#: benchmark calls per load, none through Triton's own launcher). Under the runtime's CUDA-graph replay
#: the launcher costs nothing per step.
SEARCHED_KERNELS_LAUNCHER = {"use_static_cuda_launcher": False}

TENSORRT_INSTALL = (
    "pip install 'accel[tensorrt]' (from a source checkout: pip install -e '.[tensorrt]'; torch-tensorrt "
    "needs a CUDA build of torch and the torch-tensorrt release made for your torch minor version)"
)


class BackendError(AccelError, RuntimeError):
    """A backend cannot be used, or compiling / exporting / loading a stage failed."""


class BackendUnavailableError(BackendError):
    """The backend is not installed or cannot run here; the message says why and how to fix it."""


def _as_tuple(out: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(out, torch.Tensor):
        return (out,)
    return tuple(out)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


class Backend(ABC):
    """One way to turn a stage module into a fast callable, and (for most) into an engine file."""

    name: str = ""
    #: file suffix of this backend's engine files
    suffix: str = ".bin"
    #: True when ``load`` needs the stage module (the file holds no weights / no graph)
    needs_module: bool = False
    #: True when the callable reads the module's own parameters and buffers when it runs (the engine file
    #: holds code only): other weights of the same graph are served without recompiling, and a weight
    #: edited in place is seen by the next call. False: the engine holds its own copy of the weights.
    binds_weights: bool = False
    #: How stages are built beyond the defaults (:class:`accel.settings.Tuning`); only ``tunable``
    #: backends take anything but the defaults (see :meth:`tuned`).
    tuning: Tuning = Tuning()
    tunable: bool = False

    def tuned(self, tuning: Tuning) -> Backend:
        """This backend building (and loading) stages with ``tuning``; itself when that is its tuning."""
        if tuning == self.tuning:
            return self
        if not self.tunable:
            raise BackendError(
                f"backend {self.name!r} takes no tuning options ({tuning.describe()}); they apply to the "
                "inductor and aot backends."
            )
        other = copy.copy(self)
        other.tuning = tuning
        return other

    def available(self) -> str | None:
        """``None`` when the backend can be used here; otherwise the reason and the fix."""
        return None

    def check_available(self) -> None:
        reason = self.available()
        if reason is not None:
            raise BackendUnavailableError(f"backend {self.name!r} is unavailable: {reason}")

    def version(self) -> str | None:
        """Version of the library doing the compiling (recorded in manifests)."""
        return torch.__version__

    @abstractmethod
    def compile(
        self, module: torch.nn.Module, example_inputs: Sequence[torch.Tensor], *, strict: bool = False
    ) -> StageCallable:
        """An in-memory callable equal to ``module`` on inputs shaped like ``example_inputs``."""

    @abstractmethod
    def export(
        self, module: torch.nn.Module, example_inputs: Sequence[torch.Tensor], path: str | os.PathLike[str]
    ) -> Path:
        """Compile ``module`` into one engine file at ``path`` (written atomically); returns the path."""

    @abstractmethod
    def load(self, path: str | os.PathLike[str], *, module: torch.nn.Module | None = None) -> StageCallable:
        """A callable from an engine file written by :meth:`export` (``module``: see ``needs_module``)."""

    def __repr__(self) -> str:
        return f"<accel backend {self.name!r}>"


class EagerBackend(Backend):
    """No compilation: the stage module itself. Its engine file only records the stage signature."""

    name = "eager"
    suffix = ".json"
    needs_module = True
    binds_weights = True

    def compile(
        self, module: torch.nn.Module, example_inputs: Sequence[torch.Tensor], *, strict: bool = False
    ) -> StageCallable:
        return module

    def export(
        self, module: torch.nn.Module, example_inputs: Sequence[torch.Tensor], path: str | os.PathLike[str]
    ) -> Path:
        import json

        signature = getattr(module, "graph_signature", None)
        text = signature() if callable(signature) else json.dumps({"module": type(module).__name__})
        return write_text_atomic(path, text + "\n")

    def load(self, path: str | os.PathLike[str], *, module: torch.nn.Module | None = None) -> StageCallable:
        if module is None:
            raise BackendError("the eager backend runs the stage module itself: pass module=.")
        return module


class InductorBackend(Backend):
    """``torch.compile`` (inductor), default mode: the runtime replays the result as a CUDA graph itself
    (:class:`accel.compile.runner.CUDAGraphCallable`), one mechanism for every backend and every stage.

    ``export`` compiles, runs once and saves inductor's portable cache artifacts
    (``torch.compiler.save_cache_artifacts``) with the kernels' tuned launch parameters
    (:mod:`accel.compile.launches`); ``load`` installs them and compiles ``module`` again, which then hits
    the cache instead of generating code. The module is needed: the file holds no weights.
    """

    name = "inductor"
    suffix = ".inductor"
    needs_module = True
    binds_weights = True
    tunable = True

    def __init__(self, mode: str | None = None, regional: bool = False) -> None:
        self.mode = mode
        self.regional = regional

    def compile(
        self, module: torch.nn.Module, example_inputs: Sequence[torch.Tensor], *, strict: bool = False
    ) -> StageCallable:
        how = self._how()
        repeated = _repeated_blocks(module) if self.regional else []
        if repeated:
            # Regional compilation: each repeated block compiles once and is reused (shorter cold start).
            for block in repeated:
                block.compile(fullgraph=strict, dynamic=False, **how)
            return module
        return torch.compile(module, fullgraph=strict, dynamic=False, **how)

    def _how(self) -> dict[str, Any]:
        """``torch.compile``'s ``mode`` or ``options`` (it takes one of them, not both)."""
        options: dict[str, bool] = self.tuning.inductor_options()
        if self.tuning.coordinate_descent:
            options.update(SEARCHED_KERNELS_LAUNCHER)
        if options and self.mode is not None:
            raise BackendError(
                f"inductor mode {self.mode!r} and tuning ({self.tuning.describe()}) cannot be combined: "
                "torch.compile takes a mode or options, not both."
            )
        return {"options": options} if options else {"mode": self.mode}

    def export(
        self, module: torch.nn.Module, example_inputs: Sequence[torch.Tensor], path: str | os.PathLike[str]
    ) -> Path:
        saved = self._compile_and_save(module, example_inputs)
        if saved is None:
            # Compiled before in this process: dynamo served its code without compiling, so there was
            # nothing to record. Forget compiled code (it compiles again from the cache when next called).
            logger.info(
                "inductor: the stage was compiled before in this process; compiling it again to save it"
            )
            torch._dynamo.reset()
            saved = self._compile_and_save(module, example_inputs)
        if saved is None:
            raise BackendError("inductor produced no cache artifacts to save (was the stage compiled?).")
        blob, info = saved
        tuned = launches.tuned_launches(info)
        if self.tuning.searches:  # what a load can restore instead of searching again
            logger.info("inductor %s: %d tuned kernel launch file(s) carried", Path(path).name, len(tuned))
        with atomic_path(path) as tmp:
            Path(tmp).write_bytes(launches.pack(blob, tuned))
        return Path(path)

    def _compile_and_save(self, module: torch.nn.Module, example_inputs: Sequence[torch.Tensor]) -> Any:
        with _fresh_cache_artifacts():
            fn = self.compile(module, example_inputs, strict=True)
            with torch.no_grad():
                fn(*example_inputs)
            return torch.compiler.save_cache_artifacts()

    def load(self, path: str | os.PathLike[str], *, module: torch.nn.Module | None = None) -> StageCallable:
        if module is None:
            raise BackendError("the inductor backend compiles the stage module from its cache: pass module=.")
        artifacts, tuned = launches.unpack(Path(path).read_bytes())
        torch.compiler.load_cache_artifacts(artifacts)
        launches.restore(tuned)  # after torch's own entries, which they replace
        # With the tuning the file was built with (the store passes it), or the cache would not match.
        return torch.compile(module, dynamic=False, **self._how())


def _fresh_cache_artifacts() -> Any:
    """Record only this stage's cache artifacts: torch collects them per process, so without this every
    engine file would also hold the stages exported before it in the same ``accel export``."""
    import contextlib

    try:
        from torch.compiler._cache import CacheArtifactManager

        return CacheArtifactManager.with_fresh_cache()
    except (ImportError, AttributeError):  # torch without the recorder's scoping: files overlap, still valid
        return contextlib.nullcontext()


def _repeated_blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """Blocks listed in diffusers' ``_repeated_blocks`` (transformer blocks), for regional compilation."""
    model = stage_model(module)
    names = set(getattr(model, "_repeated_blocks", ()) or ())
    if not names:
        return []
    return [m for m in model.modules() if type(m).__name__ in names]


class AOTBackend(Backend):
    """``torch.export`` + AOTInductor: one ``.pt2`` package per stage, no Python graph.

    Packages hold the generated code only, not the weights: at load, the compiled model is bound to the
    live module's parameters and buffers (the same memory, no copy). An SDXL U-Net's weights would
    otherwise sit twice on the GPU and make every package 5 GB. A package therefore serves any weights
    of the graph it was compiled for (a fine-tune, a fused LoRA): the engine store records the weights'
    fingerprint to report a difference, not to refuse it. Weights edited in place are seen by the next
    call (same memory); tensors replaced after loading are bound again with ``rebind``.
    """

    name = "aot"
    suffix = ".pt2"
    needs_module = True
    binds_weights = True
    tunable = True

    #: Child-process check of torch's package loader before the first CUDA load (see ``check_loader``).
    LOADER_CHECK = (
        "import sys; from accel.compile.backends import load_aoti_package; "
        "load_aoti_package(sys.argv[1], int(sys.argv[2]))"
    )

    def __init__(self) -> None:
        self._loader_problem: str | None = None
        self._loader_checked = False

    def check_loader(self, path: str | os.PathLike[str], device_index: int, timeout: float = 300.0) -> None:
        """Load ``path`` once in a child process (onto CUDA device ``device_index``, or -1 for a CPU
        package); ``BackendError`` if that fails or crashes.

        Some CUDA builds of torch crash (SIGSEGV) inside AOTInductor's package loader for every package
        (torch 2.11.0+cu130 on our GPU host without :mod:`accel.compile.cxxruntime`). In this process that
        would kill the rank with no message; checked in a child first, it is an error that names the cause
        and the fix. The outcome is kept for this backend instance, and a passed check is remembered in
        accel's cache folder (:func:`loader_check_marker`) so later processes of the same interpreter and
        torch build skip the child (it costs a second interpreter start and torch import). Processes of
        one machine take turns (:mod:`accel.compile.loader_check`), so one check serves them all.
        """
        if not self._loader_checked:
            marker = loader_check_marker(self.LOADER_CHECK)
            if not marker.exists():
                # Another process of this machine may be checking now (a rank, or the check `accel run`
                # started in the background): wait for its verdict instead of checking beside it.
                with check_lock(timeout):
                    if not marker.exists():
                        self._loader_problem = self._load_in_child(path, device_index, timeout)
                        if self._loader_problem is None:
                            _remember(marker)
            self._loader_checked = True
        if self._loader_problem is not None:
            raise BackendError(self._loader_problem)

    def _load_in_child(self, path: str | os.PathLike[str], device_index: int, timeout: float) -> str | None:
        """Load ``path`` in a child process running ``LOADER_CHECK``; what went wrong, or ``None``."""
        started = time.perf_counter()
        cmd = [sys.executable, "-c", self.LOADER_CHECK, str(path), str(device_index)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
            code, detail = proc.returncode, (proc.stderr or "").strip().splitlines()[-1:]
        except subprocess.TimeoutExpired:
            code, detail = None, [f"no answer after {timeout:g} s"]
        logger.info("aot loader check in a child process: %.1f s", time.perf_counter() - started)
        if code == 0:
            return None
        how = f"crashed (signal {-code})" if code is not None and code < 0 else "failed"
        return (
            f"torch {torch.__version__} cannot load AOTInductor packages on this machine: loading "
            f"{Path(path).name} in a child process {how}{': ' + detail[0] if detail else ''}. Use "
            "--backend inductor (accel export PLAN --backend inductor) instead; see "
            "docs/troubleshooting.md."
        )

    def _exported(self, module: torch.nn.Module, example_inputs: Sequence[torch.Tensor]) -> Any:
        with torch.no_grad():
            return torch.export.export(module, tuple(example_inputs), strict=False)

    def compile(
        self, module: torch.nn.Module, example_inputs: Sequence[torch.Tensor], *, strict: bool = False
    ) -> StageCallable:
        if self._loader_problem is not None:  # known not to load here: skip minutes of compilation
            raise BackendError(self._loader_problem)
        # Keep the package until the callable is gone (the loader may read it lazily).
        tmp = tempfile.mkdtemp(prefix="accel-aot-")
        try:
            fn = self.load(self.export(module, example_inputs, Path(tmp) / "stage.pt2"), module=module)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        weakref.finalize(fn, shutil.rmtree, tmp, ignore_errors=True)
        return fn

    def export(
        self, module: torch.nn.Module, example_inputs: Sequence[torch.Tensor], path: str | os.PathLike[str]
    ) -> Path:
        import torch._inductor

        on_cpu = all(t.device.type == "cpu" for t in (*example_inputs, *module.parameters()))
        if self.tuning.autotune and on_cpu:
            # Inductor's C++ GEMM templates pack the weights into new constants of the package, which then
            # no longer reads the module's own weights (what makes an aot engine serve any weights).
            raise BackendError(
                "aot autotuning on CPU packs the weights into the package, which must hold code only: "
                "export CPU engines without autotune in --tune (autotuning applies to GPU stages)."
            )
        started = time.perf_counter()
        program = self._exported(module, example_inputs)
        traced = time.perf_counter()
        # Every weight stays a constant bound at load: by default inductor inlines 1-d tensors of up to 8
        # values (biases and norm weights of narrow layers) into the generated code, which would then
        # keep the exported values whatever weights the package is bound to.
        configs: dict[str, Any] = {
            "aot_inductor.package_constants_in_so": False,
            "always_keep_tensor_constants": True,
            **self.tuning.inductor_options(),
        }
        with atomic_path(path, suffix=".pt2") as tmp:  # AOTInductor wants a .pt2 name
            torch._inductor.aoti_compile_and_package(program, package_path=tmp, inductor_configs=configs)
        logger.info(
            "aot %s: traced in %.1f s, compiled and packaged in %.1f s",
            Path(path).name,
            traced - started,
            time.perf_counter() - traced,
        )
        return Path(path)

    def load(self, path: str | os.PathLike[str], *, module: torch.nn.Module | None = None) -> StageCallable:
        if module is None:
            raise BackendError(f"{path}: an aot package holds no weights; load it with module=<the stage>")
        device = next((p.device for p in module.parameters()), None)
        index = -1
        if device is not None and device.type == "cuda":
            # The package names the device it was compiled on; load it onto this rank's device instead.
            index = device.index if device.index is not None else torch.cuda.current_device()
            self.check_loader(path, index)
        started = time.perf_counter()
        runner = load_aoti_package(path, index)
        loaded = time.perf_counter()
        bound = _BoundPackage(runner, module, path)
        logger.info(
            "aot %s: package loaded in %.2f s, weights bound in %.2f s",
            Path(path).name,
            loaded - started,
            time.perf_counter() - loaded,
        )
        return bound


def load_aoti_package(path: str | os.PathLike[str], device_index: int) -> Any:
    """Open an AOTInductor package as accel runs it: on CUDA device ``device_index`` (-1: a CPU package),
    with a single-threaded runner, after sharing the process's C++ runtime.

    The single-threaded runner: the default one's model pool synchronises between threads, which a stream
    under CUDA-graph capture does not permit, and accel calls a stage from one thread. A CUDA package is
    opened by torch's package loader itself, not through ``torch._inductor.aoti_load_package``: that one
    first asks for the CPU's vector ISA only to warn when it differs from the package's, and the question
    compiles and runs a test program per ISA the CPU names (40 s and more with a fresh inductor cache on
    our GPU host; ``cpp.vec_isa_ok`` does not skip the AVX-512 and AMX probes). The GPU a package was built
    for is part of the engine's graph identity, checked before any package is opened.
    """
    import torch._inductor

    share_libstdcxx()  # before the package's own library is opened (see accel.compile.cxxruntime)
    if device_index < 0:
        return torch._inductor.aoti_load_package(str(path), run_single_threaded=True)
    from torch._inductor.package.package import AOTICompiledModel

    loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", True, 1, device_index)
    return AOTICompiledModel(loader)


def loader_check_marker(check: str) -> Path:
    """Where a passed AOTInductor loader check is remembered: a file in accel's cache folder
    (:func:`accel.compile.loader_check.cache_folder`) named by a hash of the interpreter, the torch build,
    the C++ runtime it loaded and the check itself (the file holds the first two, see ``_remember``)."""
    identity = [sys.executable, torch.__version__, str(torch.version.cuda), loaded_libstdcxx() or "", check]
    digest = hashlib.sha256("\0".join(identity).encode()).hexdigest()[:16]
    return cache_folder() / f"{MARKER_PREFIX}{digest}"


def check_loader_here(path: str | os.PathLike[str]) -> None:
    """The background check (:data:`accel.compile.loader_check.BACKGROUND_CHECK`): open the CUDA package
    ``path`` in this process, as ``AOTBackend.LOADER_CHECK`` does in its child, and remember the pass.

    A crash ends this process and leaves no marker: the worker then checks for itself and reports why.
    """
    marker = loader_check_marker(AOTBackend.LOADER_CHECK)
    if marker.exists() or not torch.cuda.is_available():
        return
    load_aoti_package(path, 0)
    _remember(marker)


def _remember(marker: Path) -> None:
    """Leave ``marker``, naming the interpreter and torch build it is for (what a process that has not
    imported torch yet can compare: :func:`accel.compile.loader_check.probably_checked`)."""
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(
            marker, json.dumps({"executable": sys.executable, "torch": torch.__version__}) + "\n"
        )
    except OSError as exc:  # an unwritable cache only costs the check again next time
        logger.debug("could not write %s: %s", marker, exc)


class _BoundPackage:
    """An AOTInductor model bound to the stage's own tensors (``user_managed``: it reads them through raw
    pointers, so this object holds them for as long as the model can run)."""

    def __init__(self, runner: Any, module: torch.nn.Module, path: str | os.PathLike[str]) -> None:
        self._runner = runner
        self._names = list(runner.get_constant_fqns())
        self._path = path
        self._constants: dict[str, torch.Tensor] = {}
        self.rebind(module)

    def rebind(self, module: torch.nn.Module) -> None:
        """Point the model at ``module``'s current tensors (after parameters were replaced by new ones).

        The raw pointers are taken as they are: a replacement of another shape or dtype is a graph change,
        which the caller refuses before asking for this.
        """
        constants = _module_constants(module, self._names, self._path)
        self._runner.load_constants(constants, check_full_update=True, user_managed=True)
        self._constants = constants

    def __call__(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _as_tuple(self._runner(*tensors))


def _module_constants(module: torch.nn.Module, names: Sequence[str], path: str | os.PathLike[str]) -> dict:
    """The module's tensors for each constant name a compiled package asks for."""
    tensors: dict[str, torch.Tensor] = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))
    found: dict[str, torch.Tensor] = {}
    missing = []
    for name in names:
        value = tensors.get(name)
        if value is None:  # a plain tensor attribute, lifted as a constant by torch.export
            value = _attribute(module, name)
        if not isinstance(value, torch.Tensor):
            missing.append(name)
            continue
        found[name] = value.detach()
    if missing:
        raise BackendError(
            f"{path}: the stage has no tensor for the package's constants {missing[:5]}; the package was "
            "exported from another module; export it again (accel export --rebuild)"
        )
    return found


def _attribute(module: torch.nn.Module, name: str) -> Any:
    value: Any = module
    for part in name.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value


class OnnxBackend(Backend):
    """``torch.onnx.export`` (dynamo exporter) run with onnxruntime; checked against eager at export."""

    name = "onnx"
    suffix = ".onnx"

    def __init__(self, check_tolerance: float | None = 1e-3) -> None:
        self.check_tolerance = check_tolerance

    def available(self) -> str | None:
        for mod, extra in (("onnx", "onnx"), ("onnxruntime", "onnxruntime"), ("onnxscript", "onnxscript")):
            if importlib.util.find_spec(mod) is None:
                return f"{mod} is not installed; pip install 'accel[onnx]' (or {extra})."
        return None

    def version(self) -> str | None:
        return _version("onnxruntime")

    def compile(
        self, module: torch.nn.Module, example_inputs: Sequence[torch.Tensor], *, strict: bool = False
    ) -> StageCallable:
        self.check_available()
        with tempfile.TemporaryDirectory(prefix="accel-onnx-") as tmp:
            path = self.export(module, example_inputs, Path(tmp) / "stage.onnx")
            return self.load(path)

    def export(
        self, module: torch.nn.Module, example_inputs: Sequence[torch.Tensor], path: str | os.PathLike[str]
    ) -> Path:
        self.check_available()
        names = list(getattr(module, "input_names", ())) or [f"input_{i}" for i in range(len(example_inputs))]
        with atomic_path(path, suffix=".onnx") as tmp:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    module,
                    tuple(example_inputs),
                    tmp,
                    input_names=[n.replace(".", "_") for n in names],
                    dynamo=True,
                    external_data=False,
                    verbose=False,
                )
            if self.check_tolerance is not None:
                self._check(module, example_inputs, tmp)
        return Path(path)

    def _check(self, module: torch.nn.Module, example_inputs: Sequence[torch.Tensor], path: str) -> None:
        with torch.no_grad():
            expected = _as_tuple(module(*example_inputs))
        got = self.load(path)(*example_inputs)
        for i, (e, g) in enumerate(zip(expected, got, strict=True)):
            err = (e.float() - g.float()).abs().max().item() if e.numel() else 0.0
            if err > self.check_tolerance:  # type: ignore[operator]
                raise BackendError(
                    f"onnxruntime output {i} differs from eager by {err:.3g} (> {self.check_tolerance}); "
                    "the ONNX export is wrong for this stage."
                )

    def load(self, path: str | os.PathLike[str], *, module: torch.nn.Module | None = None) -> StageCallable:
        self.check_available()
        import onnxruntime as ort

        options = ort.SessionOptions()
        # Spinning worker threads otherwise steal every core between calls.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        session = ort.InferenceSession(str(path), sess_options=options, providers=_onnx_providers(ort))
        input_names = [i.name for i in session.get_inputs()]

        def call(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
            feed = {n: t.detach().cpu().numpy() for n, t in zip(input_names, tensors, strict=True)}
            device = tensors[0].device if tensors else torch.device("cpu")
            return tuple(torch.from_numpy(o).to(device) for o in session.run(None, feed))

        return call


def _onnx_providers(ort: Any) -> list[str]:
    available = ort.get_available_providers()
    wanted = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return wanted or list(available)


class TensorRTBackend(Backend):
    """torch-tensorrt (optional extra): ``torch_tensorrt.compile`` / ``save`` / ``load`` of an export.

    The TensorRT library needs a CUDA build of torch; ``available()`` says what is missing.
    """

    name = "tensorrt"
    suffix = ".ep"
    module_name = "torch_tensorrt"

    def _module(self) -> Any:
        try:
            return importlib.import_module(self.module_name)
        except ImportError as exc:
            raise BackendUnavailableError(
                f"backend 'tensorrt' is unavailable: cannot import {self.module_name} ({exc}). "
                f"Install it with {TENSORRT_INSTALL}."
            ) from exc

    def available(self) -> str | None:
        try:
            self._module()
        except BackendUnavailableError as exc:
            return str(exc).removeprefix("backend 'tensorrt' is unavailable: ")
        if not torch.cuda.is_available():
            return (
                f"TensorRT needs a CUDA device and a CUDA build of torch (this torch is {torch.__version__})."
            )
        return None

    def version(self) -> str | None:
        return getattr(self._module(), "__version__", None)

    def compile(
        self, module: torch.nn.Module, example_inputs: Sequence[torch.Tensor], *, strict: bool = False
    ) -> StageCallable:
        self.check_available()
        trt = self._module()
        with torch.no_grad():
            return trt.compile(module, ir="dynamo", inputs=list(example_inputs), min_block_size=1)

    def export(
        self, module: torch.nn.Module, example_inputs: Sequence[torch.Tensor], path: str | os.PathLike[str]
    ) -> Path:
        trt = self._module()
        compiled = self.compile(module, example_inputs, strict=True)
        with atomic_path(path, suffix=self.suffix) as tmp:
            trt.save(compiled, tmp, inputs=list(example_inputs))
        return Path(path)

    def load(self, path: str | os.PathLike[str], *, module: torch.nn.Module | None = None) -> StageCallable:
        self.check_available()
        loaded = self._module().load(str(path))
        runner = loaded.module() if hasattr(loaded, "module") else loaded

        def call(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return _as_tuple(runner(*tensors))

        return call


_BACKENDS: dict[str, Callable[[], Backend]] = {
    "eager": EagerBackend,
    "inductor": InductorBackend,
    "aot": AOTBackend,
    "onnx": OnnxBackend,
    "tensorrt": TensorRTBackend,
}
BACKEND_NAMES: tuple[str, ...] = tuple(_BACKENDS)
#: backends whose ``export`` writes a self-contained engine file usable by ``accel export``
EXPORT_BACKENDS: tuple[str, ...] = ("aot", "inductor", "onnx", "tensorrt")


def get_backend(name: str | Backend, tuning: Tuning | None = None) -> Backend:
    """The backend called ``name`` (a :class:`Backend` instance is returned as is), building stages with
    ``tuning`` when given (:meth:`Backend.tuned`)."""
    if isinstance(name, Backend):
        backend = name
    else:
        factory = _BACKENDS.get(name)
        if factory is None:
            raise ValueError(f"unknown compile backend {name!r}; valid backends: {', '.join(BACKEND_NAMES)}.")
        backend = factory()
    return backend if tuning is None else backend.tuned(tuning)


def compile_stage(
    backend: str | Backend,
    module: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    stage: str,
    strict: bool = False,
) -> StageCallable:
    """``backend.compile`` with the per-stage fallback: on failure warn (naming ``stage``) and run eager.

    With ``strict=True`` the failure is raised as a :class:`BackendError` naming the stage.
    """
    impl = get_backend(backend)
    try:
        impl.check_available()
        return impl.compile(module, example_inputs, strict=strict)
    except Exception as exc:
        message = f"stage {stage}: backend {impl.name!r} failed ({type(exc).__name__}: {exc})"
        if strict:
            raise BackendError(message + "; strict=True, so not falling back to eager.") from exc
        warnings.warn(message + "; running this stage eagerly.", RuntimeWarning, stacklevel=2)
        logger.warning("%s; running this stage eagerly.", message)
        return module
