"""The entry point `sar` names (pyproject.toml): registers the family `template`."""

from sar_core.hookspecs import hookimpl


@hookimpl
def register_adapters(register):
    from sar_template_family.adapter import TemplateAdapter

    register("template", TemplateAdapter)
