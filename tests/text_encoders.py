"""Tiny randomly initialised text encoders, built offline from a config, for ``sar
encode-text`` tests: a word-level tokenizer trained on the test captions (wrapped as a
``PreTrainedTokenizerFast``) and a 1-layer T5 encoder / CLIP text model, saved with
``save_pretrained`` into a folder exactly like a downloaded model."""

from __future__ import annotations

from pathlib import Path


def _word_tokenizer(captions, specials: list[str], template: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(list(captions), trainers.WordLevelTrainer(special_tokens=specials))
    used = [s for s in specials if s in template]
    tok.post_processor = processors.TemplateProcessing(single=template,
                                                       special_tokens=[(s, tok.token_to_id(s)) for s in used])
    return tok


def tiny_t5(folder: Path, captions, d_model: int = 16, seed: int = 0) -> Path:
    """A 1-layer T5 encoder of width ``d_model`` + tokenizer (EOS appended) in ``folder``."""
    import torch
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    tok = _word_tokenizer(captions, ["<pad>", "</s>", "<unk>"], "$A </s>")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=len(fast), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1, num_heads=2,
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    T5EncoderModel(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)
    return Path(folder)


def tiny_clip(folder: Path, captions, hidden: int = 6, projection: int = 5, seed: int = 0) -> Path:
    """A 1-layer CLIP text model with a text projection + tokenizer (BOS ... EOS) in ``folder``."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, PreTrainedTokenizerFast

    tok = _word_tokenizer(captions, ["<pad>", "<bos>", "<eos>", "<unk>"], "<bos> $A <eos>")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>")
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                         projection_dim=projection, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    CLIPTextModelWithProjection(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)
    return Path(folder)
