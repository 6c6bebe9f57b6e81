"""The Llama-layout linear names by role, torch-free (for metadata-only checks such as ``--dry-run``)."""

LINEAR_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
                "down": "down_proj"}
# LoRA's default target modules: every decoder linear of the Llama layout (all supported families share it).
LORA_TARGETS = tuple(LINEAR_NAMES.values())
# Fused projections some families use instead (Phi-3); a recipe may name them too.
FUSED_NAMES = ("qkv_proj", "gate_up_proj")
# The LM head's module name (ArchAdapter.HEAD's default; a LoRA target a recipe may name).
HEAD_NAME = "lm_head"
