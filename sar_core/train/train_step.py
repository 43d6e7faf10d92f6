"""One optimizer step of ``sar train``: micro-batches, SAR step, gradient sync, update.

For each of ``grad_accum`` micro-batches: draw the step's schedule, encode images with
the frozen tokenizer (or take cached codes), run :func:`sar_core.sar.step.sar_step`
(teacher pass, memory-lean backward, rollout, student pass, backward of gamma * CSF);
then all-reduce (DDP / FSDP2), unscale (fp16), clip, AdamW step (or skip a non-finite
step), EMA. Each backward gets ``loss / grad_accum`` and DDP averages over ranks, so the
gradient of an optimizer step equals that of one process on the global batch.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable

import torch

from sar_core.train import distributed as D
from sar_core.train.checkpointing import last_line
from sar_core.train.config import RunConfig
from sar_core.train.optim import lr_at, set_lr
from sar_core.sar.step import sar_step
from sar_core.schedule import Schedule


class DataReadError(Exception):
    """The training data could not be read mid-run (a corrupt image, a vanished file)."""


def amp_setup(amp: str, device: torch.device, log: Callable[[str], None]):
    """(autocast dtype or None, GradScaler or None) for ``--amp`` on ``device``.

    bf16 autocasts on CUDA and on the CPU alike (no loss scaler: bf16 has float32's range);
    fp16 needs CUDA (and gets a GradScaler). The families keep their float32 islands
    (tokenizer, losses, norms, sampling) under either."""
    if amp == "fp16" and device.type != "cuda":
        log(f"[yellow]warning:[/] --amp fp16 needs CUDA; training in float32 on {device} (--amp bf16 runs here)")
        amp = "none"
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 11, growth_interval=1000) if amp == "fp16" else None
    return dtype, scaler


class StepRunner:
    """Runs optimizer steps on the run's parts (the trainer builds it and owns the step count).

    ``dirty`` turns True once an update has begun (the weights may then differ from the
    step-start snapshot); the trainer clears it when the step is complete."""

    def __init__(self, config: RunConfig, env: D.DistEnv, adapter, model, sync: D.GradSync, optimizer,
                 ema, amp_dtype, scaler, sampler, stream, rollout, csf_loss, rng, train_hw):
        self.config, self.env, self.adapter, self.model, self.sync = config, env, adapter, model, sync
        self.backbone, self.optimizer, self.ema = adapter.backbone, optimizer, ema
        self.amp_dtype, self.scaler, self.sampler, self.stream = amp_dtype, scaler, sampler, stream
        self.rollout, self.csf_loss, self.rng, self.train_hw = rollout, csf_loss, rng, train_hw
        self.dirty = False

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.amp_dtype)

    def _backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.config.train.grad_accum
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()

    def _expected_forwards(self, schedule: Schedule) -> int:
        student = bool(self.rollout.active) and self.csf_loss is not None and len(schedule) >= 2
        return 1 + (self.rollout.passes(schedule) if student else 0)

    def _micro_step(self, step: int, last: bool) -> tuple[torch.Tensor, int]:
        cfg, adapter, dev = self.config, self.adapter, self.env.device
        try:
            batch = self.stream.next()
        except Exception as exc:
            raise DataReadError(f"reading the training data failed at step {step + 1}: {last_line(exc)}; "
                                "fix or remove that file, then continue with --resume") from exc
        batch = batch.to(dev)
        schedule = self.sampler.sample()
        if batch.images is not None and tuple(batch.images.shape[-2:]) != self.train_hw:
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
                           generator=self.rng.generator, rng=self.rng.rollout_rng, backward=self._backward)
        losses = torch.stack([res.loss_tf.detach().float(), res.loss_csf.detach().float()])
        return losses, len(batch) * schedule.total_tokens

    def forward_backward(self, step: int, stop_requested: bool) -> torch.Tensor:
        """All micro-steps of one optimizer step, gradients synced across ranks.

        Returns (loss_tf sum, loss_csf sum, non-finite micro-steps, tokens, ranks asked to
        stop) summed over micro-steps and ranks (float64)."""
        env, accum = self.env, self.config.train.grad_accum
        self.optimizer.zero_grad(set_to_none=True)
        self.sync.begin_step()
        sums = torch.zeros(5, dtype=torch.float64, device=env.device)
        for m in range(accum):
            losses, tokens = self._micro_step(step, m == accum - 1)
            finite = bool(torch.isfinite(losses).all())
            sums[:2] += torch.nan_to_num(losses.double(), nan=0.0, posinf=0.0, neginf=0.0)
            sums[2] += 0.0 if finite else 1.0
            sums[3] += tokens
        self.sync.finish()
        sums[4] = float(stop_requested)
        return D.all_reduce_sum(sums, env)

    def update(self, bad_loss: bool) -> tuple[float, bool]:
        """Unscale, clip, step (or skip); returns (grad norm before clipping, skipped)."""
        params = [p for p in self.backbone.parameters() if p.grad is not None]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        clip = self.config.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        skipped = bad_loss or (self.scaler is None and not math.isfinite(norm))
        self.dirty = True
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

    def train_step(self, step: int, total_steps: int, stop_requested: bool) -> tuple[dict, bool]:
        """Optimizer step ``step + 1``: (its metrics averaged over micro-steps and ranks,
        whether any rank was asked to stop)."""
        cfg, env = self.config, self.env
        lr = lr_at(step, total_steps, cfg.optim)
        set_lr(self.optimizer, lr)
        if env.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(env.device)
        t0 = time.perf_counter()
        sums = self.forward_backward(step, stop_requested)
        stop_all = sums[4].item() > 0
        n = cfg.train.grad_accum * env.world_size
        bad_loss = sums[2].item() > 0
        grad_norm, skipped = self.update(bad_loss)
        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)
        dt = time.perf_counter() - t0
        loss_tf, loss_csf = (float("nan"), float("nan")) if bad_loss else (sums[0].item() / n, sums[1].item() / n)
        metrics = {
            "step": step + 1, "loss": loss_tf + cfg.loss.gamma * loss_csf, "loss_tf": loss_tf,
            "loss_csf": loss_csf, "lr": lr, "grad_norm": grad_norm, "skipped": int(skipped),
            "epoch": self.stream.epoch, "step_time": dt, "images_per_s": cfg.train.batch_size / dt,
            "tokens_per_s": sums[3].item() / dt,
        }
        if self.scaler is not None:
            metrics["loss_scale"] = float(self.scaler.get_scale())
        if env.device.type == "cuda":
            metrics["max_mem_gb"] = torch.cuda.max_memory_allocated(env.device) / 2 ** 30
        return metrics, stop_all
