"""``from_config`` for families whose fresh model is their ``_build(config)`` followed by the
upstream initialisation of each part (FlexVAR, Infinity). VAR builds differently (its config
is completed by ``make_config`` and its tokenizer keeps its constructor's init) and keeps its
own ``from_config``."""

from __future__ import annotations

from typing import Any, Callable, ClassVar


class FreshFromConfig:
    """Mixin for a ``ScaleWiseAdapter``: besides ``config_cls``, set ``init_tokenizer`` and
    ``init_backbone`` (each ``module -> None``, upstream's init) and define ``_build``."""

    init_tokenizer: ClassVar[Callable[[Any], None]]
    init_backbone: ClassVar[Callable[[Any], None]]

    @classmethod
    def from_config(cls, config):
        if isinstance(config, dict):
            config = cls.config_cls(**config)
        tok, bb = cls._build(config)
        cls.init_tokenizer(tok)
        cls.init_backbone(bb)
        return cls(config, tok, bb)
