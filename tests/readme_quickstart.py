"""Run the README's quick start as written, on a tiny model: `make wheel` runs it.

Each ```python block under "## Quick start" runs in turn in one namespace,
after a prelude that defines the names the README leaves to the reader
(``sft_params``, ``grads``, a Flax NNX ``sft_model``, ...); a line ``...``
(training goes here) takes one step of the ``tx`` just built. Run from outside
the repository with the installed wheel, it checks what a user who installed
the release would run; it fails if a block raises or a name is missing.
"""

import pathlib
import re
import sys

import jax
import jax.numpy as jnp

README = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")

PRELUDE = """
import jax, jax.numpy as jnp
from flax import nnx
base_params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
sft_params = {"w": jnp.full((4, 3), 0.1), "b": jnp.full(3, -0.1)}
params = sft_params
grads = {"w": jnp.ones((4, 3)), "b": -jnp.ones(3)}
base_model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
sft_model = nnx.Linear(4, 3, rngs=nnx.Rngs(1))
batch = jnp.ones((2, 4))
loss_fn = lambda model, batch: jnp.mean(model(batch) ** 2)
"""


def blocks(text):
  section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
  return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def main():
  found = blocks(README.read_text())
  assert len(found) >= 3, f"expected the quick start's code blocks in {README}, found {len(found)}"
  first = {}
  exec(PRELUDE, first)  # noqa: S102
  exec(found[0], first)  # noqa: S102  (defines tau, the first tx and a step)
  step = "opt_state = tx.init(params); updates, opt_state = tx.update(grads, opt_state, params)"
  for block in found[1:]:  # each independent of the others, after the first
    namespace = dict(first)
    exec(re.sub(r"(?m)^\.\.\.$", step, block), namespace)  # noqa: S102
    if "train_step" in namespace:  # the NNX block defines a step: take it
      namespace["train_step"](namespace["sft_model"], namespace["optimizer"], namespace["batch"])
    updates = namespace.get("updates", first["updates"])
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
  import omerge_jax

  print(
    f"README quick start: {len(found)} blocks ran with omerge_jax {omerge_jax.__version__} "
    f"from {pathlib.Path(omerge_jax.__file__).parent}"
  )


if __name__ == "__main__":
  main()
