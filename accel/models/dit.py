"""Adapter for MMDiT denoisers shaped like ``SD3Transformer2DModel`` (SD3, SD3.5): one unit per block.

Units: ``embed`` (``pos_embed`` + ``context_embedder``), ``transformer_blocks.<i>`` for every block, and
``out`` (``norm_out``, ``proj_out`` and unpatchify). Between units the carry is the two token streams,
``hidden_states`` (image) and ``encoder_hidden_states`` (text); the last block is ``context_pre_only``
and drops the text stream. The time/pooled-text embedding (``temb``), IP-Adapter projections, ControlNet
block residuals and ``skip_layers`` live in the context.
"""

from __future__ import annotations

from typing import Any

import torch

from accel.models.base import DenoiserAdapter, InputShape, SegmentState, Unit, UnsupportedModelError

REQUIRED_ATTRIBUTES = (
    "pos_embed",
    "time_text_embed",
    "context_embedder",
    "transformer_blocks",
    "norm_out",
    "proj_out",
)


def missing_dit_attributes(model: torch.nn.Module) -> list[str]:
    """Attributes of ``SD3Transformer2DModel`` that ``model`` lacks (empty: the DiT adapter applies)."""
    missing = [name for name in REQUIRED_ATTRIBUTES if getattr(model, name, None) is None]
    if "transformer_blocks" not in missing and not isinstance(model.transformer_blocks, torch.nn.ModuleList):
        missing.append("transformer_blocks as a ModuleList")
    return missing


class SD3Adapter(DenoiserAdapter):
    """``SD3Transformer2DModel``-like MMDiT as ``embed``, one unit per transformer block, ``out``."""

    family = "dit"
    context_module_paths = ("time_text_embed", "image_proj")

    def __init__(self, model: torch.nn.Module) -> None:
        missing = missing_dit_attributes(model)
        if missing:
            raise UnsupportedModelError(
                f"{type(model).__name__} is not an SD3Transformer2DModel-like DiT: missing {', '.join(missing)}."
            )
        self.model = model
        blocks: Any = model.transformer_blocks
        n = len(blocks)
        self.units = [
            Unit("embed", ("pos_embed", "context_embedder")),
            *(Unit(f"transformer_blocks.{i}", (f"transformer_blocks.{i}",)) for i in range(n)),
            Unit("out", ("norm_out", "proj_out")),
        ]
        self._pushes = [0] * len(self.units)
        self._pops = [0] * len(self.units)

    def prepare(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        pooled_projections: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        block_controlnet_hidden_states: list[torch.Tensor] | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
        skip_layers: list[int] | None = None,
    ) -> SegmentState:
        """Everything ``SD3Transformer2DModel.forward`` computes besides the units (same arguments)."""
        lora_scale = 1.0
        if joint_attention_kwargs is not None:
            # Like diffusers' apply_lora_scale: "scale" is the LoRA scale, not an attention argument.
            joint_attention_kwargs = joint_attention_kwargs.copy()
            lora_scale = joint_attention_kwargs.pop("scale", 1.0)
        m: Any = self.model
        height, width = hidden_states.shape[-2:]
        context: dict[str, Any] = {"lora_scale": lora_scale, "return_dict": return_dict}
        with self._lora_scaled(SegmentState(context=context, carry={})):
            temb = m.time_text_embed(timestep, pooled_projections)
            if joint_attention_kwargs is not None and "ip_adapter_image_embeds" in joint_attention_kwargs:
                ip_adapter_image_embeds = joint_attention_kwargs.pop("ip_adapter_image_embeds")
                ip_hidden_states, ip_temb = m.image_proj(ip_adapter_image_embeds, timestep)
                joint_attention_kwargs.update(ip_hidden_states=ip_hidden_states, temb=ip_temb)
        context.update(
            temb=temb,
            joint_attention_kwargs=joint_attention_kwargs,
            controlnet=block_controlnet_hidden_states,
            skip_layers=skip_layers,
            height=height,
            width=width,
        )
        carry = {"hidden_states": hidden_states}
        if encoder_hidden_states is not None:
            carry["encoder_hidden_states"] = encoder_hidden_states
        return SegmentState(context=context, carry=carry)

    def _step(self, index: int, state: SegmentState) -> None:
        m: Any = self.model
        ctx, carry = state.context, state.carry
        n = len(m.transformer_blocks)
        if index == 0:
            # pos_embed output is non-contiguous (flatten + transpose); diffusers makes it contiguous.
            carry["hidden_states"] = m.pos_embed(carry["hidden_states"]).contiguous()
            carry["encoder_hidden_states"] = m.context_embedder(carry["encoder_hidden_states"])
            return
        if index <= n:
            i = index - 1
            block = m.transformer_blocks[i]
            skip_layers = ctx["skip_layers"]
            hidden_states = carry["hidden_states"]
            if not (skip_layers is not None and i in skip_layers):
                encoder_hidden_states, hidden_states = block(
                    hidden_states=hidden_states,
                    encoder_hidden_states=carry["encoder_hidden_states"],
                    temb=ctx["temb"],
                    joint_attention_kwargs=ctx["joint_attention_kwargs"],
                )
                if encoder_hidden_states is None:
                    del carry["encoder_hidden_states"]
                else:
                    carry["encoder_hidden_states"] = encoder_hidden_states
            controlnet = ctx["controlnet"]
            if controlnet is not None and block.context_pre_only is False:
                interval_control = n / len(controlnet)
                hidden_states = hidden_states + controlnet[int(i / interval_control)]
            carry["hidden_states"] = hidden_states
            return
        carry["sample"] = self.unpatchify(state, self.project_out(state))

    def project_out(self, state: SegmentState) -> torch.Tensor:
        """The first half of the ``out`` unit: ``norm_out`` and ``proj_out`` of the image tokens (popped from
        the carry). Both act on each token alone, so they may run on any subset of the tokens."""
        m: Any = self.model
        hidden_states = m.norm_out(state.carry.pop("hidden_states"), state.context["temb"])
        return m.proj_out(hidden_states)

    def unpatchify(self, state: SegmentState, tokens: torch.Tensor) -> torch.Tensor:
        """The second half of the ``out`` unit: all ``[B, patches, p*p*C]`` output tokens to the latent."""
        m: Any = self.model
        patch_size = m.config.patch_size
        height = state.context["height"] // patch_size
        width = state.context["width"] // patch_size
        hidden_states = tokens.reshape(
            shape=(tokens.shape[0], height, width, patch_size, patch_size, m.out_channels)
        )
        hidden_states = torch.einsum("nhwpqc->nchpwq", hidden_states)
        return hidden_states.reshape(
            shape=(hidden_states.shape[0], m.out_channels, height * patch_size, width * patch_size)
        )

    def _output_class(self) -> type:
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput

    def example_inputs(self, shape: InputShape) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Random latents, text tokens (default 333 = 2 x 77 CLIP + 256 T5 tokens), pooled text, timestep."""
        batch, height, width, text_len = shape.batch, shape.height, shape.width, shape.text_len
        scale = shape.vae_scale_factor
        config: Any = self.model.config
        step = scale * config.patch_size
        if height % step or width % step:
            raise ValueError(
                f"height and width must be multiples of {step} (VAE scale factor {scale} x patch size "
                f"{config.patch_size}), got {height}x{width}."
            )
        gen = torch.Generator("cpu").manual_seed(0)

        def randn(*dims: int) -> torch.Tensor:
            return torch.randn(*dims, generator=gen).to(device=shape.device, dtype=shape.dtype)

        kwargs = {
            "hidden_states": randn(batch, config.in_channels, height // scale, width // scale),
            "encoder_hidden_states": randn(
                batch, 333 if text_len is None else text_len, config.joint_attention_dim
            ),
            "pooled_projections": randn(batch, config.pooled_projection_dim),
            "timestep": torch.full((batch,), 500.0, device=shape.device),
        }
        return (), kwargs
