"""Training machinery around the SAR step: the run config (``config``), building a run from
it (``builders``), the ``trainer`` loop, one optimizer step (``train_step``) and the
run's stateful parts, each with ``state_dict`` / ``load_state_dict``: ``data_position``,
``rng_state``, ``ema``, the non-finite ``nonfinite`` guard and the ``checkpointer`` that
composes them (file format in ``checkpointing``, FSDP2's sharded DCP checkpoints in
``sharded_ckpt``, resume checks in ``resume_check``);
optimizer and schedule in ``optim``, the run folder's ``runlock``, stop ``signals``, the
``settings`` line a run prints first (defaults marked);
``distributed`` (DDP / FSDP2), ``activation_ckpt``, ``export`` (the finished run's backbone, and
any checkpoint's for ``sar export-checkpoint``),
``periodic_eval`` (validation during training, a plugin of the run-time hooks) with its
``curves`` plot, and ``pretrain`` (teacher-forced pretraining of the embedded miniatures).

May import: the contract modules, ``sar_core.sar``, ``sar_core.data`` and ``sar_core.evaluate``
(validation during training). Never ``study``.
"""
