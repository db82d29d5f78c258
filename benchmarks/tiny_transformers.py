"""Hugging Face transformers backbones from tiny configs (no model hub, random init), shared by
`benchmarks/zoo_timm.py`'s transformers section and `tests/test_transformers.py`.

Every dropout probability is 0, so that a multi-task network must reproduce the model's own
output exactly in train mode too: any op that tracing dropped, duplicated or froze to the tracing
mode shows. Each model is two layers of width `HIDDEN`; text models take `tokens()` (ids below
`VOCAB`), image models `pixels()` (float64, `IMAGE` pixels square).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

HIDDEN = 32
VOCAB = 100
IMAGE = 16
_LAYERS = {"num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
_NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def bert() -> nn.Module:
    import transformers

    return transformers.BertModel(transformers.BertConfig(hidden_size=HIDDEN, vocab_size=VOCAB, **_LAYERS, **_NO_DROPOUT))


def roberta() -> nn.Module:
    import transformers

    config = transformers.RobertaConfig(hidden_size=HIDDEN, vocab_size=VOCAB, pad_token_id=1, **_LAYERS, **_NO_DROPOUT)
    return transformers.RobertaModel(config)


def distilbert() -> nn.Module:
    import transformers

    config = transformers.DistilBertConfig(
        dim=HIDDEN, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=VOCAB, dropout=0.0, attention_dropout=0.0
    )
    return transformers.DistilBertModel(config)


def albert() -> nn.Module:
    import transformers

    config = transformers.AlbertConfig(
        hidden_size=HIDDEN, embedding_size=16, vocab_size=VOCAB, **_LAYERS, **_NO_DROPOUT
    )
    return transformers.AlbertModel(config)


def electra() -> nn.Module:
    import transformers

    config = transformers.ElectraConfig(hidden_size=HIDDEN, embedding_size=16, vocab_size=VOCAB, **_LAYERS, **_NO_DROPOUT)
    return transformers.ElectraModel(config)


def gpt2() -> nn.Module:
    import transformers

    config = transformers.GPT2Config(
        n_embd=HIDDEN, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=16, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        # under tracing, GPT-2's SDPA path builds its causal mask with torch.full(..., finfo(float64).min)
        # in the default dtype, float32, which overflows (a transformers 4.x bug): eager attention
        # takes the mask from its buffer
        attn_implementation="eager",
    )
    return transformers.GPT2Model(config)


def vit() -> nn.Module:
    import transformers

    config = transformers.ViTConfig(hidden_size=HIDDEN, image_size=IMAGE, patch_size=8, num_channels=3, **_LAYERS, **_NO_DROPOUT)
    return transformers.ViTModel(config)


def deit() -> nn.Module:
    """Not in transformers' fx tracer's list of supported models: captured with torch.export."""
    import transformers

    config = transformers.DeiTConfig(hidden_size=HIDDEN, image_size=IMAGE, patch_size=8, num_channels=3, **_LAYERS, **_NO_DROPOUT)
    return transformers.DeiTModel(config)


def swin() -> nn.Module:
    import transformers

    config = transformers.SwinConfig(
        image_size=IMAGE, patch_size=2, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0,
    )
    return transformers.SwinModel(config)


def convnext() -> nn.Module:
    import transformers

    config = transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=IMAGE)
    return transformers.ConvNextModel(config)


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(0))


def pixels() -> torch.Tensor:
    return torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor]]] = {
    "bert": (bert, tokens),
    "roberta": (roberta, tokens),
    "distilbert": (distilbert, tokens),
    "albert": (albert, tokens),
    "electra": (electra, tokens),
    "gpt2": (gpt2, tokens),
    "vit": (vit, pixels),
    "deit": (deit, pixels),
    "swin": (swin, pixels),
    "convnext": (convnext, pixels),
}
"""``{name: (model factory, input factory)}``; the sweep calls the models ``hf-<name>``."""
