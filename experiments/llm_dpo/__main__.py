"""``python -m experiments.llm_dpo``: see `experiments.llm_dpo.train`."""

from experiments.llm_dpo.train import main

if __name__ == "__main__":
  main()
