"""The SAR post-training loop behind ``sar train``, as a loop over parts.

A run is built from parts (:meth:`Trainer._build`), each owning its state: the data
position (:mod:`~sar_core.train.data_position`), the RNG streams
(:mod:`~sar_core.train.rng_state`), the EMA (:mod:`~sar_core.train.ema`), the non-finite
guard (:mod:`~sar_core.train.nonfinite`), and the checkpointer
(:mod:`~sar_core.train.checkpointer`) that composes their state dicts (with model,
optimizer, loss scaler and schedule sampler) into one file. One optimizer step is
:class:`~sar_core.train.train_step.StepRunner`; :meth:`Trainer._train` is the loop.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from sar_core.train import checkpointing as ckpt
from sar_core.train import distributed as D
from sar_core.train.builders import (build_adapter, build_rollout_and_loss, build_schedule_sampler,  # noqa: F401
                                     data_image_size, derived_seed, open_run_data, prepare_conditions,
                                     seed_all)
from sar_core.checkpoint_io import atomic_write_text
from sar_core.train.checkpointer import (Checkpointer, EMAPart, ModelPart, OptimizerPart, SamplerPart, Saved,
                                         ScalerPart)
from sar_core.train.compiling import compile_blocks, compiled_graphs
from sar_core.train.config import RunConfig
from sar_core.data.datasets import BatchStream
from sar_core.train.data_position import DataPosition
from sar_core.train.ema import EMA
from sar_core.train.nonfinite import NonFiniteGuard, check_start_weights
from sar_core.train.optim import build_optimizer, lr_at
from sar_core.train.periodic_eval import PeriodicEval
from sar_core.train.rng_state import RNGState
from sar_core.train.runlock import held_run_folder
from sar_core.train.settings import settings_line
from sar_core.train import signals
from sar_core.train.signals import StopRequest
from sar_core.train.activation_ckpt import apply_activation_checkpointing
from sar_core.train.train_step import DataReadError, StepRunner, amp_setup  # noqa: F401  (DataReadError: cli)


@dataclass
class TrainResult:
    status: str                 # "finished" | "nonfinite" | "interrupted" | "signalled"
    step: int
    out_dir: Path
    checkpoint: Optional[Path]  # newest checkpoint on disk
    message: str = ""
    skipped: int = 0            # steps skipped as non-finite (no update), in the whole run
    skipped_last: int = 0       # of those, how many in a row at the end


def _console_print(msg: str) -> None:
    from rich.console import Console

    Console().print(msg, highlight=False)


def _silent(msg: str) -> None:
    pass


class Trainer:
    """One training run. ``run()`` trains to ``train.steps`` and returns a TrainResult.

    Attributes seen by plugins (``on_train_start(run)``): ``config``, ``out_dir``,
    ``step``, ``total_steps``, ``adapter``, ``env``; at ``on_train_end(run)`` also ``status``
    (as :class:`TrainResult`'s, or "crashed"). Validation during training
    (:mod:`sar_core.train.periodic_eval`) is such a plugin, registered for the run.
    """

    def __init__(self, config: RunConfig, registry=None, env: Optional[D.DistEnv] = None,
                 log: Optional[Callable[[str], None]] = None, restart: bool = False, folder_held: bool = False):
        """``restart``: start over at step 0 even where ``out`` holds checkpoints (they are
        deleted before step 1; ``sar train --restart``). ``folder_held``: the caller holds
        the run-folder lock already (``sar train`` takes it before building the run), so
        :meth:`run` does not take it."""
        from sar_core.plugins import get_registry

        self.registry = registry or get_registry()
        self.config = cfg = config.with_absolute_paths(tuple(self.registry.names("dataset"))).with_pinned_checkpoints()
        self.env = env or D.init_distributed(cfg.train.device, cfg.dist.backend, cfg.dist.timeout_s)
        self.log = log or (_console_print if self.env.is_main else _silent)
        self.console = None  # a rich Console the console logger shares (set by the CLI)
        self.out_dir = Path(cfg.out)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.total_steps = cfg.train.steps
        self.step = 0
        self.restart, self.folder_held = restart, folder_held
        if restart and cfg.resume:
            raise ValueError("--restart starts over and --resume continues: pass one of them")
        self.stop = StopRequest()  # replaced by an installed one while run() runs
        self._stop_all = False     # some rank got a stop signal (agreed in the step's all-reduce)
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
        cfg, env, seed = self.config, self.env, self.config.train.seed
        seed_all(seed)  # identical initial weights on every rank
        self.adapter = build_adapter(cfg, self.registry)
        if cfg.model.backbone is None:
            self.log("note: no model.backbone given: training a freshly initialised backbone (pretraining)")
        self.sampler = build_schedule_sampler(self.adapter, cfg.model.schedule, seed, self.registry)
        self.rollout, self.csf_loss = build_rollout_and_loss(cfg, self.registry, self.sampler.default)
        self.adapter.check_schedule_sampler(self.sampler)  # the model's size rules (e.g. FlexVAR's latent)
        self.adapter.to(env.device)
        self.backbone = self.adapter.backbone
        self.backbone.train()
        if cfg.model.cond_drop is not None:
            self.adapter.condition_dropout = cfg.model.cond_drop
        self.dataset, self._train_hw = open_run_data(cfg, self.adapter, self.sampler, self.registry)
        prepare_conditions(cfg, self.adapter, self.dataset, self.log)  # payloads read, null payloads given
        from sar_core.data.classes import check_classes, data_num_classes

        check_classes(data_num_classes(self.dataset), self.adapter, cfg.model.resize_classes,
                      f"--data {cfg.data.name}", self.log)
        if not (cfg.resume and ckpt.list_checkpoints(self.ckpt_dir)):  # a resume checks the checkpoint's
            check_start_weights(self.backbone.state_dict(), self._buffer_names(), self._weights_source(),
                                "fix or replace that file")
        self.stream = BatchStream(self.dataset, self.micro_batch, env.rank, env.world_size, seed,
                                  workers=cfg.data.workers, pin_memory=env.device.type == "cuda",
                                  worker_init_fn=signals.ignore_in_worker, spawn_guard=signals.held_while_spawning)
        self.data = DataPosition(self.stream, seed, self.micro_batch, env.world_size, self.log)
        self.amp_dtype, self.scaler = amp_setup(cfg.train.amp, env.device, self.log)
        find_unused = cfg.dist.find_unused_parameters
        if find_unused is None:
            find_unused = bool(self.rollout.active and self.rollout.skips_parameters)
        apply_activation_checkpointing(self.adapter.transformer_blocks(), cfg.train.activation_checkpointing)
        self._graphs_before = compiled_graphs()
        if cfg.train.compile:
            compile_blocks(self.adapter.transformer_blocks(), self.backbone, cfg.train.compile_backend)
        self.model = D.wrap_model(self.backbone, env, cfg.dist.strategy, find_unused)
        self.sync = D.GradSync(self.model, self.backbone, env)
        self.optimizer = build_optimizer(self.backbone, cfg.optim, self.adapter.no_decay_keywords, env.device)
        self.ema = EMA(self.backbone, cfg.train.ema) if cfg.train.ema > 0 else None
        self.rng = RNGState(seed, env, layout=self.data)
        self.generator, self.rollout_rng = self.rng.generator, self.rng.rollout_rng
        self.guard = NonFiniteGuard(cfg.train.max_nonfinite, cfg.train.max_nonfinite_total, self.log)
        self.runner = StepRunner(cfg, env, self.adapter, self.model, self.sync, self.optimizer, self.ema,
                                 self.amp_dtype, self.scaler, self.sampler, self.stream, self.rollout,
                                 self.csf_loss, self.rng, self._train_hw)
        self.evals = PeriodicEval.for_run(self)  # validation during training (rank 0), None when off
        self.checkpointer = Checkpointer(
            self.ckpt_dir, cfg.train.keep_last, self._parts(), self.guard, env, self.log,
            buffer_names=self._buffer_names,
            on_saved=lambda path: self.registry.hook.on_checkpoint_saved(path=path), fmt=cfg.train.save_format)

    def _buffer_names(self) -> frozenset:
        """The backbone's buffers (may hold -inf by design, e.g. an additive attention mask)."""
        return frozenset(n for n, _ in self.adapter.backbone.named_buffers())

    def _weights_source(self) -> str:
        b = self.config.model.backbone
        return f"the backbone {b}" if b is not None else "the freshly initialised backbone"

    def _parts(self) -> dict:
        """The checkpoint's entries, in file order (see :mod:`sar_core.train.checkpointer`)."""
        return {"model": ModelPart(self.backbone), "optimizer": OptimizerPart(self.backbone, self.optimizer),
                "ema": EMAPart(self.ema, self.backbone, self.config.train.ema, self.log),
                "scaler": ScalerPart(self.scaler), "data": self.data, "schedule_sampler": SamplerPart(self.sampler),
                "rng": self.rng, "nonfinite": self.guard,
                "lr": Saved(lambda: lr_at(max(self.step - 1, 0), self.total_steps, self.config.optim)),
                "config": Saved(lambda: self.config.to_dict())}

    # ------------------------------------------------------------------ state (see checkpointer)
    @property
    def nonfinite(self) -> dict:
        """The non-finite guard's counts (consecutive, total, first, good)."""
        return self.guard.state

    @property
    def _dirty(self) -> bool:  # an update of the current step has begun
        return self.runner.dirty

    @_dirty.setter
    def _dirty(self, value: bool) -> None:
        self.runner.dirty = value

    def take_snapshot(self) -> None:
        """Data position, sampler and RNG state at the start of a step (for Ctrl-C saves)."""
        self.checkpointer.take_snapshot(self.step)

    def state_dict(self, snapshot: Optional[dict] = None) -> dict:
        """Full training state (every rank must call it: FSDP gathers, RNGs are collected)."""
        return self.checkpointer.state_dict(snapshot)

    def load_state_dict(self, state: dict) -> None:
        self.checkpointer.load_state_dict(state)
        self.step = int(state["step"])

    def save(self, snapshot: Optional[dict] = None) -> Optional[Path]:
        return self.checkpointer.save(self.step, snapshot)

    def resume(self) -> bool:
        state = self.checkpointer.resume(self.config.resume, self.config.to_dict(), self.out_dir, self.restart)
        if state is None:
            return False
        self.step = int(state["step"])
        self.log(f"resumed from {state['path']} at step {self.step}")
        return True

    # ------------------------------------------------------------------ one step (see train_step)
    def forward_backward(self):
        return self.runner.forward_backward(self.step, self.stop.requested)

    def _update(self, bad_loss: bool) -> tuple[float, bool]:
        return self.runner.update(bad_loss)

    def train_step(self) -> dict:
        """One optimizer step; returns its metrics (averaged over micro-steps and ranks)."""
        metrics, self._stop_all = self.runner.train_step(self.step, self.total_steps, self.stop.requested)
        if self.config.train.compile:  # graphs compiled by this run so far (should settle, not grow)
            metrics["compiled_graphs"] = compiled_graphs() - self._graphs_before
        return metrics

    def _guard(self, metrics: dict) -> Optional[str]:
        """Count a skipped step; returns a stop message when the limits are reached."""
        return self.guard.observe(metrics["step"], bool(metrics["skipped"]))

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        """Lock the run folder, handle stop signals, train; see the module docstring."""
        folder = (contextlib.nullcontext() if self.folder_held
                  else held_run_folder(self.out_dir, self.ckpt_dir, self.env, self.log))
        with folder, StopRequest(abandon_on_repeat=not self.env.enabled) as stop:
            self.stop = stop
            try:
                return self._train()
            finally:
                self.stream.close()  # its workers ignore stop signals: end them explicitly
                self.stop = StopRequest()

    def _check_data(self, resumed: bool) -> None:
        """Record the data's fingerprint at the start; on resume, refuse changed contents."""
        from sar_core.train import data_check

        fp = data_check.fingerprint(self.config.data.name, len(self.dataset), self.registry.names("dataset"))
        if resumed:
            data_check.check_resumed(self.out_dir, fp, self.config.accept_data_change, self.env.is_main, self.log)
        elif self.env.is_main:
            data_check.record(self.out_dir, fp)

    def _train(self) -> TrainResult:
        resumed = self.resume()
        self._check_data(resumed)  # before anything is written: a refused resume touches nothing
        self._saved_at = self.step if resumed else None
        self._noted = False
        self._write_config()
        hook, main = self.registry.hook, self.env.is_main
        if main:  # first: what this run trains with, defaults marked (README "Defaults of `sar train`")
            self.log(settings_line(self.config, getattr(self.rollout, "scales", None)))
        loggers = self._loggers() if main else []
        evals = self.evals if main else None
        if evals is not None:  # a plugin of the run-time hooks while this run runs
            self.registry.pm.register(evals, name=f"{evals.__name__}-{id(evals)}")
        if main:
            hook.on_train_start(run=self)
        status, message = "finished", ""
        self.status = "crashed"  # what on_train_end sees unless the run ends as below
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
                reason = self._guard(metrics)
                if reason:
                    status, message = "nonfinite", self.guard.stop_message(self.step, reason, self.ckpt_dir)
                    break
                self._save_if_due(metrics)
                if self._stopping():
                    status, message = "signalled", self._save_on_signal()
                    break
            if status == "finished":
                status, message = self._finish()
            if self.config.train.compile:
                self.log(f"torch.compile: {compiled_graphs() - self._graphs_before} graphs compiled in this run "
                         f"({len(self.adapter.transformer_blocks()) or 1} compiled modules, dynamic shapes)")
            self.status = status
        except KeyboardInterrupt:
            status, message = "interrupted", self.checkpointer.save_after_interrupt(self.step, self._dirty)
            self.status = status
        except DataReadError as exc:
            saved = self.checkpointer.save_after_data_error(self.step, self._dirty)
            raise DataReadError(f"{exc} ({saved})") from exc.__cause__
        finally:
            for lg in loggers:
                lg.close()
            try:
                if main:
                    hook.on_train_end(run=self)
            finally:
                if evals is not None:
                    self.registry.pm.unregister(evals)
        return TrainResult(status, self.step, self.out_dir, ckpt.latest_checkpoint(self.ckpt_dir), message,
                           skipped=self.guard.state["total"], skipped_last=self.guard.state["consecutive"])

    # ------------------------------------------------------------------ pieces of the loop
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

    def _write_config(self) -> None:
        if self.env.is_main:
            atomic_write_text(self.config.to_yaml(), self.out_dir / "config.yaml")

    def _save_unless_saved(self) -> None:
        if self._saved_at != self.step:
            self.save()
            self._saved_at = self.step

    def _save_if_due(self, metrics: dict) -> None:
        """The periodic checkpoint (``save_every``; never of a skipped step)."""
        every = self.config.train.save_every
        if every and self.step % every == 0 and not metrics["skipped"]:
            self.save()
            self._saved_at = self.step

    def _stopping(self) -> bool:
        """Whether some rank got a stop signal (noting this rank's own signal once)."""
        if self.stop.requested and not self._noted:
            self._noted = True
            self.log(f"received {self.stop.name}: writing a checkpoint and stopping (send it again "
                     "to stop at once)")
        return self._stop_all

    def _finish(self) -> tuple[str, str]:
        """The last checkpoint and the export, unless no step updated the weights or they are
        not finite: (status, message)."""
        if self.step > 0 and self.guard.state["total"] >= self.step:
            return "nonfinite", (f"all {self.step} steps were skipped (non-finite loss or gradient): nothing was "
                                 "trained and no backbone written; check the data, --lr and --amp")
        bad = self._nonfinite_weight()
        if bad is not None:
            return "nonfinite", self.guard.stop_message(self.step, f"the weights are not finite ({bad}); no "
                                                        "backbone written", self.ckpt_dir)
        self._save_unless_saved()
        self.export()
        return "finished", ""

    def _nonfinite_weight(self) -> Optional[str]:
        """Which weight is not finite on some rank (collective), or None."""
        bad = ckpt.first_nonfinite(self.backbone.state_dict(), self._buffer_names())  # this rank's shards
        flag = torch.tensor([float(bad is not None)], dtype=torch.float64, device=self.env.device)
        if D.all_reduce_sum(flag, self.env).item() == 0:
            return None
        return f"tensor '{bad[0]}' holds {bad[1]}" if bad is not None else "on another rank's shard"

    def _save_on_signal(self) -> str:
        self._save_unless_saved()
        return (f"stopped by {self.stop.name} after step {self.step}; checkpoint "
                f"{ckpt.step_checkpoint(self.ckpt_dir, self.step)} (continue with --resume)")

    def export(self) -> None:
        """Write the trained backbone (and its EMA): :func:`sar_core.train.export.export_backbone`."""
        from sar_core.train.export import export_backbone

        export_backbone(self)
