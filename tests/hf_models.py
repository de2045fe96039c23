"""Hugging Face models built from small configs (no download), as their users call them.

``transformers`` is imported when a model is built, so test modules that only mention these
builders import quickly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def mixtral(vocab: int, hidden: int, experts_implementation: str = "eager") -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=32,
    )  # fmt: skip
    config._experts_implementation = experts_implementation
    return MixtralForCausalLM(config)


def qwen2_moe(vocab: int, hidden: int, experts_implementation: str = "eager") -> nn.Module:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = Qwen2MoeConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
        moe_intermediate_size=hidden, shared_expert_intermediate_size=2 * hidden,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, num_experts=4,
        num_experts_per_tok=2, max_position_embeddings=32,
    )  # fmt: skip
    config._experts_implementation = experts_implementation
    return Qwen2MoeForCausalLM(config)


class CausalLMLogits(nn.Module):
    """A causal LM's logits for ``input_ids`` (the loss is the caller's, over every position)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor) -> Tensor:
        return self.model(input_ids=tokens).logits


BUILDERS: dict[str, Any] = {"mixtral": mixtral, "qwen2_moe": qwen2_moe}


def causal_lm(name: str, vocab: int, hidden: int, implementation: str) -> nn.Module:
    torch.manual_seed(0)
    return CausalLMLogits(BUILDERS[name](vocab, hidden, implementation))
