"""Train the quality models (digit classifier, VAE, SDXL- and SD3-family denoisers) on scikit-learn's digits.

    python benchmarks/quality/train.py                       # writes accel/testing/quality/weights/
    python benchmarks/quality/train.py --steps 500 -o /tmp/q # a quick, weaker set elsewhere

Needs scikit-learn (requirements-dev.txt) and open-clip-torch (the real CLIP vocabulary of the frozen
text encoders). Runs on the CPU; one thread per process is fastest for these tiny models on a shared
machine. Each family's ``quality.json`` records the training run and the conditional accuracy of exact
CFG on the reloaded folder; ``classifier.json`` the classifier's held-out accuracy.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch

from accel.testing.quality.models import FAMILIES, default_weights_dir
from accel.testing.quality.train import DenoiserTraining, train_quality_models


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-o", "--output", default=str(default_weights_dir()), help="weights folder")
    parser.add_argument("--family", action="append", choices=FAMILIES, help="default: both")
    parser.add_argument("--steps", type=int, default=DenoiserTraining.steps, help="denoiser steps")
    parser.add_argument("--batch", type=int, default=DenoiserTraining.batch)
    parser.add_argument("--lr", type=float, default=DenoiserTraining.lr)
    parser.add_argument("--vae-steps", type=int, default=600)
    parser.add_argument("--classifier-epochs", type=int, default=30)
    parser.add_argument("--eval-seeds", type=int, default=10, help="seeds x 10 digits for the exact check")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    summary = train_quality_models(
        args.output,
        families=args.family or FAMILIES,
        denoiser=DenoiserTraining(steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed),
        vae_steps=args.vae_steps,
        classifier_epochs=args.classifier_epochs,
        eval_seeds=range(args.eval_seeds),
        seed=args.seed,
    )
    brief = {
        "classifier_heldout_accuracy": summary["classifier"]["heldout_accuracy"],
        "vae_heldout_psnr_db": summary["vae"]["heldout_psnr_db"],
        **{f: summary[f]["evaluation"]["exact_cfg_accuracy"] for f in FAMILIES if f in summary},
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(brief, indent=2))


if __name__ == "__main__":
    main()
