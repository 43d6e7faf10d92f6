"""The stand-in backbone of a tokenizer-only load (``sar_core.checkpoint_io.NoBackbone``;
its own file so that importing the checkpoint helpers does not import torch)."""

import torch


class NoBackbone(torch.nn.Module):
    """The backbone of an adapter loaded with its tokenizer only
    (:meth:`~sar_core.adapter.ScaleWiseAdapter.load_tokenizer`): no parameters, and calling
    it is an error naming the fix."""

    cond_drop_rate = 0.0

    def __init__(self):
        super().__init__()
        self.eval()

    def forward(self, *args, **kwargs):
        raise RuntimeError("this model was loaded with its tokenizer only: load it with a backbone "
                           "checkpoint (--backbone FILE) to run the backbone")
