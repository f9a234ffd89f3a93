"""Sequence parallelism for MMDiT denoisers (SD3): exact attention with the image tokens sharded.

A block of ``s`` ranks that shares one part of the batch (:mod:`accel.runtime.groups`) runs the denoiser
together. After the patch embedding each rank keeps a contiguous ``1/s`` of the image tokens and runs every
transformer block on them; everything in a block except attention acts on each token alone. Attention is
Ulysses-style: each rank projects its tokens to queries, keys and values for all ``H`` heads, one
all-to-all trades tokens for heads so that each rank holds every image token for ``H/s`` heads, the rank
attends over ``[image; text]`` tokens for those heads exactly as diffusers' ``JointAttnProcessor2_0`` does,
and a second all-to-all trades heads back for tokens. The text stream (a few hundred tokens) is not
sharded: every rank computes it whole, takes its heads' slice for attention, and the text attention output
is all-gathered over heads. After the last block each rank projects its tokens to patches, one all-gather
assembles them, and every rank unpatchifies the whole latent.

The attention processor is installed on every attention module when the CFG hook is registered and the
original processors are put back when it is removed. Outside a sharded forward it calls the original
processor, so the model computes exactly what it did before.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from accel.models import SD3Adapter, adapt
from accel.models.base import UnsupportedModelError
from accel.runtime.comm import Communicator

log = logging.getLogger(__name__)

#: ``joint_attention_kwargs`` keys a sharded forward supports (``scale`` is the LoRA scale, used by prepare).
SUPPORTED_ATTENTION_KWARGS = frozenset({"scale"})


class _Active:
    """The block communicator while a sharded forward runs (``None`` otherwise); shared by the processors."""

    def __init__(self) -> None:
        self.comm: Communicator | None = None


class UlyssesJointAttnProcessor:
    """Joint (image + text) attention with the image tokens sharded over a block of ranks.

    Args:
        original: the processor it replaces, called whenever no sharded forward is running.
        active: holds the block communicator during a sharded forward.
    """

    def __init__(self, original: Any, active: _Active) -> None:
        self.original = original
        self._active = active

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        comm = self._active.comm
        if comm is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if attention_mask is not None or args or kwargs:
            raise ValueError(
                "sequence-parallel attention got an attention mask or extra attention arguments "
                f"({sorted(kwargs)}), which it does not implement; the hook should have run this part "
                "unsharded. Please report this with the pipeline call that triggered it."
            )
        return ulysses_joint_attention(attn, hidden_states, encoder_hidden_states, comm)


def _heads(
    x: torch.Tensor, projections: tuple[Any, Any, Any], norm_q: Any, norm_k: Any, heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values of ``x`` split into heads (``[B, H, T, d]``), normalised as diffusers does."""
    batch = x.shape[0]
    query, key, value = (proj(x) for proj in projections)
    head_dim = key.shape[-1] // heads
    query, key, value = (t.view(batch, -1, heads, head_dim).transpose(1, 2) for t in (query, key, value))
    if norm_q is not None:
        query = norm_q(query)
    if norm_k is not None:
        key = norm_k(key)
    return query, key, value


def ulysses_joint_attention(
    attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None, comm: Communicator
) -> Any:
    """``JointAttnProcessor2_0`` on this rank's image-token shard; returns what it returns for the shard
    (the text output, when there is text, whole on every rank)."""
    size, rank = comm.world_size, comm.rank
    batch, tokens = hidden_states.shape[:2]
    heads = attn.heads
    local_heads = heads // size
    query, key, value = _heads(
        hidden_states, (attn.to_q, attn.to_k, attn.to_v), attn.norm_q, attn.norm_k, heads
    )
    head_dim = key.shape[-1]
    # [3, B, H, n, d] -> one chunk per rank holding its heads: [s, 3, B, H/s, n, d].
    qkv = torch.stack([query, key, value]).view(3, batch, size, local_heads, tokens, head_dim)
    received = comm.all_to_all(qkv.permute(2, 0, 1, 3, 4, 5))
    # Chunk i holds token shard i: concatenating them in rank order restores the original token order.
    full = received.permute(1, 2, 3, 0, 4, 5).reshape(3, batch, local_heads, size * tokens, head_dim)
    query, key, value = full.unbind(0)
    mine = slice(rank * local_heads, (rank + 1) * local_heads)
    if encoder_hidden_states is not None:
        text_q, text_k, text_v = _heads(
            encoder_hidden_states,
            (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj),
            attn.norm_added_q,
            attn.norm_added_k,
            heads,
        )
        query = torch.cat([query, text_q[:, mine]], dim=2)
        key = torch.cat([key, text_k[:, mine]], dim=2)
        value = torch.cat([value, text_v[:, mine]], dim=2)
    out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
    out = out.to(query.dtype)
    image = out[:, :, : size * tokens]
    # [B, H/s, s*n, d] -> one chunk per token shard: [s, B, n, H/s, d]; back, chunk i holds heads group i.
    back = comm.all_to_all(image.reshape(batch, local_heads, size, tokens, head_dim).permute(2, 0, 3, 1, 4))
    hidden_states = back.permute(1, 2, 0, 3, 4).reshape(batch, tokens, heads * head_dim)
    text_out: torch.Tensor | None = None
    if encoder_hidden_states is not None:
        text = out[:, :, size * tokens :].contiguous()  # [B, H/s, T, d]
        gathered = comm.all_gather(text, reuse=False).view(size, *text.shape)
        text_out = gathered.permute(1, 3, 0, 2, 4).reshape(batch, text.shape[2], heads * head_dim)
        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
    hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)
    if text_out is not None:
        return hidden_states, text_out
    return hidden_states


def _attention_modules(model: torch.nn.Module) -> list[tuple[str, Any]]:
    from diffusers.models.attention_processor import Attention

    return [(name, m) for name, m in model.named_modules() if isinstance(m, Attention)]


def model_problem(model: torch.nn.Module) -> str | None:
    """Why ``model`` cannot run sequence-parallel at all (``None``: it can, given suitable sizes)."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    try:
        adapter = adapt(model)
    except UnsupportedModelError as exc:
        return f"{type(model).__name__} has no adapter ({exc})"
    if not isinstance(adapter, SD3Adapter):
        return (
            f"{type(model).__name__} is a U-Net: its convolutions mix neighbouring pixels, so an exact "
            "split of one image needs a halo exchange per convolution, and patch parallelism is approximate"
        )
    modules = _attention_modules(model)
    if not modules:
        return f"{type(model).__name__} has no diffusers Attention modules"
    for name, attn in modules:
        processor = attn.processor
        if type(processor) not in (JointAttnProcessor2_0, UlyssesJointAttnProcessor):
            return (
                f"{name} uses {type(processor).__name__}; sequence parallelism replaces only diffusers' "
                "JointAttnProcessor2_0 (unfuse QKV projections and remove custom or IP-Adapter processors)"
            )
    return None


def size_problem(model: torch.nn.Module, size: int, latent_hw: tuple[int, int] | None = None) -> str | None:
    """Why a block of ``size`` ranks cannot share ``model``'s tokens evenly (``None``: it can).

    ``latent_hw`` is the latent's height and width; the image tokens are ``(h / patch) * (w / patch)``.
    """
    for name, attn in _attention_modules(model):
        if attn.heads % size:
            return (
                f"{name} has {attn.heads} attention heads, which {size} ranks cannot share evenly "
                f"(each would need {attn.heads}/{size}); choose a device count whose ranks per batch part "
                f"divide {attn.heads}"
            )
    if latent_hw is not None:
        patch = int(getattr(model.config, "patch_size", 1))
        tokens = (latent_hw[0] // patch) * (latent_hw[1] // patch)
        if tokens % size:
            return (
                f"{tokens} image tokens ({latent_hw[0]}x{latent_hw[1]} latent, patch {patch}) do not divide "
                f"among {size} ranks; choose a resolution whose token count is a multiple of {size}"
            )
    return None


class SequenceParallel:
    """Sharded forward of one SD3-like DiT over a block of ranks (see the module docstring).

    Use :meth:`install` to create it (installs the processors) and :meth:`remove` to undo that.
    """

    def __init__(self, model: torch.nn.Module, adapter: SD3Adapter) -> None:
        self.model = model
        self.adapter = adapter
        self._active = _Active()
        self._installed: list[tuple[Any, Any, UlyssesJointAttnProcessor]] = []
        self._size_problems: dict[tuple[int, tuple[int, int]], str | None] = {}

    @classmethod
    def install(cls, model: torch.nn.Module) -> tuple[SequenceParallel | None, str | None]:
        """Install the processors on ``model``; returns ``(runner, None)``, or ``(None, why not)``."""
        problem = model_problem(model)
        if problem is not None:
            return None, problem
        adapter = adapt(model)
        assert isinstance(adapter, SD3Adapter)  # model_problem checked it
        runner = cls(model, adapter)
        for _, attn in _attention_modules(model):
            original = attn.processor
            processor = UlyssesJointAttnProcessor(original, runner._active)
            attn.set_processor(processor)
            runner._installed.append((attn, original, processor))
        return runner, None

    def remove(self) -> None:
        """Put every original processor back (the same objects)."""
        for attn, original, processor in self._installed:
            if attn.processor is processor:
                attn.set_processor(original)
        self._installed = []

    def problem(self, size: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        """Why this call cannot run sharded over ``size`` ranks (``None``: it can)."""
        for attn, _, processor in self._installed:
            if attn.processor is not processor:
                return "the attention processors were replaced after wrapping (set them before accel.wrap)"
        sample = args[0] if args else kwargs.get("hidden_states")
        latent_hw = (
            tuple(sample.shape[-2:]) if isinstance(sample, torch.Tensor) and sample.dim() == 4 else None
        )
        if latent_hw is None:
            return "the first input is not a [batch, channels, height, width] latent"
        if kwargs.get("block_controlnet_hidden_states") is not None:
            return "ControlNet residuals are not sharded by the sequence-parallel forward"
        extra = set(kwargs.get("joint_attention_kwargs") or {}) - SUPPORTED_ATTENTION_KWARGS
        if extra:
            return f"joint_attention_kwargs {sorted(extra)} are not supported by sequence-parallel attention"
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.model.parameters()):
            return "gradients are enabled; the sharded forward is for inference"
        key = (size, (int(latent_hw[0]), int(latent_hw[1])))
        if key not in self._size_problems:
            self._size_problems[key] = size_problem(self.model, *key)
        return self._size_problems[key]

    @contextlib.contextmanager
    def _sharded(self, comm: Communicator) -> Iterator[None]:
        self._active.comm = comm
        try:
            yield
        finally:
            self._active.comm = None

    def forward(self, comm: Communicator, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The denoiser's output for ``args``/``kwargs`` (whole, on every rank of ``comm``), computed with
        the image tokens sharded over ``comm``'s ranks. :meth:`problem` must have returned ``None``."""
        adapter = self.adapter
        state = adapter.prepare(*args, **kwargs)
        last = len(adapter.units) - 1
        adapter.run(state, 0, 1)  # patch and text embedding, whole on every rank (one conv, one linear)
        tokens = state.carry["hidden_states"]
        per_rank = tokens.shape[1] // comm.world_size
        start = comm.rank * per_rank
        state.carry["hidden_states"] = tokens[:, start : start + per_rank].contiguous()
        with self._sharded(comm):
            adapter.run(state, 1, last)
        with adapter._lora_scaled(state):
            local = adapter.project_out(state).contiguous()  # [B, n, p*p*C]: far smaller than the tokens
        batch = local.shape[0]
        gathered = comm.all_gather(local, reuse=False).view(comm.world_size, *local.shape)
        patches = gathered.transpose(0, 1).reshape(batch, comm.world_size * per_rank, local.shape[-1])
        state.carry["sample"] = adapter.unpatchify(state, patches)
        return adapter.finish(state)
