"""GRPO of real Qwen/Llama checkpoints with Tunix and the online merging optimizers.

Run ``python -m experiments.llm_grpo --help``; docs/llm.md's "GRPO" has the
commands. Needs the ``tunix`` extra.
"""
