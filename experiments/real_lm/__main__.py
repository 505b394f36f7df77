from experiments.real_lm import run

if __name__ == "__main__":
  run.main()
