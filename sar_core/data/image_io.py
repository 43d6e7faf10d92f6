"""Reading any image file as 8-bit RGB, correctly for every PIL mode.

``Image.convert("RGB")`` clips high-bit-depth modes instead of scaling them (a 16-bit PNG
becomes almost white) and drops alpha onto black. :func:`to_rgb8` scales 16-bit / 32-bit
integer and float images to 0..255, composites transparent images on white and converts
palette, grayscale and CMYK images; an unknown mode is refused with a message.

:class:`ConversionNotes` collects what had to be changed (grayscale, alpha, high bit
depth, upscaled small images) so that a dataset says it once, not once per image.
"""

from __future__ import annotations

import sys
import threading

import numpy as np
from PIL import Image

#: modes converted by PIL itself without loss of range
_PLAIN = {"RGB", "L", "P", "PA", "LA", "RGBA", "RGBa", "La", "CMYK", "YCbCr", "LAB", "HSV", "1", "RGBX"}
_HIGH = {"I", "F", "I;16", "I;16L", "I;16B", "I;16N", "I;16S", "I;32", "I;32L", "I;32B"}


def _scale_to_8bit(img: Image.Image) -> tuple[Image.Image, str]:
    """A 16/32-bit integer or float single-channel image -> 'L', scaled (not clipped)."""
    arr = np.asarray(img)
    if arr.dtype.kind == "f":
        finite = arr[np.isfinite(arr)]
        hi = float(finite.max()) if finite.size else 1.0
        top = 1.0 if hi <= 1.0 else (255.0 if hi <= 255.0 else 65535.0)
        scaled = np.nan_to_num(arr.astype(np.float64), nan=0.0) / top * 255.0
        note = f"float images ({img.mode}) scaled from 0..{top:g}"
    else:
        hi = int(arr.max()) if arr.size else 0
        top = 255 if hi <= 255 else (65535 if hi <= 65535 else int(np.iinfo(arr.dtype).max))
        scaled = arr.astype(np.float64) * (255.0 / top)
        note = f"{img.mode} images scaled from 0..{top} to 8 bit"
    out = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(out, mode="L"), note


def to_rgb8(img: Image.Image) -> tuple[Image.Image, list[str]]:
    """Any PIL image -> (8-bit 'RGB' image, notes on what was converted)."""
    mode, notes = img.mode, []
    if mode in _HIGH:
        img, note = _scale_to_8bit(img)
        notes.append(note)
        mode = "L"
    elif mode not in _PLAIN:
        raise ValueError(f"cannot read images of PIL mode {mode!r}; convert them to RGB (e.g. with PIL) first")
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] < 255:
            notes.append("transparent images composited on white")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), notes
    if mode in ("L", "1"):
        notes.append("grayscale images repeated to 3 channels")
    elif mode == "CMYK":
        notes.append("CMYK images converted to RGB")
    return img.convert("RGB"), notes


def open_rgb8(path) -> tuple[Image.Image, list[str]]:
    """Read a file as 8-bit RGB (see :func:`to_rgb8`); an unreadable file names itself."""
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb8(img)
    except (OSError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from None


class ConversionNotes:
    """Says each kind of conversion once per dataset: one ``warning:`` line on stderr
    (once per DataLoader worker process when workers fetch the items)."""

    def __init__(self, where: str):
        self.where, self.seen, self._lock = where, set(), threading.Lock()

    def __getstate__(self) -> dict:
        return {"where": self.where, "seen": set(self.seen)}

    def __setstate__(self, state: dict) -> None:
        self.where, self.seen, self._lock = state["where"], state["seen"], threading.Lock()

    def add(self, notes: list[str]) -> None:
        for note in notes:
            with self._lock:
                if note in self.seen:
                    continue
                self.seen.add(note)
            print(f"warning: {self.where}: {note} (said once)", file=sys.stderr, flush=True)


def adm_center_crop(img: Image.Image, size: int | tuple[int, int]) -> Image.Image:
    """Resize / centre-crop to ``size`` (S, or (H, W)) the way ADM's reference batches were
    made: halve with a box filter while the image is at least twice the target, resize
    bicubically so it just covers the target, then crop the centre."""
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    while img.width >= 2 * w and img.height >= 2 * h:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.BOX)
    scale = max(w / img.width, h / img.height)
    img = img.resize((max(w, round(img.width * scale)), max(h, round(img.height * scale))), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top, left = (arr.shape[0] - h) // 2, (arr.shape[1] - w) // 2
    return Image.fromarray(arr[top:top + h, left:left + w])
