"""The entry point `sar` names (pyproject.toml): registers the family `template`."""

from sar_core.hookspecs import hookimpl

#: the names the hooks register, read without importing this module (shell completion of
#: `sar train -f <TAB>`; `sar plugins` notes a mismatch)
SAR_NAMES = {"adapter": ["template"]}


@hookimpl
def register_adapters(register):
    from sar_template_family.adapter import TemplateAdapter

    register("template", TemplateAdapter)
