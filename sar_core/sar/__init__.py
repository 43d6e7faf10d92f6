"""The SAR method itself, the paper in code, readable top to bottom:

- ``sampling``     logits -> codes: top-k / top-p filtering, guidance, seeded draws
- ``rollouts``     how pass 1's predictions become pass 2's inputs (Stagger-Scale Rollout,
                   the official last-scale pass, naive student forcing, no rollout)
- ``losses``       the teacher-forcing loss and the Contrastive Student-Forcing Losses
- ``prefix_cache`` reuse of pass 1's keys / values for the prefix of pass 2
- ``step``         one SAR step: TF pass, backward, rollout, student pass, CSF loss

May import: torch, einops and the contract modules at the top of ``sar_core`` (``schedule``,
``tokens``). Nothing of training, data, evaluation or studies.
"""
