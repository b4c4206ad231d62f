"""Which anomaly map finds scratches? Train small in-process models and score every map mode on the same data.

For each (seed, γ, discriminator head) it trains one model on a contaminated synthetic brushed-metal set
(ε = 0.1; γ < 1 also sees the patches of k masked abnormal images as fakes), then scores the test images
with every map mode from the same weights, and prints JSON: pixel AUROC, pixel AP, image AUROC, AUPRO.

Example (one core, about 2 min per trained model at 512²)::

    .venv/bin/python benchmarks/map_quality.py --size 512 --seeds 0 1 --gammas 1.0 0.9 --heads global dense
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from schemas import AbnormalPatchSource, ModelCard, Thresholds
from schemas.model_card import MapMode
from trainer.config import TrainConfig
from trainer.gan import train_in_process
from trainer.metrics import aupro, image_auroc, pixel_auroc, pixel_average_precision
from trainer.networks import DiscriminatorHead
from trainer.patches import abnormal_patch_bank
from trainer.pipeline import PROVISIONAL_THRESHOLDS, build_card
from trainer.scoring import PatchModel, anomaly_map
from trainer.synthetic import make_dataset

_THRESHOLDS = Thresholds(pixel=1.0, image=1.0, pixel_quantile=0.5, image_quantile=0.5, n_calibration_images=1)


def _card(cfg: TrainConfig, mode: MapMode) -> ModelCard:
    source = AbnormalPatchSource.MASK if cfg.gamma < 1 else AbnormalPatchSource.NONE
    return build_card(
        cfg.replace(map_mode=str(mode)), "bench", "v-bench", source, PROVISIONAL_THRESHOLDS, "bench", 0, 0
    )


def _evaluate(maps: list[np.ndarray], masks: list[np.ndarray], labels: list[bool]) -> dict[str, float]:
    return {
        "pixel_auroc": round(pixel_auroc(maps, masks), 4),
        "pixel_ap": round(pixel_average_precision(maps, masks), 4),
        "image_auroc": round(image_auroc([float(m.max()) for m in maps], labels), 4),
        "aupro": round(aupro(maps, masks), 4),
    }


def run_one(cfg: TrainConfig, size: int, data_seed: int, modes: list[MapMode], masked: bool) -> dict:
    data = make_dataset(
        size=size, n_train=20, contamination=0.1, n_abnormal=4, n_test_normal=4, n_test_defect=8, seed=data_seed
    )
    bank = None
    if cfg.gamma < 1.0:
        bank, _ = abnormal_patch_bank(
            data.abnormal, data.abnormal_masks, cfg.patch_size, cfg.stride, with_masks=masked, detrend=cfg.detrend
        )
    started = time.monotonic()
    state = train_in_process(cfg, data.train_normal, bank, device="cpu")
    train_s = time.monotonic() - started
    labels = [label != "good" for label in data.test_labels]
    out: dict = {"train_s": round(train_s, 1), "bank": 0 if bank is None else len(bank), "modes": {}}
    for mode in modes:
        model = PatchModel.from_state(_card(cfg, mode), state, device="cpu")
        maps = [anomaly_map(image, model) for image in data.test_images]
        out["modes"][str(mode)] = _evaluate(maps, data.test_masks, labels)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--gammas", type=float, nargs="+", default=[1.0, 0.9])
    parser.add_argument("--heads", nargs="+", default=[str(DiscriminatorHead.DENSE)])
    parser.add_argument("--modes", nargs="+", default=[str(m) for m in MapMode])
    parser.add_argument("--unmasked", action="store_true", help="whole abnormal patches are fake (no cell masks)")
    parser.add_argument("--contrast-gains", type=float, nargs="+", default=[0.0])
    parser.add_argument("--gan-steps", type=int, default=None)
    parser.add_argument("--encoder-steps", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    for seed in args.seeds:
        for head, gain in itertools.product(args.heads, args.contrast_gains):
            for gamma in args.gammas:
                overrides: dict = {"gamma": gamma, "seed": seed, "discriminator_head": head, "contrast_gain": gain}
                if args.gan_steps is not None:
                    overrides["gan_steps"] = args.gan_steps
                if args.encoder_steps is not None:
                    overrides["encoder_steps"] = args.encoder_steps
                cfg = TrainConfig.demo(**overrides)
                modes = [MapMode(m) for m in args.modes]
                if head == DiscriminatorHead.GLOBAL:
                    modes = [m for m in modes if m not in (MapMode.LOGIT, MapMode.RESIDUAL_LOGIT)]
                row = {"seed": seed, "head": head, "gain": gain, "gamma": gamma, "masked": not args.unmasked} | run_one(
                    cfg, args.size, seed, modes, not args.unmasked
                )
                print(json.dumps(row), file=sys.stderr, flush=True)
                results.append(row)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
