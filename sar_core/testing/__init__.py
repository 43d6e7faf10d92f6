"""The public adapter contract suite: every property the SAR core relies on, as pytest tests.

An adapter author subclasses :class:`AdapterContractTests` in a ``test_*.py`` file under a
name pytest collects (``Test*``) and provides one method that builds a tiny model::

    from sar_core.testing import AdapterContractTests
    from my_family import MyAdapter, MyConfig

    class TestMyAdapter(AdapterContractTests):
        def make_adapter(self):
            return MyAdapter.from_config(MyConfig(depth=1, embed_dim=32))

Optional overrides: :meth:`make_batch` (text-conditioned families add ``conditions``;
:func:`payload_batch` gives every payload the adapter declares), :meth:`make_null_payloads`
(families with encoder-derived null payloads: default random ones of the declared widths),
:meth:`schedule` / :meth:`generate_schedule`, :meth:`save_load_paths`,
:meth:`load_overrides`, :meth:`foreign_checkpoints`, :meth:`sampler_guided_logits` (when
the family's sampler guides with another ramp than ``adapter.guide_logits``), and the
class attributes of ``base.ContractBase`` (tolerances, sampling settings, ``liven_seed``,
``block_effect``). The suite works for index and bitwise codes (``adapter.code_space``) and
non-square schedules. ``make_adapter`` should build a model whose only randomness in train
mode is condition dropout (dropout and drop path 0), with ``condition_dropout`` 0.

Every check runs on livened weights: ``adapter.liven`` re-draws the backbone (seed
``liven_seed``) so that each transformer block changes its output far more than the
tolerances, and ``checks_blocks`` asserts that it does. Upstream inits make blocks
near-identity, which hides every bug inside them (a mask, a rotary position).

Imports pytest: use it from tests only.

Modules: ``helpers`` (random / wrong codes, batches, pins, also for authors' own tests),
``base`` (the author hooks, tolerances and fixtures), ``checks_blocks`` / ``checks_inputs`` /
``checks_model`` / ``checks_step`` / ``checks_deep`` (the checks by theme) and ``suite`` (all of them as one class).

May import: the contract modules, ``sar_core.sar`` (the SAR step it runs) and
``sar_core.train.activation_ckpt``.
"""

from sar_core.testing.checks_step import ROLLOUT_LOSSES
from sar_core.testing.helpers import (code_shape, default_batch, input_slice, payload_batch, pinned, random_codes,
                                      random_images, random_null_payloads, same_codes, text_feature_batch, wrong_codes)
from sar_core.testing.suite import AdapterContractTests

__all__ = ["AdapterContractTests", "ROLLOUT_LOSSES", "code_shape", "default_batch", "input_slice", "payload_batch",
           "pinned", "random_codes", "random_images", "random_null_payloads", "same_codes", "text_feature_batch",
           "wrong_codes"]
