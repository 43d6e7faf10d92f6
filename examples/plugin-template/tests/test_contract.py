"""The template family passes sar's public adapter contract suite (run: python -m pytest -q)."""

from sar_core.testing import AdapterContractTests

from sar_template_family import TemplateAdapter, TemplateConfig


class TestTemplateContract(AdapterContractTests):
    def make_adapter(self):   # tiny; dropout and condition dropout 0
        return TemplateAdapter.from_config(TemplateConfig(depth=2, embed_dim=32))
