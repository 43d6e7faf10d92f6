"""A tiny CNN digit classifier: the feature extractor for metrics on the ``digits`` demo.

Inception features mean little on 8x8 digits upsampled to 16-64 px, and Inception weights
cannot be downloaded here, so the demo measures FID / KID / precision-recall in the
64-d pooled feature space of this classifier and IS / class accuracy from its logits.

The shipped weights ``assets/digit_classifier.pt`` (~230 KB) are reproduced exactly by::

    python -m sar_plugins.digit_classifier --out plugins/assets/digit_classifier.pt

(defaults: seed 0, 40 epochs, 1 CPU thread; about 20 s on one CPU core). Training uses
the ``digits`` train split only; the reported accuracy is on the ``val`` split.

Input handling (``prepare``): any (B, 3, H, W) image batch, uint8 in 0..255 or float in
[0, 1], is averaged to grey, resized to 16x16 (bilinear, antialiased) and mapped to
[-1, 1]. Training renders each digit at a random size before that resize, so the
classifier sees the same resampling artefacts as generated images of any resolution.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

INPUT_SIZE = 16
NUM_CLASSES = 10
FEATURE_DIM = 64
ASSET = Path(__file__).resolve().parent / "assets" / "digit_classifier.pt"
TRAIN_RENDER_SIZES = (8, 12, 16, 24, 32, 64)


def prepare(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) uint8 0..255 or float [0, 1] -> (B, 1, 16, 16) float in [-1, 1]."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    x = x.mean(dim=1, keepdim=True)
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear",
                          align_corners=False, antialias=True)
    return x.clamp(0, 1) * 2 - 1


class DigitNet(nn.Module):
    """Three 3x3 conv layers (16 -> 8 -> 4 px), global average pool, linear head."""

    def __init__(self):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, FEATURE_DIM, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)
        # RMS of the pooled features over the train split, set after training: metric
        # features are divided by it so FID / KID have Inception-like magnitudes
        self.register_buffer("feature_rms", torch.ones(()))

    def features(self, x_B1HW: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, 64) of prepared inputs."""
        return self.convs(x_B1HW).mean(dim=(-2, -1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, 10) of raw image batches (see :func:`prepare`)."""
        return self.head(self.features(prepare(images)))


def load_classifier(path: str | Path | None = None, device: str | torch.device = "cpu") -> DigitNet:
    """Load weights saved by :func:`main` (``weights_only``); default: the shipped asset."""
    from sar_core.checkpoint_io import load_file

    blob = load_file(path or ASSET, what="digit classifier weights")
    sd = blob["state_dict"] if isinstance(blob, dict) and "state_dict" in blob else blob
    net = DigitNet()
    net.load_state_dict(sd)
    return net.to(device).eval().requires_grad_(False)


@torch.no_grad()
def accuracy(net: DigitNet, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    """Fraction of ``images`` (raw batches, see :func:`prepare`) classified as ``labels``."""
    if len(images) == 0:
        raise ValueError("accuracy of an empty image set")
    device = next(net.parameters()).device
    hits = 0
    for i in range(0, len(images), batch_size):
        logits = net(images[i:i + batch_size].to(device))
        hits += int((logits.argmax(-1).cpu() == labels[i:i + batch_size].cpu()).sum())
    return hits / len(images)


def _render_batch(grids: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 8, 8) in [0, 1] -> (B, 3, size, size) in [0, 1], as the digits dataset renders."""
    from sar_plugins.digits import render

    return (render(grids, size) + 1) / 2


def _augment(grids: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Render the batch at a random size (the only augmentation; shifts hurt on 8x8)."""
    size = TRAIN_RENDER_SIZES[int(torch.randint(len(TRAIN_RENDER_SIZES), (1,), generator=gen))]
    return _render_batch(grids, size)


def train_classifier(epochs: int = 40, batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
                     log=print) -> tuple[DigitNet, dict]:
    """Train on the digits train split; returns (net, {'val_acc', 'train_acc', ...})."""
    from sar_plugins.digits import DigitsDataset

    torch.manual_seed(seed)
    random.seed(seed)
    gen = torch.Generator().manual_seed(seed)
    train, val = DigitsDataset("train", 8), DigitsDataset("val", 8)
    net = DigitNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(train) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(train), generator=gen)
        for i in range(0, len(train), batch_size):
            idx = order[i:i + batch_size]
            x = _augment(train.grids[idx], gen)
            loss = F.cross_entropy(net(x), train.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if log and (epoch + 1) % 10 == 0:
            log(f"epoch {epoch + 1}/{epochs} loss {loss.item():.4f}")
    net.eval()
    with torch.no_grad():
        pool = net.features(prepare(_render_batch(train.grids, 16)))
        net.feature_rms.fill_(pool.pow(2).mean().sqrt())
    stats = {"seed": seed, "epochs": epochs, "feature_rms": float(net.feature_rms)}
    for name, ds in (("train", train), ("val", val)):
        for size in (16, 64):
            stats[f"{name}_acc_{size}px"] = accuracy(net, _render_batch(ds.grids, size), ds.labels)
    return net.requires_grad_(False), stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the digit classifier used as a feature extractor.")
    parser.add_argument("--out", type=Path, default=ASSET)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1 = bit-reproducible)")
    args = parser.parse_args(argv)
    from sar_core.checkpoint_io import atomic_save

    torch.set_num_threads(args.threads)
    net, stats = train_classifier(epochs=args.epochs, seed=args.seed)
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    atomic_save({"state_dict": sd, "meta": stats}, args.out)
    print(f"wrote {args.out}: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in stats.items()))


if __name__ == "__main__":
    main()
