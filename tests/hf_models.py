"""A tiny transformers LlamaForCausalLM built from a config (no hub), shared by the integration tests and jobs."""

import torch

import ckptio

ckptio.allow_architecture_modules("transformers")


def tiny_config(tie: bool = True):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
    )  # fmt: skip


def tiny_llama(seed: int = 0, tie: bool = True):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(tie)).eval()


def tokens(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 96, (2, 9), generator=g)


def logits(model, x=None) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens() if x is None else x).logits
