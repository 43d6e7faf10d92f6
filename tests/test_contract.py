"""Every shipped family (and the toys) passes the public adapter contract suite."""

from pathlib import Path


from sar_adapters.flexvar import FlexVARAdapter, FlexVARConfig
from sar_adapters.flexvar.sampler import guidance_scale as flexvar_guidance
from sar_adapters.var import VARAdapter, VARConfig
from sar_core.sar.sampling import guide
from sar_core.testing import AdapterContractTests
from sar_core.testing import payload_batch, text_feature_batch
from toy_adapter import ToyAdapter, ToyConfig, ToyWithinScaleAdapter
from toy_bits_adapter import PAYLOAD, ToyBitsAdapter, ToyBitsConfig
from toy_pair_adapter import ToyPairAdapter, ToyPairConfig

FIX = Path(__file__).parent / "fixtures"


class TestToyContract(AdapterContractTests):
    def make_adapter(self):
        return ToyAdapter.from_config(ToyConfig())

    def foreign_checkpoints(self, tmp_path):
        return super().foreign_checkpoints(tmp_path) + [FIX / "var" / "vae_ch32v64z8.pth"]


class TestToyWithinScaleContract(AdapterContractTests):
    """Attention within each scale only (Switti-style): the suite checks the pattern and
    that a one-scale student pass runs that scale alone."""

    def make_adapter(self):
        return ToyWithinScaleAdapter.from_config(ToyConfig())


class TestVARContract(AdapterContractTests):
    def make_adapter(self):
        return VARAdapter.from_config(VARConfig(
            vocab_size=16, Cvae=4, ch=32, ch_mult=(1, 1), num_res_blocks=1, depth=2, embed_dim=32,
            num_heads=2, num_classes=5, patch_nums=(1, 2, 3, 4), cond_drop_rate=0.0, drop_path_rate=0.0))

    def foreign_checkpoints(self, tmp_path):
        return super().foreign_checkpoints(tmp_path) + [FIX / "flexvar" / "FlexVAE_tiny.pth",
                                                       FIX / "flexvar" / "FlexVARd2-tiny.pth"]

    def sampler_guided_logits(self, adapter, cond, uncond, step, num_steps, cfg):
        return guide(cond, uncond, cfg * step / (num_steps - 1))   # VAR's sampler ramp


class TestFlexVARContract(AdapterContractTests):
    def make_adapter(self):
        return FlexVARAdapter.from_config(FlexVARConfig(
            tokenizer={"codebook_size": 40, "ch": 32, "ch_mult": (1, 1), "z_channels": 32},
            backbone={"depth": 1, "embed_dim": 32, "num_heads": 2, "num_classes": 5, "pos_grid": 16},
            image_size=16))

    def load_overrides(self, adapter):
        return {"image_size": adapter.config.image_size, "backbone.num_heads": adapter.config.backbone.num_heads}

    def foreign_checkpoints(self, tmp_path):
        return super().foreign_checkpoints(tmp_path) + [FIX / "var" / "var_tiny_d2w64.pth"]

    def sampler_guided_logits(self, adapter, cond, uncond, step, num_steps, cfg):
        side = self.generate_schedule(adapter)[step][0]
        return guide(cond, uncond, flexvar_guidance(step, num_steps, side, cfg, 16))


class TestToyBitsContract(AdapterContractTests):
    """Non-square schedule, bitwise codes, variable-length text-feature conditions."""

    def make_adapter(self):
        return ToyBitsAdapter.from_config(ToyBitsConfig())

    def make_batch(self, adapter, batch_size, generator):
        return text_feature_batch(adapter, batch_size, generator, PAYLOAD, adapter.config.text_dim)


class TestToyPairContract(AdapterContractTests):
    """Two named payloads (a pooled vector + a token sequence) and an encoder-derived null
    condition (given by the suite, in no checkpoint)."""

    def make_adapter(self):
        return ToyPairAdapter.from_config(ToyPairConfig())

    def make_batch(self, adapter, batch_size, generator):
        return payload_batch(adapter, batch_size, generator)
