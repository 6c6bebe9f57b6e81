"""OLMo 3: OLMo 2's layer (norms after the sublayers, q/k RMSNorms over the whole projection, ``attention_bias`` on
q/k/v/o and no MLP bias) in two kinds of layers.

``config.layer_types`` alternates sliding-window and full attention (three sliding, one full by default) and each kind
has a rotary embedding of its own (``rope_parameters[layer_type]``: YaRN on the full layers of the long-context
models). The decoder layer does not record its kind, so the block-wise forward reads it from the config and passes
that kind's mask and (cos, sin) — as Gemma 3's does; block removal keeps the kept blocks' ``layer_types`` (the base
``keep_blocks_config``). Everything about widths, heads and their norms is OLMo 2's.
"""

from __future__ import annotations

from prunelab.stages.arch import register_family
from prunelab.stages.arch.facts import FamilyFacts
from prunelab.stages.arch.gemma import Gemma2Adapter, Gemma3Adapter
from prunelab.stages.arch.olmo2 import Olmo2Adapter

# The tiny model: a sliding window of 12 (< the test sequences) and a rope base of its own on the sliding layers,
# so a layer given the other kind's mask or rotary changes the logits.
register_family(FamilyFacts(model_types=("olmo3",), adapter=f"{__name__}:Olmo3Adapter", sublayers=True,
                            no_output_bias=("down",), qk_norm="projection", engines={"llama.cpp": "olmo2"},
                            tiny={"head_dim": 24, "sliding_window": 12, "rope_parameters": {
                                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                                "full_attention": {"rope_type": "default", "rope_theta": 10000.0}}}))


class Olmo3Adapter(Olmo2Adapter):
    family = "OLMo 3"
    # one mask and one rotary per layer kind, read from config.layer_types: Gemma 3's block-wise forward, shared
    rotary = Gemma3Adapter.rotary
    position_embeddings = Gemma2Adapter.position_embeddings
    run_block = Gemma2Adapter.run_block
