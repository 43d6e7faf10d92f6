"""The checkpoints part of a run: composes the other parts' state dicts into one file.

A run is a set of named parts, each owning its state (``state_dict`` /
``load_state_dict``): model, optimizer, EMA, loss scaler, data position, schedule sampler,
RNG streams, non-finite guard, plus two saved-only entries (the learning rate and the run
config). The names are the checkpoint's top-level keys, in this order; the file format
itself (atomic writes, keep-last-N, the "good" checkpoint) is :mod:`sar_core.train.checkpointing`.

Parts that move during a step (data position, sampler, RNG) also ``capture()`` their
state: :meth:`Checkpointer.take_snapshot` records them at the start of every step, so a
Ctrl-C or a data error mid-step can still save the last completed step exactly.

Under FSDP2 the parts that hold sharded tensors (model, optimizer state, EMA) also give
``sharded_state()``: (this rank's shards, the rest of their state). Those go to a sharded
DCP checkpoint folder, each rank writing its own shards, nothing gathered; the other parts'
state and the rest go to its ``state.pt`` (:mod:`sar_core.train.sharded_ckpt`). Such a
checkpoint resumes on any number of ranks (into a single process too); single-process and
DDP runs write the one-file checkpoints as before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from sar_core.adapter import CheckpointError
from sar_core.train import checkpointing as ckpt
from sar_core.train import distributed as D
from sar_core.train import resume_check, sharded_ckpt
from sar_core.train.ema import EMA
from sar_core.train.nonfinite import NonFiniteGuard, NonFiniteWeights, check_start_weights


class UnreadableCheckpoints(CheckpointError):
    """``--resume`` found checkpoints but could read none of them (bad input: exit status 2)."""


# ----------------------------------------------------------------------------- parts
class ModelPart:
    def __init__(self, module: nn.Module):
        self.module = module

    def state_dict(self) -> dict:
        return D.model_state(self.module)  # full tensors (gathered under FSDP2)

    def load_state_dict(self, state: dict) -> None:
        D.load_model_state(self.module, state)

    def sharded_state(self) -> tuple[dict, None]:
        return D.sharded_model_state(self.module), None

    def load_sharded_state(self, tensors: dict, rest: Any) -> None:
        D.load_sharded_model_state(self.module, tensors)


class OptimizerPart:
    def __init__(self, module: nn.Module, optimizer):
        self.module, self.optimizer = module, optimizer

    def state_dict(self) -> dict:
        return D.optimizer_state(self.module, self.optimizer)

    def load_state_dict(self, state: dict) -> None:
        D.load_optimizer_state(self.module, self.optimizer, state)

    partial = True  # parameters without state when saved have none after loading

    def sharded_state(self) -> tuple[dict, list]:
        sd = D.sharded_optimizer_state(self.module, self.optimizer)
        return sd["state"], sd["param_groups"]

    def load_sharded_state(self, tensors: dict, rest: list) -> None:
        D.load_sharded_optimizer_state(self.module, self.optimizer, {"state": tensors, "param_groups": rest})


class EMAPart:
    """The EMA when the run keeps one (``None`` in the file otherwise). A checkpoint without
    one restarts the average from the loaded weights; the decay is always the run's."""

    optional = True

    def __init__(self, ema: Optional[EMA], module: nn.Module, decay: float, log: Callable[[str], None]):
        self.ema, self.module, self.decay, self.log = ema, module, decay, log

    def state_dict(self) -> Optional[dict]:
        return self.ema.state_dict() if self.ema is not None else None

    def load_state_dict(self, state: Optional[dict]) -> None:
        if self.ema is None:
            return
        if state is None:
            self.log("[yellow]warning:[/] the checkpoint has no EMA; starting the EMA from its weights")
            self.ema.reset(self.module)
        else:
            self.ema.load_state_dict(state)
        self.ema.decay = self.decay

    def sharded_state(self) -> Optional[tuple[dict, dict]]:
        return (dict(self.ema.shadow), {"decay": self.ema.decay}) if self.ema is not None else None

    def load_sharded_state(self, tensors: dict, rest: Any) -> None:
        self.ema.decay = self.decay  # the shadow tensors were loaded in place


class ScalerPart:
    optional = True

    def __init__(self, scaler):
        self.scaler = scaler

    def state_dict(self) -> Optional[dict]:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: Optional[dict]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


class SamplerPart:
    """The schedule sampler (its draws move during a step)."""

    def __init__(self, sampler):
        self.sampler = sampler

    def capture(self) -> dict:
        return self.sampler.state_dict()

    def state_dict(self, captured: Optional[dict] = None) -> dict:
        return captured if captured is not None else self.capture()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


class Saved:
    """A saved-only entry (a value derived from the run: read back by nobody)."""

    optional = True

    def __init__(self, value: Callable[[], Any]):
        self.value = value

    def state_dict(self) -> Any:
        return self.value()

    def load_state_dict(self, state: Any) -> None:
        pass


# ----------------------------------------------------------------------------- checkpointer
class Checkpointer:
    def __init__(self, ckpt_dir: Path, keep_last: int, parts: dict[str, Any], guard: NonFiniteGuard,
                 env: D.DistEnv, log: Callable[[str], None], buffer_names: Callable[[], frozenset],
                 on_saved: Callable[[Path], None], fmt: str = "pt"):
        """``parts``: name -> part, in file order (must include ``model`` and ``nonfinite``:
        ``guard``); ``buffer_names``: the model's buffers (may hold -inf by design);
        ``fmt``: the file format of new checkpoints (pt | safetensors)."""
        self.fmt = fmt
        self.dir, self.keep_last, self.parts, self.guard = Path(ckpt_dir), keep_last, parts, guard
        self.env, self.log, self.buffer_names, self.on_saved = env, log, buffer_names, on_saved
        self._snapshot: Optional[dict] = None
        self.sharded = D.is_fsdp(getattr(parts.get("model"), "module", None))  # FSDP2: DCP checkpoints

    # ------------------------------------------------------------------ state
    def take_snapshot(self, step: int) -> None:
        """The moving parts' state at the start of ``step + 1`` (for saves mid-step)."""
        self._snapshot = {"step": step, **{n: p.capture() for n, p in self.parts.items() if hasattr(p, "capture")}}

    def snapshot_at(self, step: int) -> Optional[dict]:
        snap = self._snapshot
        return snap if snap and snap["step"] == step else None

    def state_dict(self, snapshot: Optional[dict] = None) -> dict:
        """Every part's state (every rank must call it: FSDP gathers, RNGs are collected);
        moving parts from ``snapshot`` when given."""
        snap = snapshot or {}
        return {n: p.state_dict(snap[n]) if n in snap else p.state_dict() for n, p in self.parts.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, part in self.parts.items():
            part.load_state_dict(state.get(name) if getattr(part, "optional", False) else state[name])

    # ------------------------------------------------------------------ files
    def save(self, step: int, snapshot: Optional[dict] = None) -> Optional[Path]:
        """Write the checkpoint of ``step`` (rank 0; every rank calls); its path on rank 0."""
        if self.sharded:
            return self._save_sharded(step, snapshot)
        state = self.state_dict(snapshot)
        path = None
        if self.env.is_main:
            self.guard.mark_saved(step, ckpt.weights_finite(state["model"], self.buffer_names()))
            state["nonfinite"] = self.guard.state_dict()
            path = ckpt.save_checkpoint(state, self.dir, step, self.keep_last, protect=self.guard.good,
                                        fmt=self.fmt)
            self.on_saved(path)
        D.barrier(self.env)
        return path

    def _save_sharded(self, step: int, snapshot: Optional[dict]) -> Optional[Path]:
        """The sharded checkpoint of ``step``: every rank writes its shards (no gather)."""
        snap = snapshot or {}
        tensors, rest = {}, {}
        for n, p in self.parts.items():
            got = p.sharded_state() if hasattr(p, "sharded_state") else None
            if got is not None:
                tensors[n] = got[0]
                if got[1] is not None:
                    rest[n] = got[1]
            else:
                rest[n] = p.state_dict(snap[n]) if n in snap else p.state_dict()
        finite = self._nonfinite_anywhere(tensors["model"]) is None
        if self.env.is_main:
            self.guard.mark_saved(step, finite)
            rest["nonfinite"] = self.guard.state_dict()
        path = ckpt.save_sharded_checkpoint(tensors, rest, self.dir, step, self.keep_last, self.env,
                                            protect=self.guard.good)
        if self.env.is_main:
            self.on_saved(path)
        D.barrier(self.env)
        return path

    def _nonfinite_anywhere(self, tensors: dict) -> Optional[tuple[str, str]]:
        """(name, what) of a non-finite weight on any rank's shards, or None (collective)."""
        bad = ckpt.first_nonfinite(tensors, self.buffer_names())
        flag = torch.tensor([float(bad is not None)], dtype=torch.float64, device=self.env.device)
        if D.all_reduce_sum(flag, self.env).item() == 0:
            return None
        return bad or ("(on another rank's shard)", "NaN or an infinity")

    def _load_sharded(self, state: dict) -> None:
        """Load a sharded checkpoint: the shards of this rank's tensors (resharded from however
        many ranks wrote it), then every other part from its ``state.pt``."""
        folder = Path(state["path"])
        keys = set(sharded_ckpt.read_index(folder).state_dict_metadata)
        templates = {}
        for name in state["sharded"]:
            part = self.parts.get(name)
            got = part.sharded_state() if hasattr(part, "sharded_state") else None
            if got is not None:
                templates[name] = sharded_ckpt.present(got[0], keys, name + sharded_ckpt.SEP) \
                    if getattr(part, "partial", False) else got[0]
        sharded_ckpt.load_into(folder, templates, self.env)
        bad = self._nonfinite_anywhere(templates["model"])
        if bad is not None:
            raise NonFiniteWeights(f"the starting weights are not finite: tensor '{bad[0]}' of the checkpoint "
                                   f"{folder} holds {bad[1]}; resume from an older checkpoint (move the newer ones "
                                   f"out of {self.dir}), or start over with --restart")
        for name, part in self.parts.items():
            if name in templates:
                part.load_sharded_state(templates[name], state.get(name))
            else:
                part.load_state_dict(state.get(name) if getattr(part, "optional", False) else state[name])

    def resume(self, resume: bool, config: dict, out_dir: Path, restart: bool = False) -> Optional[dict]:
        """Load the newest readable checkpoint into the parts (``--resume``); returns it, or
        None when the run starts from step 0. Without ``resume`` existing checkpoints are
        an error (a new run must not overwrite them) unless ``restart`` (start over: they
        are deleted). Checkpoints that exist but none of which can be read are an error
        too: nothing is changed, the run does not start over by itself."""
        existing = ckpt.list_checkpoints(self.dir)
        if restart:
            if existing and self.env.is_main:
                for _, path in existing:
                    ckpt.remove_checkpoint(path)
                self.log(f"--restart: deleted the {len(existing)} checkpoint(s) of the previous run in {self.dir} "
                         f"(newest: step {existing[-1][0]}); starting over at step 0")
            D.barrier(self.env)
            return None
        if not resume:
            if existing:
                raise FileExistsError(f"{self.dir} already holds checkpoints (newest: step "
                                      f"{existing[-1][0]}); pass --resume to continue, --restart to start over "
                                      "(deletes them), or another --out")
            return None
        errors: list = []
        state = ckpt.load_latest(self.dir, warn=self.log, errors=errors)
        if state is None and existing:
            why: dict[str, list[str]] = {}  # one reason, the files it applies to
            for path, exc in errors:
                why.setdefault(ckpt.last_line(exc).replace(str(path), "the file"), []).append(path.name)
            raise UnreadableCheckpoints(
                f"--resume: none of the {len(existing)} checkpoint(s) in {self.dir} can be read ("
                + "; ".join(f"{', '.join(names)}: {text}" for text, names in why.items()) + "); nothing was "
                "changed: restore them, or pass --restart instead of --resume to start over (deletes them)")
        if state is None:
            self.log(f"[yellow]warning:[/] --resume: no checkpoint in {self.dir}; starting from step 0")
            return None
        self.check_resume(state, config, out_dir)
        if state.get("sharded"):
            self._load_sharded(state)
            return state
        check_start_weights(state["model"], self.buffer_names(), f"the checkpoint {state['path']}",
                            f"resume from an older checkpoint (move the newer ones out of {self.dir}), or "
                            "start over with --restart")
        self.load_state_dict(state)
        return state

    def check_resume(self, state: dict, config: dict, out_dir: Path) -> None:
        """Refuse another model / data; warn on every other changed hyper-parameter."""
        saved = state.get("config")
        if isinstance(saved, dict):
            for line in resume_check.check(saved, config, str(out_dir)):
                self.log(f"[yellow]warning:[/] {line}")

    # ------------------------------------------------------------------ saves after a failure
    def save_after_data_error(self, step: int, dirty: bool) -> str:
        """Checkpoint of the last completed step after a data error (single process)."""
        snap = self.snapshot_at(step)
        if self.env.enabled or dirty or snap is None or step == 0:
            latest = ckpt.latest_checkpoint(self.dir)
            return f"newest checkpoint: {latest}" if latest else "no checkpoint written"
        newest = ckpt.list_checkpoints(self.dir)
        if newest and newest[-1][0] == step:
            return f"checkpoint {newest[-1][1]}"
        try:
            return f"saved {self.save(step, snap)}"
        except Exception as exc:  # e.g. the disk is full too
            return f"saving the step-{step} checkpoint failed too: {ckpt.last_line(exc)}"

    def save_after_interrupt(self, step: int, dirty: bool) -> str:
        """Checkpoint of the last completed step after Ctrl-C (single process)."""
        if self.env.enabled:
            return f"interrupted at step {step}; the newest checkpoint is kept"
        if dirty:
            return f"interrupted during an update at step {step}; the newest checkpoint is kept"
        try:
            path = self.save(step, self.snapshot_at(step))
        except KeyboardInterrupt:
            return f"interrupted again while saving at step {step}; the newest complete checkpoint is kept"
        return f"interrupted at step {step}; saved {path} (continue with --resume)"
