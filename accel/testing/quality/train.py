"""Training the quality models on the digits: a VAE, two conditional denoisers and a digit classifier.

Everything runs on the CPU in minutes and is deterministic for a given seed and thread count. The
denoisers are trained in the VAE's normalised latent space on the training split, with the prompt's text
conditioning replaced by the pipeline's unconditional conditioning for a share of the rows
(``uncond_prob``), so that classifier-free guidance works:

- SDXL family: epsilon prediction on the scheduler's scaled-linear DDPM noise levels, with SDXL's
  added conditioning (pooled text embedding and the six time ids of an 8x8 image);
- SD3 family: flow matching (velocity ``noise - x0`` at ``x_t = (1 - s) x0 + s noise``), with noise
  levels drawn logit-normally and shifted as the scheduler shifts them at sampling time.

An exponential moving average of the denoiser weights is what gets saved.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from accel.testing.quality.data import IMAGE_SIZE, DigitData, load_digit_data, to_pipeline_range
from accel.testing.quality.models import (
    FAMILIES,
    TOKENIZER_MAX_LENGTH,
    DigitClassifier,
    QualityModel,
    assemble_pipeline,
    call_kwargs_for,
    encode_digit_prompts,
    load_quality_model,
    model_dir,
    new_denoiser,
    new_vae,
    normalise_latents,
    save_classifier,
    save_quality_model,
    scheduler_for,
    set_latent_normalisation,
    text_fingerprint,
    write_manifest,
)
from accel.testing.quality.sampling import SampleSet, classify, conditional_accuracy, generate
from accel.wrapper import find_denoiser

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DenoiserTraining:
    """Hyper-parameters of one denoiser's training run."""

    steps: int = 2000
    batch: int = 128
    lr: float = 2e-3
    warmup: int = 100
    uncond_prob: float = 0.1
    ema_decay: float = 0.995
    min_snr_gamma: float = 5.0
    seed: int = 0


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed the global RNG (dropout draws from it) for a block, and restore the caller's state after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _lr_lambda(warmup: int, total: int) -> Any:
    """Linear warm-up, then cosine decay to a tenth of the peak."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def train_classifier(
    data: DigitData, *, epochs: int = 30, batch: int = 64, lr: float = 2e-3, seed: int = 0
) -> tuple[DigitClassifier, float]:
    """Train the digit classifier on the training split; returns it (eval mode) and its held-out accuracy.

    Training images are shifted by up to one pixel and lightly noised, so that the judge tolerates the
    small offsets and blur of generated digits.
    """
    with _seeded(seed):
        return _train_classifier(data, epochs=epochs, batch=batch, lr=lr, seed=seed)


def _train_classifier(
    data: DigitData, *, epochs: int, batch: int, lr: float, seed: int
) -> tuple[DigitClassifier, float]:
    generator = torch.Generator().manual_seed(seed)
    classifier = DigitClassifier()
    optimiser = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=1e-4)
    images, labels = data.train_images, data.train_labels
    n = images.shape[0]
    for _ in range(epochs):
        classifier.train()
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch):
            idx = order[start : start + batch]
            x = _shift(images[idx], generator)
            x = (x + 0.05 * torch.randn(x.shape, generator=generator)).clamp(0, 1)
            loss = F.cross_entropy(classifier(x), labels[idx])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
    classifier.eval()
    predicted = classifier.predict(data.test_images)
    accuracy = float((predicted == data.test_labels).float().mean())
    return classifier, accuracy


def _shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by -1, 0 or +1 pixel in each direction (zero fill)."""
    padded = F.pad(images, (1, 1, 1, 1))
    offsets = torch.randint(0, 3, (images.shape[0], 2), generator=generator)
    out = torch.empty_like(images)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, dy : dy + IMAGE_SIZE, dx : dx + IMAGE_SIZE]
    return out


def train_vae(
    vae: Any,
    data: DigitData,
    *,
    steps: int = 600,
    batch: int = 128,
    lr: float = 2e-3,
    kl_weight: float = 1e-4,
    seed: int = 0,
) -> dict[str, float]:
    """Train ``vae`` in place to reconstruct the training digits; returns its held-out reconstruction PSNR
    (grey images in ``[0, 1]``) and the final loss."""
    with _seeded(seed):
        return _train_vae(vae, data, steps=steps, batch=batch, lr=lr, kl_weight=kl_weight, seed=seed)


def _train_vae(
    vae: Any, data: DigitData, *, steps: int, batch: int, lr: float, kl_weight: float, seed: int
) -> dict[str, float]:
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, _lr_lambda(50, steps))
    train = to_pipeline_range(data.train_images)
    vae.train()
    loss = torch.zeros(())
    for _ in range(steps):
        idx = torch.randint(0, train.shape[0], (batch,), generator=generator)
        x = train[idx]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, x) + kl_weight * posterior.kl().mean() / z[0].numel()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
    vae.eval()
    with torch.no_grad():
        test = to_pipeline_range(data.test_images)
        recon = vae.decode(vae.encode(test).latent_dist.mean).sample.clamp(-1, 1)
        mse = float(((recon.mean(dim=1) - test[:, 0]) / 2).pow(2).mean())
    return {"heldout_psnr_db": 10 * math.log10(1.0 / mse), "final_loss": float(loss)}


def latent_moments(vae: Any, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation of the posterior means of ``images`` (grey, ``[0, 1]``)."""
    with torch.no_grad():
        mean = vae.encode(to_pipeline_range(images)).latent_dist.mean
    return mean.mean(dim=(0, 2, 3)), mean.std(dim=(0, 2, 3))


def train_denoiser(pipe: Any, family: str, data: DigitData, settings: DenoiserTraining) -> dict[str, Any]:
    """Train the denoiser of ``pipe`` (assembled with the trained VAE) in place; returns a training record.

    The EMA weights replace the trained ones at the end; the pipeline is left in eval mode.
    """
    with _seeded(settings.seed):
        return _train_denoiser(pipe, family, data, settings)


def _train_denoiser(pipe: Any, family: str, data: DigitData, settings: DenoiserTraining) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(settings.seed)
    vae = pipe.vae
    with torch.no_grad():
        posterior = vae.encode(to_pipeline_range(data.train_images)).latent_dist
        post_mean, post_std = posterior.mean, posterior.std
    text = encode_digit_prompts(pipe, family)
    labels = data.train_labels
    _, denoiser = find_denoiser(pipe)
    ema = copy.deepcopy(denoiser).requires_grad_(False)
    optimiser = torch.optim.AdamW(denoiser.parameters(), lr=settings.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, _lr_lambda(settings.warmup, settings.steps))
    scheduler = pipe.scheduler
    time_ids = torch.tensor([[IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE]], dtype=torch.float32)
    denoiser.train()
    start = time.perf_counter()
    losses: list[float] = []
    for step in range(settings.steps):
        idx = torch.randint(0, labels.shape[0], (settings.batch,), generator=generator)
        noise_z = torch.randn(post_mean[idx].shape, generator=generator)
        x0 = normalise_latents(vae, post_mean[idx] + post_std[idx] * noise_z)
        drop = torch.rand(settings.batch, generator=generator) < settings.uncond_prob
        embeds = torch.where(drop[:, None, None], text.negative, text.embeds[labels[idx]])
        pooled = torch.where(drop[:, None], text.negative_pooled, text.pooled[labels[idx]])
        noise = torch.randn(x0.shape, generator=generator)
        if family == "sdxl":
            t = torch.randint(0, scheduler.config.num_train_timesteps, (settings.batch,), generator=generator)
            alpha_bar = scheduler.alphas_cumprod[t].float().view(-1, 1, 1, 1)
            x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
            added = {"text_embeds": pooled, "time_ids": time_ids.expand(settings.batch, -1)}
            prediction = denoiser(x_t, t, encoder_hidden_states=embeds, added_cond_kwargs=added).sample
            # Min-SNR weighting: the nearly clean noise levels would otherwise dominate the epsilon loss.
            snr = (alpha_bar / (1 - alpha_bar)).flatten()
            weight = snr.clamp(max=settings.min_snr_gamma) / snr
            per_row = (prediction - noise).pow(2).mean(dim=(1, 2, 3))
            loss = (weight * per_row).mean()
        else:
            shift = float(scheduler.config.shift)
            u = torch.sigmoid(torch.randn(settings.batch, generator=generator))
            sigma = (shift * u / (1 + (shift - 1) * u)).view(-1, 1, 1, 1)
            x_t = (1 - sigma) * x0 + sigma * noise
            prediction = denoiser(
                hidden_states=x_t,
                encoder_hidden_states=embeds,
                pooled_projections=pooled,
                timestep=sigma.flatten() * scheduler.config.num_train_timesteps,
            ).sample
            loss = F.mse_loss(prediction, noise - x0)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(denoiser.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        with torch.no_grad():
            decay = min(settings.ema_decay, (1 + step) / (10 + step))
            for e, p in zip(ema.parameters(), denoiser.parameters(), strict=True):
                e.lerp_(p, 1 - decay)
        losses.append(float(loss.detach()))
        if (step + 1) % 250 == 0:
            log.info(
                "%s denoiser: step %d/%d, loss %.4f (mean of the last 250), %.0f s",
                family,
                step + 1,
                settings.steps,
                sum(losses[-250:]) / len(losses[-250:]),
                time.perf_counter() - start,
            )
    denoiser.load_state_dict(ema.state_dict())
    denoiser.eval()
    tail = losses[-250:]
    return {
        **asdict(settings),
        "final_loss": sum(tail) / len(tail),
        "seconds": round(time.perf_counter() - start, 1),
        "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in denoiser.parameters()),
    }


def train_quality_models(
    root: str | Path,
    *,
    families: Sequence[str] = FAMILIES,
    denoiser: DenoiserTraining | None = None,
    vae_steps: int = 600,
    classifier_epochs: int = 30,
    eval_seeds: Sequence[int] = tuple(range(10)),
    text_seed: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """Train the classifier, the shared VAE and one denoiser per family; write them under ``root``.

    Each family's folder gets its ``quality.json`` with the training record and the conditional accuracy
    of exact CFG, measured on the reloaded folder (50 steps, every digit for every seed of ``eval_seeds``).
    Returns ``{"classifier": ..., "vae": ..., family: manifest}``.
    """
    import diffusers

    settings = denoiser if denoiser is not None else DenoiserTraining(seed=seed)
    out = Path(root)
    data = load_digit_data()
    start = time.perf_counter()
    classifier, accuracy = train_classifier(data, epochs=classifier_epochs, seed=seed)
    classifier_info = {
        "heldout_accuracy": accuracy,
        "train_images": int(data.train_labels.shape[0]),
        "heldout_images": int(data.test_labels.shape[0]),
        "epochs": classifier_epochs,
        "seconds": round(time.perf_counter() - start, 1),
    }
    save_classifier(classifier, out, classifier_info)
    log.info("classifier: held-out accuracy %.4f", accuracy)
    start = time.perf_counter()
    vae = new_vae(seed=seed)
    vae_info = train_vae(vae, data, steps=vae_steps, seed=seed)
    vae_info["steps"], vae_info["seconds"] = vae_steps, round(time.perf_counter() - start, 1)
    log.info("VAE: held-out reconstruction PSNR %.1f dB", vae_info["heldout_psnr_db"])
    mean, std = latent_moments(vae, data.train_images)
    summary: dict[str, Any] = {"classifier": classifier_info, "vae": vae_info}
    samples = SampleSet(seeds=tuple(eval_seeds))
    for family in families:
        family_vae = copy.deepcopy(vae)
        set_latent_normalisation(family_vae, family, mean, std)
        pipe = assemble_pipeline(
            family,
            denoiser=new_denoiser(family, seed=seed),
            vae=family_vae,
            scheduler=scheduler_for(family),
            text_seed=text_seed,
        )
        record = train_denoiser(pipe, family, data, settings)
        manifest = {
            "family": family,
            "pipeline": type(pipe).__name__,
            "text_seed": text_seed,
            "tokenizer_max_length": TOKENIZER_MAX_LENGTH,
            "text_fingerprint": text_fingerprint(pipe, family),
            "call_kwargs": call_kwargs_for(family),
            "training": record,
            "vae": vae_info,
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        }
        folder = save_quality_model(
            QualityModel(family=family, pipe=pipe, call_kwargs=call_kwargs_for(family), manifest=manifest),
            model_dir(family, out),
        )
        reloaded = load_quality_model(family, root=out)
        generated = generate(reloaded.pipe, samples, reloaded.call_kwargs, steps=50)
        exact = conditional_accuracy(classify(classifier, generated.images), samples.labels)
        manifest["evaluation"] = {"exact_cfg_accuracy": exact, "samples": len(samples), "steps": 50}
        write_manifest(folder, manifest)
        log.info("%s: exact CFG conditional accuracy %.3f over %d samples", family, exact, len(samples))
        summary[family] = manifest
    return summary
