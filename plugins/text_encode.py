"""``sar encode-text``: captions -> the condition payloads ``textimages`` reads.

Encoders (extra ``sar[text]``: transformers), always from a LOCAL model folder in
``save_pretrained`` layout (``config.json``, weights, tokenizer files); nothing is
downloaded (every load passes ``local_files_only=True``):

* ``t5`` (Infinity: flan-t5-xl, ``Ct5 = 2048``): payload ``text_features``, the encoder's
  ``last_hidden_state`` rows of the valid tokens (attention mask, EOS included), (n_i, d_model).
* ``clip`` (CLIP-conditioned families): ``clip_tokens``, the ``last_hidden_state`` rows of
  the valid tokens (n_i, hidden), and ``clip_pooled`` (1, D): the projected ``text_embeds``
  when the folder holds a text projection, else ``pooler_output``.

Both also encode the empty prompt into ``null_payloads.pt`` ({name: (n, D)}: the
encoder-derived null condition of families that need one).

Inputs: a ``textimages`` manifest (``captions.jsonl``: ``image`` + ``caption`` per line):
each payload goes to ``DIR/payloads/<name>/<image path>.pt`` beside it (one file per image,
written atomically). Or a text file, one prompt a line: ``--out DIR`` gets ``<name>.pt``
(a list of (n_i, D) tensors, what ``sar sample --payload NAME=FILE`` reads) and
``null_payloads.pt``. Resumable: a second run skips what is written (``encoder.json``
records the settings; a run with other settings is refused), so an interrupted run
continues where it stopped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from sar_core.checkpoint_io import atomic_save, atomic_write_text
from sar_core.data.payloads import NULL_FILE

ENCODERS = ("t5", "clip")
PAYLOADS = {"t5": ("text_features",), "clip": ("clip_pooled", "clip_tokens")}
SETTINGS = "encoder.json"
PARTS = ".parts"  # the per-prompt files of a text-file run, gathered at the end


def _transformers():
    """transformers (every load below passes ``local_files_only=True``: no hub look-up at all;
    the process environment is left alone, so ``hf://`` checkpoints elsewhere keep working)."""
    try:
        import transformers
    except ImportError:
        raise ImportError("sar encode-text needs the text extra: pip install 'sar[text]' (transformers)") from None
    return transformers


class TextEncoder:
    """A local T5 encoder or CLIP text model + its tokenizer, turning captions into payloads."""

    def __init__(self, kind: str, model_dir: str | Path, device: torch.device, dtype: torch.dtype,
                 max_length: Optional[int] = None):
        if kind not in ENCODERS:
            raise ValueError(f"--encoder must be one of {', '.join(ENCODERS)}, got {kind!r}")
        folder = Path(model_dir)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"--model {folder} must be a local folder in save_pretrained layout (config.json, "
                                    "weights, tokenizer files); sar encode-text downloads nothing")
        tf = _transformers()
        config = tf.AutoConfig.from_pretrained(folder, local_files_only=True)
        want = {"t5": ("t5", "mt5", "umt5"), "clip": ("clip", "clip_text_model")}[kind]
        if config.model_type not in want:
            raise ValueError(f"--model {folder} holds a '{config.model_type}' model, not a {kind} text encoder "
                             f"(model_type {' / '.join(want)})")
        self.kind, self.names, self.device, self.folder = kind, PAYLOADS[kind], device, folder
        self.tokenizer = tf.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        if kind == "t5":
            model = tf.T5EncoderModel.from_pretrained(folder, local_files_only=True)
        else:
            archs = getattr(config, "architectures", None) or []
            cls = tf.CLIPTextModelWithProjection if any("Projection" in a or a == "CLIPModel" for a in archs) \
                else tf.CLIPTextModel
            model = cls.from_pretrained(folder, local_files_only=True)
        self.model = model.to(device=device, dtype=dtype).eval()
        limit = getattr(self.model.config, "max_position_embeddings", None)
        self.max_length = int(max_length or limit or 512)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        """One {payload name: float32 (n_i, D) tensor} per caption (own storage each)."""
        tok = self.tokenizer(list(captions), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        out = self.model(input_ids=ids, attention_mask=mask)
        hidden_BLD = out.last_hidden_state.float()
        lengths = mask.sum(-1).tolist()
        if self.kind == "t5":
            return [{"text_features": hidden_BLD[i, :n].clone()} for i, n in enumerate(lengths)]
        pooled_BD = (out.text_embeds if getattr(out, "text_embeds", None) is not None else out.pooler_output).float()
        return [{"clip_pooled": pooled_BD[i:i + 1].clone(), "clip_tokens": hidden_BLD[i, :n].clone()}
                for i, n in enumerate(lengths)]

    def settings(self) -> dict:
        """What the written features depend on (a resumed run must match it)."""
        return {"encoder": self.kind, "model": str(self.folder.resolve()), "max_length": self.max_length,
                "dtype": str(self.model.dtype).replace("torch.", ""), "payloads": list(self.names)}


@dataclass
class Job:
    """What to encode and where each caption's payload files go."""

    keys: list[str]          # one per caption: the manifest's image path, or the prompt's line index
    captions: list[str]
    folder: Path             # where payload columns, null_payloads.pt and encoder.json go
    file_of: Callable[[str, str], Path]   # (payload name, key) -> file
    gather: Optional[Path] = None          # text-file runs: write <name>.pt lists here at the end


def manifest_job(path: Path) -> Job:
    from sar_plugins.textimages import PAYLOAD_DIR, payload_path, read_manifest

    root = path.parent
    rows = read_manifest(root, path.name)
    missing = [r["image"] for r in rows if not isinstance(r.get("caption"), str)]
    if missing:
        raise ValueError(f"{path}: {len(missing)} rows have no 'caption' string (e.g. {missing[0]})")
    keys = [r["image"] for r in rows]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{path} lists an image twice; each image needs one caption")
    return Job(keys, [r["caption"] for r in rows], root,
               lambda name, key: root / PAYLOAD_DIR / name / payload_path(key))


def prompts_job(path: Path, out: Optional[Path]) -> Job:
    if out is None:
        raise ValueError(f"{path} is a prompts file (one prompt a line): give --out DIR for the payload files")
    captions = [line.rstrip("\n") for line in path.read_text().splitlines()]
    while captions and not captions[-1].strip():
        captions.pop()
    if not captions:
        raise ValueError(f"{path} holds no prompts")
    return Job([f"{i:08d}" for i in range(len(captions))], captions, out,
               lambda name, key: out / PARTS / name / f"{key}.pt", gather=out)


def check_settings(job: Job, settings: dict) -> None:
    """Refuse to continue a folder encoded with other settings; record them otherwise."""
    path = job.folder / (PARTS if job.gather is not None else "payloads") / SETTINGS
    if path.is_file():
        old = json.loads(path.read_text())
        if old != settings:
            diff = ", ".join(f"{k} {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v)
            raise ValueError(f"{job.folder} was encoded with other settings ({diff}); use the same settings to "
                             f"continue, or delete {path.parent} to start again")
    else:
        atomic_write_text(json.dumps(settings, indent=2) + "\n", path)


def run(job: Job, encoder: TextEncoder, batch_size: int, progress: Callable[[int], None],
        stop: Callable[[], bool] = lambda: False) -> tuple[int, int]:
    """Encode every caption whose files are not all written yet, batch by batch, each file
    atomically. Returns (already done at the start, newly written). ``stop()`` is asked
    after each batch (SIGTERM): then it returns early and a later run continues."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    check_settings(job, encoder.settings())
    atomic_save(encoder.encode([""])[0], job.folder / NULL_FILE)
    todo = [i for i, k in enumerate(job.keys) if not all(job.file_of(n, k).is_file() for n in encoder.names)]
    done_before = len(job.keys) - len(todo)
    progress(done_before)
    written = 0
    for start in range(0, len(todo), batch_size):
        rows = todo[start:start + batch_size]
        for i, payloads in zip(rows, encoder.encode([job.captions[i] for i in rows])):
            for name, value in payloads.items():
                atomic_save(value, job.file_of(name, job.keys[i]))
        written += len(rows)
        progress(len(rows))
        if stop() and start + batch_size < len(todo):
            return done_before, written
    if job.gather is not None:
        gather(job, encoder.names)
    return done_before, written


def gather(job: Job, names) -> None:
    """A text-file run's per-prompt files -> one list file per payload (``--payload NAME=FILE``)."""
    from sar_core.checkpoint_io import load_file

    for name in names:
        values = [load_file(job.file_of(name, k), what=f"payload '{name}'") for k in job.keys]
        atomic_save(values, job.gather / f"{name}.pt")
