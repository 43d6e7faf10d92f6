"""Loading a model by family name and sampling image sets from it (eval, sample, demo).

Everything goes through the adapter contract (``adapter.generate``), so it works for
every registered family. Images come back as float (N, 3, H, W) in [0, 1] on the CPU.
Seeding: one ``torch.Generator`` on the model's device is seeded once and drawn from batch
after batch, so a (seed, batch size) pair reproduces the same image set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from sar_core.adapter import ScaleWiseAdapter
from sar_core.schedule import Schedule

Progress = Optional[Callable[[int], None]]  # called with the number of images just made


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """'auto' / None -> cuda if available, else cpu."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_adapter(family: str, tokenizer: str | Path, backbone: str | Path | None = None,
                 device: str | torch.device | None = None, overrides: dict | None = None) -> ScaleWiseAdapter:
    """Look ``family`` up in the plugin registry and load its upstream checkpoint files."""
    from sar_core.plugins import get_registry

    cls = get_registry().get("adapter", family)
    adapter = cls.load(tokenizer, backbone, overrides=overrides)
    adapter.to(resolve_device(device))
    adapter.backbone.eval()
    return adapter


def config_value(config: Any, *names: str) -> Any:
    """The first field called one of ``names`` in a (nested) adapter config, else None."""
    tree = config.model_dump() if hasattr(config, "model_dump") else dict(config)
    stack = [tree]
    while stack:
        node = stack.pop(0)
        for name in names:
            if isinstance(node.get(name), (int, float)):
                return node[name]
        stack.extend(v for v in node.values() if isinstance(v, dict))
    return None


def num_classes_of(adapter: ScaleWiseAdapter) -> Optional[int]:
    """The number of classes of a class-conditional family (a ``num_classes`` config field)."""
    n = config_value(adapter.config, "num_classes")
    return int(n) if n is not None else None


def parse_labels(text: str) -> list[int]:
    """'1,2,3' or '1 2 3' -> [1, 2, 3] with a clear error."""
    try:
        labels = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"labels must be integers separated by commas, got {text!r}") from None
    if not labels:
        raise ValueError("no labels given")
    return labels


def balanced_labels(num: int, num_classes: int) -> torch.Tensor:
    """``num`` labels cycling 0..C-1, so every class gets num // C or num // C + 1 images."""
    if num < 1 or num_classes < 1:
        raise ValueError(f"need num >= 1 and num_classes >= 1, got {num}, {num_classes}")
    return torch.arange(num) % num_classes


def check_labels(labels: torch.Tensor, num_classes: Optional[int]) -> None:
    if num_classes is not None and len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1} for this model, got "
                         f"{sorted(set(labels.tolist()))}")


@torch.no_grad()
def iter_images(adapter: ScaleWiseAdapter, labels: torch.Tensor, *, schedule: Schedule | None = None,
                cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0, seed: int = 0,
                batch_size: int = 64, **options: Any) -> Iterator[torch.Tensor]:
    """Class-conditional samples batch by batch (float (b, 3, H, W) in [0, 1], CPU), so a
    caller can stream them; one generator is seeded once and drawn from batch after batch."""
    schedule = schedule or adapter.default_schedule
    check_labels(labels, num_classes_of(adapter))
    device = adapter.device
    gen = torch.Generator(device=device).manual_seed(int(seed))
    was_training = adapter.backbone.training
    adapter.backbone.eval()
    try:
        for i in range(0, len(labels), batch_size):
            lab = labels[i:i + batch_size].to(device)
            cond = adapter.condition_to(adapter.condition_from_labels(lab), device)
            result = adapter.generate(cond, schedule, cfg=cfg, top_k=top_k, top_p=top_p, generator=gen, **options)
            yield result.images.float().clamp(0, 1).cpu()
    finally:
        adapter.backbone.train(was_training)


def generate_images(adapter: ScaleWiseAdapter, labels: torch.Tensor, *, schedule: Schedule | None = None,
                    cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0, seed: int = 0,
                    batch_size: int = 64, progress: Progress = None, **options: Any) -> torch.Tensor:
    """Class-conditional samples, one per entry of ``labels`` -> float (N, 3, H, W) in [0, 1]."""
    schedule = schedule or adapter.default_schedule
    out = []
    for images in iter_images(adapter, labels, schedule=schedule, cfg=cfg, top_k=top_k, top_p=top_p, seed=seed,
                              batch_size=batch_size, **options):
        out.append(images)
        if progress is not None:
            progress(len(images))
    return torch.cat(out) if out else torch.empty(0, 3, *adapter.image_size(schedule))


@torch.no_grad()
def generate_from_text(adapter: ScaleWiseAdapter, features: Any, *, schedule: Schedule | None = None,
                       cfg: float = 4.0, top_k: int = 0, top_p: float = 0.0, seed: int = 0,
                       **options: Any) -> torch.Tensor:
    """Text-conditioned samples from precomputed text features (one batch).

    Needs an adapter with ``condition_from_text_features(features)`` (text-conditioned
    families); class-conditional families get a clear error."""
    hook = getattr(adapter, "condition_from_text_features", None)
    if hook is None:
        raise ValueError(f"family '{adapter.name}' is not text-conditioned: its adapter has no "
                         "condition_from_text_features(); use --labels / --per-class instead")
    schedule = schedule or adapter.default_schedule
    device = adapter.device
    cond = adapter.condition_to(hook(features), device)
    gen = torch.Generator(device=device).manual_seed(int(seed))
    result = adapter.generate(cond, schedule, cfg=cfg, top_k=top_k, top_p=top_p, generator=gen, **options)
    return result.images.float().clamp(0, 1).cpu()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [0, 1] -> uint8 0..255 (round half up, as PIL / torchvision save)."""
    return images.clamp(0, 1).mul(255).add(0.5).floor().to(torch.uint8)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, padding: int = 2) -> Path:
    """One PNG grid of float images in [0, 1]."""
    from torchvision.utils import save_image

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if nrow is None:
        nrow = max(1, int(round(len(images) ** 0.5)))
    save_image(images, p, nrow=nrow, padding=padding)
    return p


def save_folder(images: torch.Tensor, out_dir: str | Path, labels: Sequence[int] | None = None,
                start: int = 0) -> list[Path]:
    """One PNG per image: ``{index:06d}.png`` or ``{index:06d}_c{label}.png``."""
    from torchvision.utils import save_image

    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for j, img in enumerate(images):
        i = start + j
        name = f"{i:06d}.png" if labels is None else f"{i:06d}_c{int(labels[j])}.png"
        save_image(img, d / name)
        paths.append(d / name)
    return paths
