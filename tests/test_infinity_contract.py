"""The Infinity adapter passes the public adapter contract suite (bitwise codes, text
conditions, a non-square template schedule)."""

import torch

from sar_adapters.infinity import InfinityAdapter, InfinityConfig
from sar_core.data import Padded
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
