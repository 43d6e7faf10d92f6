"""The Infinity adapter passes the public adapter contract suite (bitwise codes, text
conditions, a non-square template schedule)."""

import torch

from sar_adapters.infinity import InfinityAdapter, InfinityConfig
from sar_core.batch import Padded
from sar_core.testing import AdapterContractTests, default_batch

CT5 = 16


class TestInfinityContract(AdapterContractTests):
    sample_options = {"top_p": 0.9}

    def make_adapter(self):
        return InfinityAdapter.from_config(InfinityConfig(
            tokenizer={"codebook_dim": 6, "base_ch": 24, "ch_mult": (1, 1), "patch_size": 2},
            backbone={"depth": 2, "embed_dim": 64, "num_heads": 2, "block_chunks": 2, "text_channels": CT5,
                      "text_maxlen": 8, "drop_path_rate": 0.0, "cond_drop_rate": 0.0},
            h_div_w=0.75, pn="0.06M", tau=0.8))

    def make_batch(self, adapter, batch_size, generator):
        batch = default_batch(adapter, batch_size, generator)
        feats = [torch.randn(n, CT5, generator=generator) for n in range(2, 2 + batch_size)]
        batch.conditions = {"text_features": Padded.pad(feats)}
        return batch


class TestInfinityStandInContract(AdapterContractTests):
    """Infinity with its class stand-in for text (the shipped miniature's setting): class
    labels in, the same backbone, the contract holds as for a class-conditional family."""

    def make_adapter(self):
        return InfinityAdapter.from_config(InfinityConfig(
            tokenizer={"codebook_dim": 6, "base_ch": 24, "ch_mult": (1, 1), "patch_size": 2},
            backbone={"depth": 2, "embed_dim": 64, "num_heads": 2, "block_chunks": 2, "text_channels": CT5,
                      "text_maxlen": 8, "drop_path_rate": 0.0, "cond_drop_rate": 0.0},
            schedule=[[1, 1], [2, 2], [4, 4]], stand_in_classes=5, stand_in_tokens=3))


def test_stand_in_classes_are_fixed_distinct_prompts():
    a = TestInfinityStandInContract().make_adapter()
    b = TestInfinityStandInContract().make_adapter()
    assert a.num_classes == 5
    ca, cb = a.condition_from_labels(torch.tensor([0, 4, 4])), b.condition_from_labels(torch.tensor([0, 4, 4]))
    assert torch.equal(ca["kv_compact"], cb["kv_compact"])  # same seed: same prompt in every process
    assert ca["lens"].tolist() == [3, 3, 3] and ca["kv_compact"].shape == (9, CT5) and not ca["null"].any()
    rows = ca["kv_compact"].view(3, 3, CT5)
    assert torch.equal(rows[1], rows[2]) and not torch.equal(rows[0], rows[1])
    from sar_core.batch import Batch

    via_batch = a.condition(Batch(labels=torch.tensor([0, 4, 4]), images=torch.zeros(3, 3, 8, 8)))
    assert torch.equal(via_batch["kv_compact"], ca["kv_compact"])
    import pytest

    with pytest.raises(ValueError, match="0..4"):
        a.condition_from_labels(torch.tensor([5]))
    plain = TestInfinityContract().make_adapter()
    assert plain.num_classes is None
    with pytest.raises(ValueError, match="not class-conditional"):
        plain.condition_from_labels(torch.tensor([0]))
