"""Tiny random models of every supported family and a byte-level tokenizer, for tests and the debug recipes.

Built from a fixed seed, so every machine gets the same weights without downloading anything.
"""

from __future__ import annotations

from typing import Any

import torch


def byte_tokenizer() -> Any:
    """A byte-level tokenizer (256 byte tokens + <s>, </s>, <pad>) that needs no training data."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2}
    vocab.update({ch: i + 3 for i, ch in enumerate(sorted(alphabet))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_llama(
    num_layers: int = 6, hidden: int = 64, heads: int = 4, kv_heads: int = 2, intermediate: int = 128,
    vocab: int = 259, tie: bool = True, seed: int = 0, model_type: str = "llama", **extra: Any,
) -> torch.nn.Module:
    """A randomly initialised Llama-layout causal LM (GQA by default) in float32, eval mode; ``extra`` goes
    to the family's config class."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        model_type, vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=1024, tie_word_embeddings=tie, bos_token_id=0, eos_token_id=1, pad_token_id=2, **extra,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # Random init with std 0.02 gives near-identical blocks; widen it so criteria see real differences.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.08 + (0.02 * (int(name.split(".")[2]) % 3) if ".layers." in name else 0.0))
    return model.eval()



# Per family: what its tiny model sets beyond tiny_llama's defaults (each exercises what makes the family differ).
TINY_FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"sliding_window": 12},  # a window shorter than the test sequences: the sliding mask matters
    "qwen2": {"tie": False},  # q/k/v biases (randomised below), no bias on o_proj / down_proj
    "qwen3": {"head_dim": 24},  # per-head q_norm / k_norm; head_dim ≠ hidden / heads
    "granite": {"embedding_multiplier": 3.0, "residual_multiplier": 0.5, "attention_multiplier": 0.2,
                "logits_scaling": 2.0},  # every multiplier away from 1
    "phi3": {},  # fused qkv_proj and gate_up_proj
    # head_dim ≠ hidden/heads, (1 + w) norms before and after each sublayer, sqrt(hidden) embedding scale, soft-capped
    # attention scores and logits (caps low enough to bend random logits), sliding window (12 < the test sequences)
    # on every other layer
    "gemma2": {"head_dim": 24, "sliding_window": 12, "final_logit_softcapping": 3.0, "attn_logit_softcapping": 5.0},
    # as Gemma 2 plus per-head q/k norms and a local rope base of its own on the sliding layers
    "gemma3_text": {"head_dim": 24, "sliding_window": 12, "sliding_window_pattern": 2, "final_logit_softcapping": 3.0,
                    "rope_local_base_freq": 100.0},
    "olmo2": {"head_dim": 24},  # norms after the sublayers; q/k RMSNorm over the whole projection
    # mixture of experts: 4 experts, top-2 (the router renormalises); each expert 128 wide (`intermediate_size`)
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    # Qwen3 attention + 4 experts of width 32, top-2, probabilities not renormalised (norm_topk_prob false)
    "qwen3_moe": {"head_dim": 24, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    # Qwen2 attention (q/k/v biases) + 4 experts of width 32, top-2, not renormalised, and a shared expert of width 48
    # (another width than the experts', so the two cannot be confused) behind its sigmoid gate
    "qwen2_moe": {"tie": False, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 48},
}


def tiny_family(model_type: str, num_layers: int = 4, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """The tiny random model of a family, built offline from its transformers config class. Beyond tiny_llama's
    weights, biases and norm weights are randomised too, so nothing a unit owns is trivially zero or one."""
    kw = {**TINY_FAMILIES[model_type], **overrides}
    model = tiny_llama(num_layers=num_layers, seed=seed, model_type=model_type, **kw)
    if model_type != "llama":  # the Llama tiny model stays bit-identical to the one the pinned tests use
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 1 and name.endswith("bias"):
                    p.copy_(0.3 * torch.randn(p.shape, generator=gen))
                elif p.ndim == 1:
                    p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
                elif p.ndim == 3:  # fused expert tensors [E, out, in] (stages.arch.moe): as wide as the linears
                    p.copy_(0.08 * torch.randn(p.shape, generator=gen))
    return model.eval()


def tiny_alias(name: str) -> torch.nn.Module:
    """The model a ``tiny-random-<family>`` source names (stages.io.sources.TINY_ALIASES)."""
    from prunelab.stages.io.sources import TINY_ALIASES, TINY_FAMILY

    family = TINY_FAMILY[name]
    if family == "llama":  # as it always was: recipes/debug*.yaml pin its numbers
        return tiny_llama(num_layers=TINY_ALIASES[name])
    return tiny_family(family, num_layers=TINY_ALIASES[name])
