"""``python -m experiments.llm_grpo``: see `experiments.llm_grpo.train`."""

from experiments.llm_grpo.train import main

if __name__ == "__main__":
  main()
