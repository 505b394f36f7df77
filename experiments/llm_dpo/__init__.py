"""DPO of real Qwen/Llama checkpoints with Tunix and the online merging optimizers.

Run ``python -m experiments.llm_dpo --help``; docs/llm.md has the
commands for one host, a TPU pod slice and a GPU cluster. Needs the
``tunix`` extra (``pip install -e .[tunix]``).
"""
