"""Moved: the ``textimages`` dataset is family-agnostic now (named payload columns) and
lives in :mod:`sar_plugins.textimages`, registered by the ``core`` plugin. These names
stay importable from here."""

from sar_plugins.textimages import (  # noqa: F401
    LEGACY as PAYLOAD,
    AspectTextImageFolder,
    TextImageFolder,
    read_manifest,
    textimages,
)
