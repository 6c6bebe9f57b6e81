"""The Llama-layout linear names by role, torch-free (for metadata-only checks such as ``--dry-run``)."""

LINEAR_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
                "down": "down_proj"}
# LoRA's default target modules: every decoder linear of the Llama layout (all supported families share it).
LORA_TARGETS = tuple(LINEAR_NAMES.values())
