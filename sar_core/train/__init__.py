"""Training machinery around the SAR step: the run config (``config``), building a run from
it (``builders``), the ``trainer`` loop and its stateful parts (optimizer and schedule in
``optim``, ``ema``, ``checkpointing`` and its resume checks ``resume_check``, the
non-finite ``nonfinite`` guard, the run folder's ``runlock``, stop ``signals``),
``distributed`` (DDP / FSDP2), ``activation_ckpt`` and ``pretrain`` (teacher-forced
pretraining of the embedded miniatures).

May import: the contract modules, ``sar_core.sar``, ``sar_core.data`` and ``sar_core.evaluate``
(validation during training). Never ``study``.
"""
