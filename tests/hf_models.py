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


def bert_classifier(vocab: int, hidden: int, labels: int = 3) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=32, num_labels=labels,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return BertForSequenceClassification(config)


def gpt2_lm(vocab: int, hidden: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab, n_embd=hidden, n_layer=2, n_head=2, n_positions=32, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def t5(vocab: int, hidden: int) -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=vocab, d_model=hidden, d_kv=hidden // 2, d_ff=2 * hidden, num_layers=2,
        num_heads=2, relative_attention_num_buckets=8, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return T5ForConditionalGeneration(config)


def llama(vocab: int, hidden: int, tie: bool) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        tie_word_embeddings=tie,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def vit(hidden: int, labels: int = 3) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=hidden, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=2 * hidden, num_labels=labels,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return ViTForImageClassification(config)


def lora_llama(vocab: int, hidden: int) -> nn.Module:
    """A Llama whose attention projections get peft LoRA adapters (the base frozen)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return get_peft_model(llama(vocab, hidden, tie=False), config)
