"""A tiny scale-wise family as a third-party sar plugin (the template of docs/plugins.md).

``model`` holds the tokenizer and the backbone, ``adapter`` the ``ScaleWiseAdapter`` that
ties them to sar, ``case`` its golden-case runner, ``plugin`` the registration hook.
"""

from sar_template_family.adapter import TemplateAdapter, TemplateConfig

__all__ = ["TemplateAdapter", "TemplateConfig"]
