"""Tiny random models of every supported family and a byte-level tokenizer, for tests and the debug recipes.

Built from a fixed seed, so every machine gets the same weights without downloading anything.
"""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from prunelab.stages.arch import adapter_class, family_facts, unsupported_message
from prunelab.stages.io.sources import TINY_ALIASES, TINY_FAMILY


def byte_tokenizer() -> Any:
    """A byte-level tokenizer (256 byte tokens + <s>, </s>, <pad>) that needs no training data."""
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
    cfg = AutoConfig.for_model(
        model_type, vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=1024, tie_word_embeddings=tie, bos_token_id=0, eos_token_id=1, pad_token_id=2, **extra,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    block_index = adapter_class(model_type).block_index
    # Random init with std 0.02 gives near-identical blocks; widen it so criteria see real differences.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                block = block_index(name)
                p.normal_(0.0, 0.08 + (0.02 * (block % 3) if block is not None else 0.0))
    return model.eval()


def tiny_family(model_type: str, num_layers: int = 4, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """The tiny random model of a family, built offline from its transformers config class. Beyond tiny_llama's
    weights, biases and norm weights are randomised too, so nothing a unit owns is trivially zero or one."""
    facts = family_facts(model_type)
    if facts is None:
        raise ValueError(unsupported_message(model_type))
    kw = {**facts.tiny, **overrides}  # FamilyFacts.tiny: what exercises what makes the family differ
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
    family = TINY_FAMILY[name]
    if family == "llama":  # as it always was: recipes/debug*.yaml pin its numbers
        return tiny_llama(num_layers=TINY_ALIASES[name])
    return tiny_family(family, num_layers=TINY_ALIASES[name])
