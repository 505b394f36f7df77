"""A small decoder-only transformer language model in Flax NNX.

The kernels carry sharding annotations (``nnx.with_partitioning``): on one
CPU they are inert metadata, on a mesh with ``data`` and ``model`` axes the
same code shards the model (`training.shard`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.alignment_tax import tokenizer

_INIT = nnx.initializers.normal(0.02)


def _dense(d_in, d_out, axes, rngs):
  return nnx.Linear(d_in, d_out, use_bias=False, kernel_init=nnx.with_partitioning(_INIT, axes), rngs=rngs)


class Block(nnx.Module):
  """Pre-norm attention and MLP with residual connections.

  No biases and RMS norms: few parameter leaves keep the per-leaf merges
  (one top-k per leaf for OnTIES) cheap to compile.
  """

  def __init__(self, d_model: int, n_heads: int, d_ff: int, *, rngs: nnx.Rngs):
    self.n_heads = n_heads
    self.norm1 = nnx.RMSNorm(d_model, rngs=rngs)
    self.qkv = _dense(d_model, 3 * d_model, (None, "model"), rngs)
    self.out = _dense(d_model, d_model, ("model", None), rngs)
    self.norm2 = nnx.RMSNorm(d_model, rngs=rngs)
    self.up = _dense(d_model, d_ff, (None, "model"), rngs)
    self.down = _dense(d_ff, d_model, ("model", None), rngs)

  def __call__(self, x, attend):
    b, t, d = x.shape
    q, k, v = jnp.split(self.qkv(self.norm1(x)), 3, axis=-1)
    heads = lambda z: z.reshape(b, t, self.n_heads, d // self.n_heads)
    logits = jnp.einsum("bqhd,bkhd->bhqk", heads(q), heads(k)) / jnp.sqrt(d // self.n_heads)
    weights = jax.nn.softmax(jnp.where(attend[:, None], logits, -1e9), axis=-1)
    x = x + self.out(jnp.einsum("bhqk,bkhd->bqhd", weights, heads(v)).reshape(b, t, d))
    return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class Transformer(nnx.Module):
  """Token and position embeddings, ``n_layers`` blocks, tied output layer."""

  def __init__(self, vocab: int, max_len: int, d_model: int, n_layers: int, n_heads: int,
               d_ff: int, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab, d_model, embedding_init=nnx.with_partitioning(_INIT, (None, "model")), rngs=rngs)
    self.pos = nnx.Embed(max_len, d_model, embedding_init=_INIT, rngs=rngs)
    self.blocks = nnx.List([Block(d_model, n_heads, d_ff, rngs=rngs) for _ in range(n_layers)])
    self.norm = nnx.RMSNorm(d_model, rngs=rngs)

  def __call__(self, tokens):
    """Next-token logits ``[b, t, vocab]`` of int ``tokens`` ``[b, t]`` (PAD-aware)."""
    real = tokens != tokenizer.PAD
    # Count positions from the first real token, so left padding does not shift them.
    pos = jnp.maximum(jnp.cumsum(real, axis=1) - 1, 0)
    t = tokens.shape[1]
    attend = jnp.tril(jnp.ones((t, t), bool))[None] & real[:, None, :]
    # A PAD query attends to itself so its softmax row is never empty.
    attend = attend | jnp.eye(t, dtype=bool)[None]
    x = self.embed(tokens) + self.pos(pos)
    for block in self.blocks:
      x = block(x, attend)
    return self.embed.attend(self.norm(x))


def create(cfg, seed: int) -> Transformer:
  """A freshly initialised model of ``cfg``.

  Under a mesh (``jax.set_mesh``) each annotated kernel is created sharded;
  without one the annotations are kept as metadata only.
  """
  build = lambda: Transformer(tokenizer.VOCAB_SIZE, cfg.prompt_len + cfg.answer_len, cfg.d_model,
                              cfg.n_layers, cfg.n_heads, cfg.d_ff, rngs=nnx.Rngs(seed))
  if jax.sharding.get_abstract_mesh().empty:
    with nnx.use_eager_sharding(False):
      return build()
  return build()
