"""Hooks that run the denoiser and the VAE decoder through compiled stage callables.

:class:`CompiledDenoiserHook` sits innermost on the denoiser (below the CFG-split or hybrid hook, which
call it with their slice of the batch): each call runs the whole-denoiser stage ``cfg.full.<H>x<W>.b<B>``
of a :class:`~accel.compile.runner.StageRunner`. :class:`CompiledDecoderHook` does the same for
``vae.decoder``, on a private copy of the decoder made at wrap time, because pipelines such as SDXL's cast
the VAE to fp32 and back on every call (new weight tensors each time, which a captured graph cannot follow).
Weights loaded into the pipeline's VAE after wrapping are copied into that private copy before the next
decode, so the compiled decoder never serves the old ones.

Calls the compiled stage cannot serve (gradients enabled, other non-tensor arguments than the ones the
stage was built with) run the original forward, with one warning.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import torch
from diffusers.hooks import ModelHook

from accel.compile.engines import decoder_key, engine_stages
from accel.compile.runner import BoundWeights, StageRunner, StaleWeightsError
from accel.compile.stage import DecoderStage, StageError, StageModule, build_stage
from accel.models import DenoiserAdapter, InputShape, adapt
from accel.runtime.guidance import _map_output
from accel.tree import leaves

log = logging.getLogger(__name__)

COMPILED_HOOK = "accel.compiled"
DECODER_HOOK = "accel.compiled_decoder"


def tensor_signature(tree: Any) -> tuple[Any, ...]:
    """Paths with the shapes and dtypes of every tensor in ``tree`` (nested dicts/lists/tuples), and the
    values (or type names) of the other leaves, in order."""

    def signature(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor):
            return (tuple(leaf.shape), leaf.dtype)
        if leaf is None or isinstance(leaf, bool | int | float | str):
            return leaf
        return type(leaf).__name__

    return tuple((path, signature(leaf)) for path, leaf in leaves(tree))


class CompiledDenoiserHook(ModelHook):
    """Runs the denoiser's forward as the compiled whole-denoiser stage of ``runner``.

    Args:
        runner: compiles or loads the stage callables.
        vae_scale_factor: pixels per latent, to name the stage's image size as ``accel plan`` does.
    """

    _is_stateful = False

    def __init__(self, runner: StageRunner, vae_scale_factor: int = 8) -> None:
        super().__init__()
        self.runner = runner
        self.vae_scale_factor = vae_scale_factor
        self.adapter: DenoiserAdapter | None = None
        self._stages: dict[tuple[Any, ...], tuple[StageModule, Callable[..., Any], Any]] = {}
        self._warned: set[str] = set()

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        forward = self.fn_ref.original_forward
        assert forward is not None, "the hook registry sets original_forward for hooks with new_forward"
        if torch.is_grad_enabled():
            return forward(*args, **kwargs)
        if self.adapter is None:
            self.adapter = adapt(module)
        sample = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if sample is None:
            sample = kwargs.get("sample", kwargs.get("hidden_states"))
        if not isinstance(sample, torch.Tensor) or sample.dim() != 4:
            return self._eager(forward, args, kwargs, "the first input is not a 4-d latent")
        shape = InputShape.of_latents(sample, self.vae_scale_factor)
        [whole] = engine_stages((), len(self.adapter.units), shape)
        key = whole.key
        memo = (key, tensor_signature(args), tensor_signature(kwargs))
        entry = self._stages.get(memo)
        if entry is None:
            stage, inputs = build_stage(self.adapter, whole.lo, whole.hi, args, kwargs, whole=True)
            fn = self.runner.get(key, stage, inputs, cache_key=memo)
            # One eager call gives the output structure (tuple or output class) to return later.
            template = forward(*args, **kwargs)
            entry = self._stages[memo] = (stage, fn, template)
        stage, fn, template = entry
        try:
            flat = stage.forward_inputs(*args, **kwargs)
        except StageError as exc:
            return self._eager(forward, args, kwargs, str(exc))
        # A copy: compiled outputs are reused by the next call, and schedulers may keep predictions.
        prediction = fn(*flat)[0].clone()
        return _map_output(template, lambda _t: prediction)

    def _eager(self, forward: Callable[..., Any], args: Any, kwargs: Any, why: str) -> Any:
        if why not in self._warned:
            self._warned.add(why)
            log.warning("denoiser call runs eagerly: %s", why)
        return forward(*args, **kwargs)


class CompiledDecoderHook(ModelHook):
    """Runs ``vae.decoder(z)`` through ``runner`` on a private copy of the decoder.

    The copy is taken when the hook is made (wrap time) and cast to the dtype ``z`` arrives in, so the
    pipeline's own fp32 upcasting of the VAE changes nothing for the compiled decoder. Weights loaded into
    the VAE after wrapping (in place, or as new tensors) are copied into the private copies, in place,
    before the next decode: compiled stages bound to them follow, and engines holding their own weights
    are refused (:meth:`StageRunner.check_weights`). A decoder of another structure is refused.
    """

    _is_stateful = False

    def __init__(self, runner: StageRunner, decoder: torch.nn.Module) -> None:
        super().__init__()
        self.runner = runner
        self._source = copy.deepcopy(decoder).eval().requires_grad_(False)
        self._copies: dict[torch.dtype, DecoderStage] = {}
        # Object identity and in-place edits only: the pipeline's upcasting swaps storage on every call.
        self._live = BoundWeights(decoder, storage=False, edits=True)

    def _follow(self, decoder: torch.nn.Module) -> None:
        """Copy the pipeline decoder's current weights into the private copies (in place)."""
        changed = self._live.changed()
        if not changed:
            return
        state = decoder.state_dict()
        try:
            with torch.no_grad():
                for target in (self._source, *(stage.decoder for stage in self._copies.values())):
                    target.load_state_dict(state)  # copy_: casts to each copy's dtype, keeps its memory
        except RuntimeError as exc:
            raise StaleWeightsError(
                f"the VAE decoder was changed after wrapping into one of another structure ({exc}); wrap the "
                "pipeline again (accel.unwrap, then accel.wrap)."
            ) from None
        self._live = BoundWeights(decoder, storage=False, edits=True)
        log.warning("VAE decoder weights changed after wrapping (%s); its compiled copy follows", changed[0])
        self.runner.check_weights()  # engines that hold their own weights refuse the edited copies

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        forward = self.fn_ref.original_forward
        assert forward is not None, "the hook registry sets original_forward for hooks with new_forward"
        extra = [v for v in (*args[1:], *kwargs.values()) if v is not None]
        if torch.is_grad_enabled() or len(args) != 1 or not isinstance(args[0], torch.Tensor) or extra:
            return forward(*args, **kwargs)
        z = args[0]
        self._follow(module)
        stage = self._copies.get(z.dtype)
        if stage is None:
            # A copy per dtype: Module.to casts in place, and the source must stay as it was.
            decoder = copy.deepcopy(self._source).to(z.device, z.dtype)
            stage = self._copies[z.dtype] = DecoderStage(decoder)
        key = decoder_key(z)
        fn = self.runner.get(key, stage, (z,), cache_key=(key, str(z.device)))
        return fn(z)[0].clone()
