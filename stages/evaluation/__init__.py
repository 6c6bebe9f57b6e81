"""Evaluation: windowed perplexity, zero-shot tasks through lm-eval, decode speed."""
