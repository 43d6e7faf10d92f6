"""Precision rules shared by the families' adapters."""

from __future__ import annotations

import functools

import torch


def tokenizer_side(fn):
    """No grad, no autocast: upstream FlexVAR and Infinity build codes and inputs in float32
    outside AMP. Decorates adapter methods (``self.device`` names the device)."""
    @functools.wraps(fn)
    def wrapped(self, *args, **kwargs):
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            return fn(self, *args, **kwargs)
    return wrapped
