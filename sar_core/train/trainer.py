"""The SAR post-training loop behind ``sar train``.

Per optimizer step, for each of ``grad_accum`` micro-batches: draw the step's schedule,
encode images with the frozen tokenizer (or take cached codes), run
:func:`sar_core.sar.step.sar_step` (teacher pass, memory-lean backward, rollout, student
pass, backward of gamma * CSF); then all-reduce (DDP / FSDP2), unscale (fp16), clip,
AdamW step, EMA, metrics, hooks, periodic checkpoints.

Loss normalisation: each backward gets ``loss / grad_accum`` and DDP averages over ranks,
so the gradient of an optimizer step equals that of one process on the global batch.

Guards: a step whose loss (or, without a loss scaler, gradient norm) is not finite on any
rank is skipped (no update) with a warning; ``max_nonfinite`` consecutive (or
``max_nonfinite_total``) such steps stop the run without writing a new checkpoint. A
checkpoint is *good* when its weights are finite and it was written before the run's
first non-finite step; the newest good one is never pruned by keep-last-N, and the stop
message names its step.

Run folder safety: the run holds ``<out>/.lock`` (:mod:`sar_core.train.runlock`) and clears
temp files of interrupted writes on start. SIGTERM / SIGUSR1 (:mod:`sar_core.train.signals`)
finish the step under way on every rank (the stop flag rides on the step's all-reduce),
rank 0 writes a checkpoint, the run ends with status "signalled". Ctrl-C in a
single-process run saves the state of the last completed step (resumable exactly); so
does a training-data read error; a crash never leaves a partial checkpoint. A resume
refuses another model or data and warns on every other changed hyper-parameter
(:mod:`sar_core.train.resume_check`).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from sar_core.train import checkpointing as ckpt
from sar_core.train import distributed as D
from sar_core.train import nonfinite as guard
from sar_core.train import resume_check
from sar_core.train.builders import (build_adapter, build_rollout_and_loss, build_schedule_sampler,  # noqa: F401
                               data_image_size, derived_seed, seed_all)
from sar_core.checkpoint_io import atomic_write_text
from sar_core.train.config import RunConfig
from sar_core.data.datasets import BatchStream, is_code_cache, open_training_data
from sar_core.train.runlock import held_run_folder
from sar_core.train.signals import StopRequest
from sar_core.train.ema import EMA
from sar_core.train.optim import build_optimizer, lr_at, set_lr
from sar_core.train.activation_ckpt import apply_activation_checkpointing
from sar_core.sar.step import sar_step
from sar_core.schedule import Schedule, ScheduleSampler


@dataclass
class TrainResult:
    status: str                 # "finished" | "nonfinite" | "interrupted" | "signalled"
    step: int
    out_dir: Path
    checkpoint: Optional[Path]  # newest checkpoint on disk
    message: str = ""


class DataReadError(Exception):
    """The training data could not be read mid-run (a corrupt image, a vanished file)."""


def _last_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def _console_print(msg: str) -> None:
    from rich.console import Console

    Console().print(msg, highlight=False)


def _silent(msg: str) -> None:
    pass


# ----------------------------------------------------------------------------- trainer
class Trainer:
    """One training run. ``run()`` trains to ``train.steps`` and returns a TrainResult.

    Attributes seen by plugins (``on_train_start(run)``): ``config``, ``out_dir``,
    ``step``, ``total_steps``, ``adapter``, ``env``.
    """

    def __init__(self, config: RunConfig, registry=None, env: Optional[D.DistEnv] = None,
                 log: Optional[Callable[[str], None]] = None):
        from sar_core.plugins import get_registry

        self.registry = registry or get_registry()
        self.config = cfg = config.with_absolute_paths(tuple(self.registry.names("dataset")))
        self.env = env or D.init_distributed(cfg.train.device, cfg.dist.backend, cfg.dist.timeout_s)
        self.log = log or (_console_print if self.env.is_main else _silent)
        self.console = None  # a rich Console the console logger shares (set by the CLI)
        self.out_dir = Path(cfg.out)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.total_steps = cfg.train.steps
        self.step = 0
        self.nonfinite = guard.fresh_state()
        self.stop = StopRequest()  # replaced by an installed one while run() runs
        self._stop_all = False     # some rank got a stop signal (agreed in the step's all-reduce)
        self._dirty = False
        self._snapshot: Optional[dict] = None
        self._check_batch()
        self._build()

    # ------------------------------------------------------------------ setup
    def _check_batch(self) -> None:
        t, world = self.config.train, self.env.world_size
        if t.batch_size % (world * t.grad_accum):
            raise ValueError(f"batch size {t.batch_size} is not divisible by ranks x grad_accum = "
                             f"{world} x {t.grad_accum}")
        self.micro_batch = t.batch_size // (world * t.grad_accum)

    def _build(self) -> None:
        cfg, env = self.config, self.env
        seed = cfg.train.seed
        seed_all(seed)  # identical initial weights on every rank
        self.adapter = build_adapter(cfg, self.registry)
        if cfg.model.backbone is None:
            self.log("note: no model.backbone given: training a freshly initialised backbone (pretraining)")
        self.rollout, self.csf_loss = build_rollout_and_loss(cfg, self.registry)
        self.sampler = build_schedule_sampler(self.adapter, cfg.model.schedule, seed, self.registry)
        self.adapter.check_schedule_sampler(self.sampler)  # the model's size rules (e.g. FlexVAR's latent)
        self.adapter.to(env.device)
        self.backbone = self.adapter.backbone
        self.backbone.train()
        if cfg.model.cond_drop is not None:
            self.adapter.condition_dropout = cfg.model.cond_drop
        self.dataset = self._open_data()
        from sar_core.data.classes import check_classes, data_num_classes

        check_classes(data_num_classes(self.dataset), self.adapter, cfg.model.resize_classes,
                      f"--data {cfg.data.name}", self.log)
        self.stream = BatchStream(self.dataset, self.micro_batch, env.rank, env.world_size, seed,
                                  workers=cfg.data.workers, pin_memory=env.device.type == "cuda")
        self._setup_precision()
        find_unused = cfg.dist.find_unused_parameters
        if find_unused is None:
            find_unused = bool(self.rollout.active and self.rollout.skips_parameters)
        apply_activation_checkpointing(self.adapter.transformer_blocks(), cfg.train.activation_checkpointing)
        self.model = D.wrap_model(self.backbone, env, cfg.dist.strategy, find_unused, cfg.train.compile)
        self.sync = D.GradSync(self.model, self.backbone, env)
        self.optimizer = build_optimizer(self.backbone, cfg.optim, self.adapter.no_decay_keywords, env.device)
        self.ema = EMA(self.backbone, cfg.train.ema) if cfg.train.ema > 0 else None
        seed_all(derived_seed(seed, env.rank, 0))  # per-rank streams (dropout, augmentation)
        self.generator = torch.Generator(device=env.device).manual_seed(derived_seed(seed, env.rank, 1))
        self.rollout_rng = random.Random(derived_seed(seed, 2))  # same on every rank

    def _open_data(self):
        cfg = self.config
        if is_code_cache(cfg.data.name):
            if type(self.sampler) is not ScheduleSampler:
                raise ValueError("a code cache holds one schedule; a random training schedule needs images")
            self._train_hw = None
            return open_training_data(cfg.data.name, cfg.data.split, None, cfg.data.options, self.registry,
                                      self.adapter, self.sampler.default)
        size = data_image_size(cfg, self.adapter, self.sampler)
        self._train_hw, options = tuple(size), dict(cfg.data.options)
        sizes = self.adapter.training_image_sizes(self.sampler)
        if len(sizes) > 1 and cfg.data.image_size is None:  # mixed aspect ratios may be bucketed
            options.setdefault("image_sizes", [list(hw) for hw in sizes])
        return open_training_data(cfg.data.name, cfg.data.split, size, options, self.registry)

    def _setup_precision(self) -> None:
        amp, dev = self.config.train.amp, self.env.device
        if amp != "none" and dev.type != "cuda":
            self.log(f"[yellow]warning:[/] --amp {amp} needs CUDA; training in float32 on {dev}")
            amp = "none"
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
        self.scaler = None
        if amp == "fp16":
            self.scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 11, growth_interval=1000)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------------ state
    def _rng_state(self) -> dict:
        return ckpt.capture_rng(self.generator, self.rollout_rng)

    def take_snapshot(self) -> None:
        """Data position, sampler and RNG state at the start of a step (for Ctrl-C saves)."""
        self._snapshot = {"step": self.step, "data": self.stream.position(),
                          "schedule_sampler": self.sampler.state_dict(), "rng": self._rng_state()}

    def state_dict(self, snapshot: Optional[dict] = None) -> dict:
        """Full training state (every rank must call it: FSDP gathers, RNGs are collected)."""
        live = snapshot or {"data": self.stream.position(), "schedule_sampler": self.sampler.state_dict(),
                            "rng": self._rng_state()}
        rngs = D.all_gather_objects(live["rng"], self.env)
        return {
            "model": D.model_state(self.backbone),
            "optimizer": D.optimizer_state(self.backbone, self.optimizer),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "data": {**live["data"], "seed": self.config.train.seed, "micro_batch": self.micro_batch,
                     "world_size": self.env.world_size},
            "schedule_sampler": live["schedule_sampler"],
            "rng": rngs,
            "nonfinite": dict(self.nonfinite),
            "lr": lr_at(max(self.step - 1, 0), self.total_steps, self.config.optim),
            "config": self.config.to_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        D.load_model_state(self.backbone, state["model"])
        D.load_optimizer_state(self.backbone, self.optimizer, state["optimizer"])
        if self.ema is not None:
            if state.get("ema") is None:
                self.log("[yellow]warning:[/] the checkpoint has no EMA; starting the EMA from its weights")
                self.ema = EMA(self.backbone, self.config.train.ema)
            else:
                self.ema.load_state_dict(state["ema"])
                self.ema.decay = self.config.train.ema
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.nonfinite = {**self.nonfinite, **(state.get("nonfinite") or {})}
        self.sampler.load_state_dict(state["schedule_sampler"])
        data = state["data"]
        same_layout = (data.get("world_size") == self.env.world_size and data.get("micro_batch") == self.micro_batch
                       and data.get("seed") == self.config.train.seed)
        if same_layout:
            self.stream.set_position(data["epoch"], data["batch"])
        else:
            self.log("[yellow]warning:[/] ranks, batch or seed changed since the checkpoint: the data "
                     f"restarts at the next epoch ({int(data['epoch']) + 1}); RNG streams are reseeded")
            self.stream.set_position(int(data["epoch"]) + 1, 0)
        rngs = state["rng"]
        if same_layout and len(rngs) == self.env.world_size:
            ckpt.restore_rng(rngs[self.env.rank], self.generator, self.rollout_rng)

    def save(self, snapshot: Optional[dict] = None) -> Optional[Path]:
        state = self.state_dict(snapshot)
        path = None
        if self.env.is_main:
            buffers = frozenset(n for n, _ in self.adapter.backbone.named_buffers())
            guard.mark_saved(self.nonfinite, self.step, ckpt.weights_finite(state["model"], buffers), self.log)
            state["nonfinite"] = dict(self.nonfinite)
            path = ckpt.save_checkpoint(state, self.ckpt_dir, self.step, self.config.train.keep_last,
                                        protect=self.nonfinite["good"])
            self.registry.hook.on_checkpoint_saved(path=path)
        D.barrier(self.env)
        return path

    def _check_resume(self, state: dict) -> None:
        """Refuse another model / data; warn on every other changed hyper-parameter."""
        saved = state.get("config")
        if not isinstance(saved, dict):
            return
        for line in resume_check.check(saved, self.config.to_dict(), str(self.out_dir)):
            self.log(f"[yellow]warning:[/] {line}")

    def resume(self) -> bool:
        existing = ckpt.list_checkpoints(self.ckpt_dir)
        if not self.config.resume:
            if existing:
                raise FileExistsError(f"{self.ckpt_dir} already holds checkpoints (newest: step "
                                      f"{existing[-1][0]}); pass --resume to continue, or another --out")
            return False
        state = ckpt.load_latest(self.ckpt_dir, warn=self.log)
        if state is None:
            self.log(f"[yellow]warning:[/] --resume: no checkpoint in {self.ckpt_dir}; starting from step 0")
            return False
        self._check_resume(state)
        self.load_state_dict(state)
        self.log(f"resumed from {state['path']} at step {self.step}")
        return True

    # ------------------------------------------------------------------ one step
    def _backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.config.train.grad_accum
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()

    def _expected_forwards(self, schedule: Schedule) -> int:
        return 1 + int(bool(self.rollout.active) and self.csf_loss is not None and len(schedule) >= 2)

    def _micro_step(self, last: bool) -> tuple[torch.Tensor, int]:
        cfg, adapter, dev = self.config, self.adapter, self.env.device
        try:
            batch = self.stream.next()
        except Exception as exc:
            raise DataReadError(f"reading the training data failed at step {self.step + 1}: {_last_line(exc)}; "
                                "fix or remove that file, then continue with --resume") from exc
        batch = batch.to(dev)
        schedule = self.sampler.sample()
        if batch.images is not None and tuple(batch.images.shape[-2:]) != self._train_hw:
            schedule = adapter.schedule_for_image_size(tuple(batch.images.shape[-2:]), schedule)
        if batch.codes is not None:
            codes = batch.codes
        else:
            with torch.no_grad():
                codes = adapter.encode(batch.images, schedule)
        cond = adapter.condition_to(adapter.condition(batch), dev)
        model = self.sync.micro(last, self._expected_forwards(schedule))
        with self._autocast():
            res = sar_step(adapter, model, cond, codes, schedule, self.rollout, self.csf_loss,
                           gamma=cfg.loss.gamma, label_smoothing=cfg.loss.label_smoothing,
                           generator=self.generator, rng=self.rollout_rng, backward=self._backward)
        losses = torch.stack([res.loss_tf.detach().float(), res.loss_csf.detach().float()])
        return losses, len(batch) * schedule.total_tokens

    def forward_backward(self) -> torch.Tensor:
        """All micro-steps of one optimizer step, gradients synced across ranks.

        Returns (loss_tf sum, loss_csf sum, non-finite micro-steps, tokens, ranks asked to
        stop) summed over micro-steps and ranks (float64)."""
        env, accum = self.env, self.config.train.grad_accum
        self.optimizer.zero_grad(set_to_none=True)
        self.sync.begin_step()
        sums = torch.zeros(5, dtype=torch.float64, device=env.device)
        for m in range(accum):
            losses, tokens = self._micro_step(m == accum - 1)
            finite = bool(torch.isfinite(losses).all())
            sums[:2] += torch.nan_to_num(losses.double(), nan=0.0, posinf=0.0, neginf=0.0)
            sums[2] += 0.0 if finite else 1.0
            sums[3] += tokens
        self.sync.finish()
        sums[4] = float(self.stop.requested)
        return D.all_reduce_sum(sums, env)

    def train_step(self) -> dict:
        """One optimizer step; returns its metrics (averaged over micro-steps and ranks)."""
        cfg, env = self.config, self.env
        lr = lr_at(self.step, self.total_steps, cfg.optim)
        set_lr(self.optimizer, lr)
        if env.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(env.device)
        t0 = time.perf_counter()
        sums = self.forward_backward()
        self._stop_all = sums[4].item() > 0
        n = cfg.train.grad_accum * env.world_size
        bad_loss = sums[2].item() > 0
        grad_norm, skipped = self._update(bad_loss)
        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)
        dt = time.perf_counter() - t0
        loss_tf, loss_csf = (float("nan"), float("nan")) if bad_loss else (sums[0].item() / n, sums[1].item() / n)
        metrics = {
            "step": self.step + 1, "loss": loss_tf + cfg.loss.gamma * loss_csf, "loss_tf": loss_tf,
            "loss_csf": loss_csf, "lr": lr, "grad_norm": grad_norm, "skipped": int(skipped),
            "epoch": self.stream.epoch, "step_time": dt, "images_per_s": cfg.train.batch_size / dt,
            "tokens_per_s": sums[3].item() / dt,
        }
        if self.scaler is not None:
            metrics["loss_scale"] = float(self.scaler.get_scale())
        if env.device.type == "cuda":
            metrics["max_mem_gb"] = torch.cuda.max_memory_allocated(env.device) / 2 ** 30
        return metrics

    def _update(self, bad_loss: bool) -> tuple[float, bool]:
        """Unscale, clip, step (or skip); returns (grad norm before clipping, skipped)."""
        params = [p for p in self.backbone.parameters() if p.grad is not None]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        clip = self.config.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        skipped = bad_loss or (self.scaler is None and not math.isfinite(norm))
        self._dirty = True
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.update()
            return norm, True
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.backbone)
        return norm, False

    # ------------------------------------------------------------------ the loop
    def _loggers(self) -> list:
        from sar_core.plugins import PluginError

        out = []
        for name in self.config.train.loggers:
            cls = self.registry.get("logger", name)
            try:
                out.append(cls(self))
            except ImportError as exc:
                self.log(f"logger '{name}' is off: {exc}")
            except PluginError:
                raise
        return out

    def _guard(self, metrics: dict) -> Optional[str]:
        """Count a skipped step; returns a stop message when the limits are reached."""
        t = self.config.train
        return guard.observe(self.nonfinite, metrics["step"], bool(metrics["skipped"]), t.max_nonfinite,
                             t.max_nonfinite_total, self.log)

    def _write_config(self) -> None:
        if self.env.is_main:
            atomic_write_text(self.config.to_yaml(), self.out_dir / "config.yaml")

    def run(self) -> TrainResult:
        """Lock the run folder, handle stop signals, train; see the module docstring."""
        with held_run_folder(self.out_dir, self.ckpt_dir, self.env, self.log), StopRequest() as stop:
            self.stop = stop
            try:
                return self._train()
            finally:
                self.stop = StopRequest()

    def _train(self) -> TrainResult:
        resumed = self.resume()
        self._write_config()
        hook = self.registry.hook
        main = self.env.is_main
        loggers = self._loggers() if main else []
        if main:
            hook.on_train_start(run=self)
        status, message = "finished", ""
        saved_at = self.step if resumed else None
        noted = False
        try:
            while self.step < self.total_steps:
                self.take_snapshot()
                metrics = self.train_step()
                self.step += 1
                self._dirty = False
                if main:
                    for lg in loggers:
                        lg.log(self.step, metrics)
                    hook.on_step_end(step=self.step, metrics=metrics)
                stop = self._guard(metrics)
                if stop:
                    status, message = "nonfinite", guard.stop_message(self.nonfinite, self.step, stop, self.ckpt_dir)
                    break
                every = self.config.train.save_every
                if every and self.step % every == 0 and not metrics["skipped"]:
                    self.save()
                    saved_at = self.step
                if self.stop.requested and not noted:
                    noted = True
                    self.log(f"received {self.stop.name}: writing a checkpoint and stopping (send it again "
                             "to stop at once)")
                if self._stop_all:
                    if saved_at != self.step:
                        self.save()
                        saved_at = self.step
                    status = "signalled"
                    message = (f"stopped by {self.stop.name} after step {self.step}; checkpoint "
                               f"{ckpt.checkpoint_path(self.ckpt_dir, self.step)} (continue with --resume)")
                    break
            if status == "finished":
                if saved_at != self.step:
                    self.save()
                self.export()
        except KeyboardInterrupt:
            status, message = "interrupted", self._save_on_interrupt()
        except DataReadError as exc:
            raise DataReadError(f"{exc} ({self._save_on_error()})") from exc.__cause__
        finally:
            for lg in loggers:
                lg.close()
            if main:
                hook.on_train_end(run=self)
        latest = ckpt.latest_checkpoint(self.ckpt_dir)
        return TrainResult(status, self.step, self.out_dir, latest, message)

    def _save_on_error(self) -> str:
        """Checkpoint of the last completed step after a data error (single process)."""
        snap = self._snapshot if self._snapshot and self._snapshot["step"] == self.step else None
        if self.env.enabled or self._dirty or snap is None or self.step == 0:
            latest = ckpt.latest_checkpoint(self.ckpt_dir)
            return f"newest checkpoint: {latest}" if latest else "no checkpoint written"
        newest = ckpt.list_checkpoints(self.ckpt_dir)
        if newest and newest[-1][0] == self.step:
            return f"checkpoint {newest[-1][1]}"
        try:
            return f"saved {self.save(snap)}"
        except Exception as exc:  # e.g. the disk is full too
            return f"saving the step-{self.step} checkpoint failed too: {_last_line(exc)}"

    def _save_on_interrupt(self) -> str:
        if self.env.enabled:
            return f"interrupted at step {self.step}; the newest checkpoint is kept"
        if self._dirty:
            return f"interrupted during an update at step {self.step}; the newest checkpoint is kept"
        snap = self._snapshot if self._snapshot and self._snapshot["step"] == self.step else None
        try:
            path = self.save(snap)
        except KeyboardInterrupt:
            return f"interrupted again while saving at step {self.step}; the newest complete checkpoint is kept"
        return f"interrupted at step {self.step}; saved {path} (continue with --resume)"

    def export(self) -> None:
        """Write the trained backbone (and its EMA) in the family's upstream layout."""
        main = self.env.is_main
        if D.is_fsdp(self.backbone):  # gather full weights, export from a plain copy on rank 0
            full = D.model_state(self.backbone)
            ema = self.ema.state_dict()["shadow"] if self.ema is not None else None
            if main:
                plain = build_adapter(self.config, self.registry)
                if plain.num_classes != self.adapter.num_classes:  # model.resize_classes
                    plain.resize_classes(self.adapter.num_classes)
                plain.backbone.load_state_dict(full)
                plain.save(None, self.out_dir / "backbone.pth")
                if ema is not None:
                    plain.backbone.load_state_dict({**full, **ema})
                    plain.save(None, self.out_dir / "backbone_ema.pth")
        elif main:
            self.adapter.save(None, self.out_dir / "backbone.pth")
            if self.ema is not None:
                with self.ema.swap_into(self.backbone):
                    self.adapter.save(None, self.out_dir / "backbone_ema.pth")
        D.barrier(self.env)
