"""Recovery: the LoRA / QLoRA trainer under accelerate, its data and checkpoints."""
