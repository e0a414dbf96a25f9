"""Evaluation: perplexity, the zero-shot multiple-choice suite scored as lm-evaluation-harness does, an lm-eval model.

- `perplexity`: validation loss on held-out shards; loss and bits per byte on raw text.
- `harness.evaluate_tasks`: TinyLlama's suite and MMLU from files on disk (`tasks`, `task_data`, `prompts`,
  `scoring`, `metrics`), reported by `report`; `run` holds the `llamita evaluate` entry functions.
- `lm_eval_adapter` / `lm_eval_cli`: the ``llamita`` model for lm-evaluation-harness itself.
"""
