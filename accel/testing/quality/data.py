"""The digits data set the quality models learn from: scikit-learn's 1,797 handwritten 8x8 digits.

Images are kept as float tensors in ``[0, 1]`` (the data set's 0..16 grey levels divided by 16), in a
fixed stratified split, so that the classifier's held-out accuracy is measured on images no quality model
was trained on. ``scikit-learn`` is needed only here (training); loading the committed models does not
import it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IMAGE_SIZE = 8
"""Height and width of the digit images, and of the quality pipelines' output."""

DIGITS: tuple[int, ...] = tuple(range(10))
PROMPT_TEMPLATE = "a handwritten digit {digit}"


def digit_prompt(digit: int) -> str:
    """The prompt that asks a quality pipeline for ``digit``."""
    if digit not in DIGITS:
        raise ValueError(f"digit must be one of 0..9, got {digit!r}.")
    return PROMPT_TEMPLATE.format(digit=digit)


@dataclass(frozen=True)
class DigitData:
    """The train/held-out split: images ``[N, 8, 8]`` in ``[0, 1]`` and labels ``[N]`` (int64)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def load_digit_data(*, test_fraction: float = 0.2, seed: int = 0) -> DigitData:
    """scikit-learn's digits in a stratified split (``seed`` fixes it)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / 16.0
    labels = np.asarray(bunch.target, dtype=np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=test_fraction, random_state=seed, stratify=labels
    )
    return DigitData(
        train_images=torch.from_numpy(train_x),
        train_labels=torch.from_numpy(train_y),
        test_images=torch.from_numpy(test_x),
        test_labels=torch.from_numpy(test_y),
    )


def to_pipeline_range(images: torch.Tensor) -> torch.Tensor:
    """Grey ``[N, 8, 8]`` images in ``[0, 1]`` as the RGB ``[N, 3, 8, 8]`` in ``[-1, 1]`` a VAE encodes."""
    return (images * 2.0 - 1.0).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def to_grey(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Pipeline output (``output_type="np"``: ``[N, H, W, 3]`` in ``[0, 1]``) as grey ``[N, H, W]``."""
    tensor = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    return tensor.float().mean(dim=-1)
