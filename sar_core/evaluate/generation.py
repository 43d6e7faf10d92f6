"""Loading a model by family name and sampling image sets from it (eval, sample, demo).

Everything goes through the adapter contract (``adapter.generate``, ``adapter.condition``,
``adapter.inference()``), so it works for every registered family, class- or
text-conditioned. Images come back as float (N, 3, H, W) in [0, 1] on the CPU.
Seeding: one ``torch.Generator`` on the model's device is seeded once and drawn from batch
after batch, so a (seed, batch size) pair reproduces the same image set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from sar_core.adapter import ScaleWiseAdapter
from sar_core.batch import Batch
from sar_core.data.payloads import padded_features  # noqa: F401  (its home before sar_core.data.payloads)
from sar_core.schedule import Schedule

Progress = Optional[Callable[[int], None]]  # called with the number of images just made


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """'auto' / None -> cuda if available, else cpu."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_adapter(family: str, tokenizer: str | Path, backbone: str | Path | None = None,
                 device: str | torch.device | None = None, overrides: dict | None = None,
                 tokenizer_only: bool = False) -> ScaleWiseAdapter:
    """Look ``family`` up in the plugin registry and load its upstream checkpoint files;
    ``tokenizer_only`` (no ``backbone``): the tokenizer alone (``adapter.load_tokenizer``)."""
    from sar_core.plugins import get_registry

    cls = get_registry().get("adapter", family)
    if tokenizer_only:
        if backbone is not None:
            raise ValueError("a tokenizer-only load takes no backbone file")
        adapter = cls.load_tokenizer(tokenizer, overrides=overrides)
    else:
        adapter = cls.load(tokenizer, backbone, overrides=overrides)
    adapter.to(resolve_device(device))
    adapter.backbone.eval()
    return adapter


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


def condition_batch(conditions: Batch | dict, labels: Optional[torch.Tensor] = None) -> Batch:
    """A :class:`~sar_core.data.datasets.Batch` of condition payloads (no images): ``conditions`` is
    a Batch, or a dict payload name -> Padded / a payload file's content
    (:func:`sar_core.data.payloads.padded_features`)."""
    if isinstance(conditions, Batch):
        return conditions
    payloads = {k: padded_features(v, k) for k, v in conditions.items()}
    sizes = {len(p.lengths) for p in payloads.values()} | ({len(labels)} if labels is not None else set())
    if len(sizes) != 1:
        raise ValueError(f"condition payloads have different numbers of samples: {sorted(sizes)}")
    return Batch(labels, conditions=payloads)


@torch.no_grad()
def iter_images(adapter: ScaleWiseAdapter, labels: torch.Tensor | Batch | None = None, *,
                conditions: Batch | dict | None = None, schedule: Schedule | None = None,
                cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0, seed: int = 0,
                batch_size: int = 64, **options: Any) -> Iterator[torch.Tensor]:
    """One sample per condition, batch by batch (float (b, 3, H, W) in [0, 1], CPU), so a
    caller can stream them; one generator is seeded once and drawn from batch after batch.

    Conditions are class ids ``labels`` (N,) (class-conditional families, through
    ``adapter.condition_from_labels``), or ``conditions``: a :class:`~sar_core.data.datasets.Batch`
    (or a dict of payloads, see :func:`condition_batch`) turned into the family's
    condition by ``adapter.condition(batch)`` (e.g. text features)."""
    if isinstance(labels, Batch):
        labels, conditions = None, labels
    if (labels is None) == (conditions is None):
        raise ValueError("give class labels or condition payloads (exactly one)")
    if labels is not None:
        check_labels(labels, adapter.num_classes)
        n, make = len(labels), lambda rows: adapter.condition_from_labels(labels[rows].to(device))
    else:
        batch = condition_batch(conditions)
        n, make = len(batch), lambda rows: adapter.condition(batch.rows(rows).to(device))
    schedule = schedule or adapter.default_schedule
    device = adapter.device
    gen = torch.Generator(device=device).manual_seed(int(seed))
    with adapter.inference():
        for i in range(0, n, batch_size):
            rows = slice(i, min(i + batch_size, n))
            cond = adapter.condition_to(make(rows), device)
            result = adapter.generate(cond, schedule, cfg=cfg, top_k=top_k, top_p=top_p, generator=gen, **options)
            yield result.images.float().clamp(0, 1).cpu()


def generate_images(adapter: ScaleWiseAdapter, labels: torch.Tensor | Batch | None = None, *,
                    conditions: Batch | dict | None = None, schedule: Schedule | None = None,
                    cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0, seed: int = 0,
                    batch_size: int = 64, progress: Progress = None, **options: Any) -> torch.Tensor:
    """One sample per condition -> float (N, 3, H, W) in [0, 1] (see :func:`iter_images`)."""
    schedule = schedule or adapter.default_schedule
    out = []
    for images in iter_images(adapter, labels, conditions=conditions, schedule=schedule, cfg=cfg, top_k=top_k,
                              top_p=top_p, seed=seed, batch_size=batch_size, **options):
        out.append(images)
        if progress is not None:
            progress(len(images))
    return torch.cat(out) if out else torch.empty(0, 3, *adapter.image_size(schedule))


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
