"""lm-eval's own command line with the ``llamita`` model registered.

lm-evaluation-harness 0.4 finds models only in its registry and offers no plugin entry point, so this module
imports the adapter and hands over to lm-eval's CLI; every lm-eval option works as usual:

    python -m llamita.evaluate.lm_eval_cli run --model llamita \\
        --model_args checkpoint=runs/tl,batch_size=64 --tasks hellaswag,arc_easy --num_fewshot 0
"""

from __future__ import annotations


def main() -> None:
    """Register the adapter, then run ``lm_eval``'s CLI on sys.argv."""
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as e:
        raise SystemExit(f"lm-evaluation-harness is not installed: pip install 'llamita[eval]' ({e})") from None
    import llamita.evaluate.lm_eval_adapter  # noqa: F401  (registers "llamita")

    cli_evaluate()


if __name__ == "__main__":
    main()
