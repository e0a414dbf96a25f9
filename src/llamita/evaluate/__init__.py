"""Evaluation: perplexity on held-out data (zero-shot tasks and the lm-eval adapter come later)."""
