"""Adapter for ``UNet2DConditionModel`` (SD1.x/2.x/SDXL family): resnet/attention-level units.

Units, in forward order: ``conv_in``; per down block each resnet, each attention and the downsampler;
the mid block's resnets and attentions; per up block each resnet (which pops its skip), each attention
and the upsampler; ``conv_out`` (with ``conv_norm_out``/``conv_act``). A ``Transformer2DModel`` attention
is cut further into one unit per transformer block (the first also runs ``norm``/``proj_in``, the last
``proj_out`` and the residual add), so that the heavy 10-block attentions of SDXL can be split between
stages; inside it the carry is ``tokens`` (``[B, HW, C]``) plus ``residual`` instead of ``sample``.
Block types other than the common diffusers ones become one unit each, called exactly as
``UNet2DConditionModel.forward`` calls them.

Time, class and added embeddings, text-state projection, mask-to-bias conversion, GLIGEN, ControlNet
and T2I-Adapter residual bookkeeping and ``upsample_size`` are computed in ``prepare`` (the context).
ControlNet down residuals are added when a skip is popped (diffusers adds them after the down blocks,
which is the same sum of the same tensors).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from accel.models.base import DenoiserAdapter, InputShape, SegmentState, Unit, UnsupportedModelError

logger = logging.getLogger(__name__)

StepFn = Callable[[SegmentState, list[int]], None]

REQUIRED_ATTRIBUTES = (
    "conv_in",
    "down_blocks",
    "mid_block",
    "up_blocks",
    "conv_out",
    "time_embedding",
    "get_time_embed",
    "get_class_embed",
    "get_aug_embed",
    "process_encoder_hidden_states",
    "num_upsamplers",
)


def missing_unet_attributes(model: torch.nn.Module) -> list[str]:
    """Attributes of ``UNet2DConditionModel`` that ``model`` lacks (empty: the U-Net adapter applies)."""
    return [name for name in REQUIRED_ATTRIBUTES if not hasattr(model, name)]


@dataclass
class _Step:
    name: str
    paths: tuple[str, ...]
    fn: StepFn
    pushes: int = 0
    pops: int = 0
    post: list[Callable[[SegmentState], None]] = field(default_factory=list)


def _has_cross_attention(block: torch.nn.Module) -> bool:
    return bool(getattr(block, "has_cross_attention", False))


def _splittable_transformer(module: Any) -> bool:
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    # Exactly the diffusers class (a subclass may override forward) with image-like (continuous) input.
    return (
        type(module) is Transformer2DModel
        and bool(getattr(module, "is_input_continuous", False))
        and hasattr(module, "_operate_on_continuous_inputs")
        and hasattr(module, "_get_output_for_continuous_inputs")
        and len(module.transformer_blocks) > 0
    )


class UNetAdapter(DenoiserAdapter):
    """``UNet2DConditionModel`` as resnet/attention units with an explicit skip stack."""

    family = "unet"
    context_module_paths = (
        "time_proj",
        "time_embedding",
        "class_embedding",
        "add_time_proj",
        "add_embedding",
        "time_embed_act",
        "encoder_hid_proj",
        "position_net",
    )

    def __init__(self, model: torch.nn.Module) -> None:
        missing = missing_unet_attributes(model)
        if missing:
            raise UnsupportedModelError(
                f"{type(model).__name__} is not a UNet2DConditionModel-like denoiser: missing {', '.join(missing)}."
            )
        self.model = model
        self._steps: list[_Step] = []
        self._upsample_cache: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
        self._build()
        self.units = [Unit(s.name, s.paths) for s in self._steps]
        self._pushes = [s.pushes for s in self._steps]
        self._pops = [s.pops for s in self._steps]
        # Static absolute index of every popped skip, for ControlNet residuals.
        self._popped = [self.skip_indices(i)[1] for i in range(len(self._steps))]
        self._first_up_unit = next(
            (i for i, s in enumerate(self._steps) if s.name.startswith("up_blocks.")), len(self._steps)
        )
        if sum(self._pushes) != sum(self._pops):
            raise UnsupportedModelError(
                f"{type(model).__name__}: down blocks push {sum(self._pushes)} skip tensors but up blocks "
                f"pop {sum(self._pops)}; this U-Net layout is not supported."
            )

    # -- construction -----------------------------------------------------------------------------
    def _add(self, name: str, paths: tuple[str, ...], fn: StepFn, *, pushes: int = 0, pops: int = 0) -> None:
        self._steps.append(_Step(name, paths, fn, pushes, pops))

    def _build(self) -> None:
        from diffusers.models.unets.unet_2d_blocks import (
            AttnDownBlock2D,
            AttnUpBlock2D,
            CrossAttnDownBlock2D,
            CrossAttnUpBlock2D,
            DownBlock2D,
            UNetMidBlock2D,
            UNetMidBlock2DCrossAttn,
            UpBlock2D,
        )

        m: Any = self.model

        def conv_in(state: SegmentState, popped: list[int]) -> None:
            sample = m.conv_in(state.carry["sample"])
            state.carry["sample"] = sample
            state.skips.append(sample)

        self._add("conv_in", ("conv_in",), conv_in, pushes=1)

        for b, block in enumerate(m.down_blocks):
            prefix = f"down_blocks.{b}"
            first = len(self._steps)
            kind = type(block)
            if kind is CrossAttnDownBlock2D:
                self._cross_attn_down(prefix, b, block)
            elif kind in (DownBlock2D, AttnDownBlock2D):
                self._plain_down(prefix, block, with_attention=kind is AttnDownBlock2D)
            else:
                self._whole_down(prefix, b, block)
            if not _has_cross_attention(block) and len(self._steps) > first:
                # diffusers adds a T2I-Adapter residual in place after a block without cross-attention.
                self._steps[-1].post.append(self._intrablock_inplace(b))

        if m.mid_block is not None:
            mid = m.mid_block
            if type(mid) in (UNetMidBlock2DCrossAttn, UNetMidBlock2D):
                self._mid(mid, cross=type(mid) is UNetMidBlock2DCrossAttn)
            else:
                self._whole_mid(mid)
            self._steps[-1].post.append(self._mid_adapter)
        self._steps[-1].post.append(self._mid_controlnet)

        for i, block in enumerate(m.up_blocks):
            prefix = f"up_blocks.{i}"
            kind = type(block)
            if kind in (CrossAttnUpBlock2D, UpBlock2D, AttnUpBlock2D):
                self._up(prefix, i, block, kind)
            else:
                self._whole_up(prefix, i, block)

        paths = tuple(p for p in ("conv_norm_out", "conv_act", "conv_out") if getattr(m, p, None) is not None)

        def conv_out(state: SegmentState, popped: list[int]) -> None:
            sample = state.carry["sample"]
            if m.conv_norm_out:
                sample = m.conv_norm_out(sample)
                sample = m.conv_act(sample)
            state.carry["sample"] = m.conv_out(sample)

        self._add("conv_out", paths, conv_out)

    def _attention(self, path: str, attn: Any, after: Callable[[SegmentState], None] | None = None) -> None:
        """Units for one cross-attention module (``Transformer2DModel`` split per transformer block)."""
        if not _splittable_transformer(attn):

            def whole(state: SegmentState, popped: list[int]) -> None:
                ctx = state.context
                state.carry["sample"] = attn(
                    state.carry["sample"],
                    encoder_hidden_states=ctx["encoder_hidden_states"],
                    cross_attention_kwargs=ctx["cross_attention_kwargs"],
                    attention_mask=ctx["attention_mask"],
                    encoder_attention_mask=ctx["encoder_attention_mask"],
                    return_dict=False,
                )[0]
                if after is not None:
                    after(state)

            self._add(path, (path,), whole)
            return

        blocks = attn.transformer_blocks
        last = len(blocks) - 1
        for j, tblock in enumerate(blocks):
            paths: tuple[str, ...] = (f"{path}.transformer_blocks.{j}",)
            if j == 0:
                paths = (f"{path}.norm", f"{path}.proj_in", *paths)
            if j == last:
                paths = (*paths, f"{path}.proj_out")

            step = _transformer_block_step(attn, j, last, tblock, after)
            self._add(f"{path}.transformer_blocks.{j}", paths, step)

    def _add_resnet(self, path: str, resnet: Any, *, push: bool) -> None:
        self._add(path, (path,), _call_step(resnet, push=push, with_temb=True), pushes=int(push))

    def _cross_attn_down(self, prefix: str, b: int, block: Any) -> None:
        n = len(block.resnets)
        for layer, (resnet, attn) in enumerate(zip(block.resnets, block.attentions, strict=True)):
            self._add_resnet(f"{prefix}.resnets.{layer}", resnet, push=False)
            is_last = layer == n - 1

            self._attention(f"{prefix}.attentions.{layer}", attn, after=_push_after_attention(b, is_last))
            self._steps[-1].pushes = 1
        if block.downsamplers is not None:
            self._downsampler(prefix, block, with_temb=False)

    def _plain_down(self, prefix: str, block: Any, *, with_attention: bool) -> None:
        attentions = block.attentions if with_attention else [None] * len(block.resnets)
        for layer, (resnet, attn) in enumerate(zip(block.resnets, attentions, strict=True)):
            self._add_resnet(f"{prefix}.resnets.{layer}", resnet, push=attn is None)
            if attn is not None:
                path = f"{prefix}.attentions.{layer}"

                # AttnDownBlock2D is called without cross_attention_kwargs by the U-Net forward.
                self._add(path, (path,), _call_step(attn, push=True), pushes=1)
        if block.downsamplers is not None:
            self._downsampler(prefix, block, with_temb=getattr(block, "downsample_type", "conv") == "resnet")

    def _downsampler(self, prefix: str, block: Any, *, with_temb: bool) -> None:
        paths = tuple(f"{prefix}.downsamplers.{k}" for k in range(len(block.downsamplers)))

        def down(state: SegmentState, popped: list[int]) -> None:
            sample = state.carry["sample"]
            for downsampler in block.downsamplers:
                sample = downsampler(sample, temb=state.context["emb"]) if with_temb else downsampler(sample)
            state.carry["sample"] = sample
            state.skips.append(sample)

        self._add(f"{prefix}.downsamplers", paths, down, pushes=1)

    def _whole_down(self, prefix: str, b: int, block: Any) -> None:
        count = len(block.resnets) + (1 if getattr(block, "downsamplers", None) is not None else 0)

        def run_block(state: SegmentState, popped: list[int]) -> None:
            ctx = state.context
            if _has_cross_attention(block):
                extra = {}
                residual = ctx["adapter_down"].get(b)
                if residual is not None:
                    extra["additional_residuals"] = residual
                sample, res_samples = block(
                    hidden_states=state.carry["sample"],
                    temb=ctx["emb"],
                    encoder_hidden_states=ctx["encoder_hidden_states"],
                    attention_mask=ctx["attention_mask"],
                    cross_attention_kwargs=ctx["cross_attention_kwargs"],
                    encoder_attention_mask=ctx["encoder_attention_mask"],
                    **extra,
                )
            else:
                sample, res_samples = block(hidden_states=state.carry["sample"], temb=ctx["emb"])
            if len(res_samples) != count:
                raise UnsupportedModelError(
                    f"{prefix} ({type(block).__name__}) returned {len(res_samples)} skip tensors, expected "
                    f"{count} (one per resnet plus the downsampler); this block type is not supported."
                )
            state.carry["sample"] = sample
            state.skips.extend(res_samples)

        self._add(prefix, (prefix,), run_block, pushes=count)

    def _intrablock_inplace(self, b: int) -> Callable[[SegmentState], None]:
        def add(state: SegmentState) -> None:
            residual = state.context["adapter_down"].get(b)
            if residual is not None:
                # In place, like diffusers: the last skip of this block is the same tensor and changes too.
                state.carry["sample"] += residual

        return add

    @staticmethod
    def _mid_adapter(state: SegmentState) -> None:
        residual = state.context["adapter_mid"]
        if residual is not None and state.carry["sample"].shape == residual.shape:
            state.carry["sample"] += residual

    @staticmethod
    def _mid_controlnet(state: SegmentState) -> None:
        residual = state.context["controlnet_mid"]
        if residual is not None:
            state.carry["sample"] = state.carry["sample"] + residual

    def _mid(self, mid: Any, *, cross: bool) -> None:
        self._add_resnet("mid_block.resnets.0", mid.resnets[0], push=False)
        for layer, (attn, resnet) in enumerate(zip(mid.attentions, mid.resnets[1:], strict=True)):
            path = f"mid_block.attentions.{layer}"
            if cross:
                self._attention(path, attn)
            elif attn is not None:
                self._add(path, (path,), _call_step(attn, with_temb=True))
            self._add_resnet(f"mid_block.resnets.{layer + 1}", resnet, push=False)

    def _whole_mid(self, mid: Any) -> None:
        def run_block(state: SegmentState, popped: list[int]) -> None:
            ctx = state.context
            if _has_cross_attention(mid):
                state.carry["sample"] = mid(
                    state.carry["sample"],
                    ctx["emb"],
                    encoder_hidden_states=ctx["encoder_hidden_states"],
                    attention_mask=ctx["attention_mask"],
                    cross_attention_kwargs=ctx["cross_attention_kwargs"],
                    encoder_attention_mask=ctx["encoder_attention_mask"],
                )
            else:
                state.carry["sample"] = mid(state.carry["sample"], ctx["emb"])

        self._add("mid_block", ("mid_block",), run_block)

    @staticmethod
    def _pop_skip(state: SegmentState, popped: list[int]) -> torch.Tensor:
        res = state.skips.pop()
        controlnet = state.context["controlnet_down"]
        if controlnet is not None:
            res = res + controlnet[popped[0]]
        return res

    def _up_resnet_step(self, block: Any, resnet: Any, freeu_capable: bool) -> StepFn:
        """Unit step for an up block's resnet: pop the skip (plus ControlNet residual), FreeU, concat, run."""
        from diffusers.utils.torch_utils import apply_freeu

        def step(state: SegmentState, popped: list[int]) -> None:
            res = self._pop_skip(state, popped)
            sample = state.carry["sample"]
            if freeu_capable and (
                getattr(block, "s1", None)
                and getattr(block, "s2", None)
                and getattr(block, "b1", None)
                and getattr(block, "b2", None)
            ):
                sample, res = apply_freeu(
                    block.resolution_idx, sample, res, s1=block.s1, s2=block.s2, b1=block.b1, b2=block.b2
                )
            sample = torch.cat([sample, res], dim=1)
            state.carry["sample"] = resnet(sample, state.context["emb"])

        return step

    def _up(self, prefix: str, i: int, block: Any, kind: type) -> None:
        from diffusers.models.unets.unet_2d_blocks import AttnUpBlock2D, CrossAttnUpBlock2D

        freeu_capable = kind is not AttnUpBlock2D
        attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
        for layer, (resnet, attn) in enumerate(zip(block.resnets, attentions, strict=True)):
            path = f"{prefix}.resnets.{layer}"

            res_step = self._up_resnet_step(block, resnet, freeu_capable)
            self._add(path, (path,), res_step, pops=1)
            if attn is None:
                continue
            apath = f"{prefix}.attentions.{layer}"
            if kind is CrossAttnUpBlock2D:
                self._attention(apath, attn)
            else:
                self._add(apath, (apath,), _call_step(attn))
        if block.upsamplers is None:
            return
        paths = tuple(f"{prefix}.upsamplers.{k}" for k in range(len(block.upsamplers)))
        resnet_up = kind is AttnUpBlock2D and getattr(block, "upsample_type", "conv") == "resnet"
        size_free = kind is AttnUpBlock2D  # AttnUpBlock2D never forwards upsample_size

        def up(state: SegmentState, popped: list[int]) -> None:
            sample = state.carry["sample"]
            for upsampler in block.upsamplers:
                if resnet_up:
                    sample = upsampler(sample, temb=state.context["emb"])
                elif size_free:
                    sample = upsampler(sample)
                else:
                    sample = upsampler(sample, state.context["upsample_sizes"][i])
            state.carry["sample"] = sample

        self._add(f"{prefix}.upsamplers", paths, up)

    def _whole_up(self, prefix: str, i: int, block: Any) -> None:
        count = len(block.resnets)

        def run_block(state: SegmentState, popped: list[int]) -> None:
            ctx = state.context
            # Popped top-first; the block wants them in stack order (last = top).
            res_list = [self._pop_skip(state, [k]) for k in popped]
            res_samples = tuple(reversed(res_list))
            if _has_cross_attention(block):
                state.carry["sample"] = block(
                    hidden_states=state.carry["sample"],
                    temb=ctx["emb"],
                    res_hidden_states_tuple=res_samples,
                    encoder_hidden_states=ctx["encoder_hidden_states"],
                    cross_attention_kwargs=ctx["cross_attention_kwargs"],
                    upsample_size=ctx["upsample_sizes"][i],
                    attention_mask=ctx["attention_mask"],
                    encoder_attention_mask=ctx["encoder_attention_mask"],
                )
            else:
                state.carry["sample"] = block(
                    hidden_states=state.carry["sample"],
                    temb=ctx["emb"],
                    res_hidden_states_tuple=res_samples,
                    upsample_size=ctx["upsample_sizes"][i],
                )

        self._add(prefix, (prefix,), run_block, pops=count)

    # -- execution --------------------------------------------------------------------------------
    def _step(self, index: int, state: SegmentState) -> None:
        step = self._steps[index]
        step.fn(state, self._popped[index])
        for post in step.post:
            post(state)

    def prepare(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        down_intrablock_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> SegmentState:
        """Everything ``UNet2DConditionModel.forward`` computes before ``conv_in`` (same arguments)."""
        lora_scale = 1.0
        if cross_attention_kwargs is not None:
            # Like diffusers' apply_lora_scale: "scale" is the LoRA scale, not an attention argument.
            cross_attention_kwargs = cross_attention_kwargs.copy()
            lora_scale = cross_attention_kwargs.pop("scale", 1.0)
        context: dict[str, Any] = {"lora_scale": lora_scale, "return_dict": return_dict}
        with self._lora_scaled(SegmentState(context=context, carry={})):
            return self._prepare(
                context,
                sample,
                timestep,
                encoder_hidden_states,
                class_labels,
                timestep_cond,
                attention_mask,
                cross_attention_kwargs,
                added_cond_kwargs,
                down_block_additional_residuals,
                mid_block_additional_residual,
                down_intrablock_additional_residuals,
                encoder_attention_mask,
            )

    def _prepare(
        self,
        context: dict[str, Any],
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        class_labels: torch.Tensor | None,
        timestep_cond: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        cross_attention_kwargs: dict[str, Any] | None,
        added_cond_kwargs: dict[str, torch.Tensor] | None,
        down_block_additional_residuals: tuple[torch.Tensor, ...] | None,
        mid_block_additional_residual: torch.Tensor | None,
        down_intrablock_additional_residuals: tuple[torch.Tensor, ...] | None,
        encoder_attention_mask: torch.Tensor | None,
    ) -> SegmentState:
        m: Any = self.model
        config = m.config
        overall_up_factor = 2**m.num_upsamplers
        forward_upsample_size = any(dim % overall_up_factor != 0 for dim in sample.shape[-2:])

        # Masks become additive biases with a singleton query dimension, as in diffusers.
        if attention_mask is not None:
            attention_mask = (1 - attention_mask.to(sample.dtype)) * -10000.0
            attention_mask = attention_mask.unsqueeze(1)
        if encoder_attention_mask is not None:
            encoder_attention_mask = (1 - encoder_attention_mask.to(sample.dtype)) * -10000.0
            encoder_attention_mask = encoder_attention_mask.unsqueeze(1)

        if config.center_input_sample:
            sample = 2 * sample - 1.0

        t_emb = m.get_time_embed(sample=sample, timestep=timestep)
        emb = m.time_embedding(t_emb, timestep_cond)
        class_emb = m.get_class_embed(sample=sample, class_labels=class_labels)
        if class_emb is not None:
            if config.class_embeddings_concat:
                emb = torch.cat([emb, class_emb], dim=-1)
            else:
                emb = emb + class_emb
        aug_emb = m.get_aug_embed(
            emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
        )
        if config.addition_embed_type == "image_hint":
            aug_emb, hint = aug_emb
            sample = torch.cat([sample, hint], dim=1)
        emb = emb + aug_emb if aug_emb is not None else emb
        if m.time_embed_act is not None:
            emb = m.time_embed_act(emb)
        encoder_hidden_states = m.process_encoder_hidden_states(
            encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
        )

        if cross_attention_kwargs is not None and cross_attention_kwargs.get("gligen", None) is not None:
            cross_attention_kwargs = cross_attention_kwargs.copy()
            gligen_args = cross_attention_kwargs.pop("gligen")
            cross_attention_kwargs["gligen"] = {"objs": m.position_net(**gligen_args)}

        is_controlnet = (
            mid_block_additional_residual is not None and down_block_additional_residuals is not None
        )
        is_adapter = down_intrablock_additional_residuals is not None
        if (
            not is_adapter
            and mid_block_additional_residual is None
            and down_block_additional_residuals is not None
        ):
            from diffusers.utils import deprecate

            deprecate(
                "T2I should not use down_block_additional_residuals",
                "1.3.0",
                "Passing intrablock residual connections with `down_block_additional_residuals` is deprecated "
                "and will be removed in diffusers 1.3.0. `down_block_additional_residuals` should only be used "
                "for ControlNet. Please make sure use `down_intrablock_additional_residuals` instead. ",
                standard_warn=False,
            )
            down_intrablock_additional_residuals = down_block_additional_residuals
            is_adapter = True

        n_down = len(m.down_blocks)
        adapter = list(down_intrablock_additional_residuals or ()) if is_adapter else []
        adapter_down = {b: adapter[b] for b in range(min(n_down, len(adapter)))}
        adapter_mid = adapter[n_down] if len(adapter) > n_down else None

        controlnet_down = None
        if is_controlnet:
            assert down_block_additional_residuals is not None
            controlnet_down = tuple(down_block_additional_residuals)
            total = sum(self._pushes)
            if len(controlnet_down) != total:
                raise ValueError(
                    f"down_block_additional_residuals has {len(controlnet_down)} tensors, but this U-Net keeps "
                    f"{total} skip tensors; pass one ControlNet residual per skip (conv_in output first)."
                )

        context.update(
            emb=emb,
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=attention_mask,
            encoder_attention_mask=encoder_attention_mask,
            cross_attention_kwargs=cross_attention_kwargs,
            adapter_down=adapter_down,
            adapter_mid=adapter_mid,
            controlnet_down=controlnet_down,
            controlnet_mid=mid_block_additional_residual if is_controlnet else None,
            upsample_sizes=[None] * len(m.up_blocks),
        )
        if forward_upsample_size:
            context["upsample_sizes"] = self._upsample_sizes(context, sample)
        return SegmentState(context=context, carry={"sample": sample}, skips=[])

    def _upsample_sizes(self, context: dict[str, Any], sample: torch.Tensor) -> list[Any]:
        """``upsample_size`` per up block when the latent is not a multiple of the total up factor.

        diffusers reads it off the skip tensors; a stage that runs only up blocks has none of them, so
        the skip shapes are worked out once per latent size by a shape-only (fake tensor) pass.
        """
        key = tuple(sample.shape)
        shapes = self._upsample_cache.get(key)
        if shapes is None:
            from torch._subclasses.fake_tensor import FakeTensorMode

            probe_context = dict(
                context, adapter_down={}, adapter_mid=None, controlnet_down=None, controlnet_mid=None
            )
            with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                probe = SegmentState(context=probe_context, carry={"sample": mode.from_tensor(sample)})
                for index in range(self._first_up_unit):
                    self._step(index, probe)
                shapes = [tuple(s.shape[2:]) for s in probe.skips]
            self._upsample_cache[key] = shapes
        sizes: list[Any] = []
        upsample_size = None
        depth = len(shapes)
        up_blocks: Any = self.model.up_blocks
        n_up = len(up_blocks)
        for i, block in enumerate(up_blocks):
            depth -= len(block.resnets)
            # Like diffusers, the last block keeps the previous block's value.
            if i != n_up - 1:
                upsample_size = torch.Size(shapes[depth - 1])
            sizes.append(upsample_size)
        return sizes

    def _output_class(self) -> type:
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput

    def example_inputs(self, shape: InputShape) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Random latents, timestep, text states and added conditioning shaped from the config."""
        batch, height, width, text_len = shape.batch, shape.height, shape.width, shape.text_len
        scale = shape.vae_scale_factor
        model: Any = self.model
        config = model.config
        name = type(model).__name__
        if height % scale or width % scale:
            raise ValueError(
                f"height and width must be multiples of the VAE scale factor {scale}, got {height}x{width}."
            )
        gen = torch.Generator("cpu").manual_seed(0)

        def randn(*dims: int) -> torch.Tensor:
            return torch.randn(*dims, generator=gen).to(device=shape.device, dtype=shape.dtype)

        cross_dim: Any = config.cross_attention_dim
        if config.encoder_hid_dim_type == "text_proj" and config.encoder_hid_dim is not None:
            cross_dim = config.encoder_hid_dim
        elif config.encoder_hid_dim_type is not None:
            raise UnsupportedModelError(
                f"{name}: example inputs for encoder_hid_dim_type={config.encoder_hid_dim_type!r} are not "
                "implemented; pass your own forward inputs to the profiler (inputs=(args, kwargs))."
            )
        if isinstance(cross_dim, list | tuple):
            if len(set(cross_dim)) != 1:
                raise UnsupportedModelError(
                    f"{name}: cross_attention_dim differs per block ({cross_dim}); pass your own inputs."
                )
            cross_dim = cross_dim[0]
        kwargs: dict[str, Any] = {
            "sample": randn(batch, config.in_channels, height // scale, width // scale),
            "timestep": torch.tensor(500.0, device=shape.device),
            "encoder_hidden_states": randn(batch, 77 if text_len is None else text_len, int(cross_dim)),
        }
        kind = config.addition_embed_type
        if kind == "text_time":
            time_dim = config.addition_time_embed_dim
            total = config.projection_class_embeddings_input_dim
            # SDXL base: 6 time ids; the split only has to add up to the projection's input size.
            n_time = 6 if total > 6 * time_dim else max(1, total // time_dim - 1)
            kwargs["added_cond_kwargs"] = {
                "text_embeds": randn(batch, total - n_time * time_dim),
                "time_ids": randn(batch, n_time),
            }
        elif kind not in (None, "text"):
            raise UnsupportedModelError(
                f"{name}: example inputs for addition_embed_type={kind!r} are not implemented; pass your own "
                "forward inputs to the profiler (inputs=(args, kwargs))."
            )
        if model.class_embedding is not None:
            if config.class_embed_type is None:
                kwargs["class_labels"] = torch.zeros(batch, dtype=torch.long, device=shape.device)
            elif config.class_embed_type == "timestep":
                kwargs["class_labels"] = torch.zeros(batch, device=shape.device)
            elif config.class_embed_type == "projection":
                kwargs["class_labels"] = randn(batch, config.projection_class_embeddings_input_dim)
            else:
                raise UnsupportedModelError(
                    f"{name}: example inputs for class_embed_type={config.class_embed_type!r} are not "
                    "implemented; pass your own forward inputs to the profiler (inputs=(args, kwargs))."
                )
        if config.time_cond_proj_dim is not None:
            kwargs["timestep_cond"] = randn(batch, config.time_cond_proj_dim)
        return (), kwargs


def _transformer_block_step(
    attn: Any, j: int, last: int, tblock: Any, after: Callable[[SegmentState], None] | None
) -> StepFn:
    """Unit step for transformer block ``j`` of ``attn``.

    Modules and indices are bound as closure variables, not as default arguments: torch.compile guards
    on defaults through sources that some torch releases cannot read back from inductor's cache.
    """

    def step(state: SegmentState, popped: list[int]) -> None:
        ctx, carry = state.context, state.carry
        if j == 0:
            residual = carry.pop("sample")
            tokens, _ = attn._operate_on_continuous_inputs(residual)
        else:
            tokens = carry.pop("tokens")
            residual = carry.pop("residual")
        # Masks arrive already converted to biases by prepare (ndim 3), as from the U-Net forward.
        tokens = tblock(
            tokens,
            attention_mask=ctx["attention_mask"],
            encoder_hidden_states=ctx["encoder_hidden_states"],
            encoder_attention_mask=ctx["encoder_attention_mask"],
            timestep=None,
            cross_attention_kwargs=ctx["cross_attention_kwargs"],
            class_labels=None,
        )
        if j < last:
            carry["tokens"] = tokens
            carry["residual"] = residual
            return
        batch, _, height, width = residual.shape
        inner_dim = residual.shape[1] if attn.use_linear_projection else tokens.shape[-1]
        carry["sample"] = attn._get_output_for_continuous_inputs(
            hidden_states=tokens,
            residual=residual,
            batch_size=batch,
            height=height,
            width=width,
            inner_dim=inner_dim,
        )
        if after is not None:
            after(state)

    return step


def _push_after_attention(block_index: int, is_last: bool) -> Callable[[SegmentState], None]:
    """After a down block's attention: add the T2I-adapter residual (last layer) and push the skip."""

    def after(state: SegmentState) -> None:
        if is_last:
            residual = state.context["adapter_down"].get(block_index)
            if residual is not None:
                state.carry["sample"] = state.carry["sample"] + residual
        state.skips.append(state.carry["sample"])

    return after


def _call_step(module: Any, *, push: bool = False, with_temb: bool = False) -> StepFn:
    """Unit step that runs ``module`` on the carried sample (with ``temb``), pushing it as a skip if asked."""

    def step(state: SegmentState, popped: list[int]) -> None:
        sample = state.carry["sample"]
        sample = module(sample, temb=state.context["emb"]) if with_temb else module(sample)
        state.carry["sample"] = sample
        if push:
            state.skips.append(sample)

    return step
