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
  return nnx.Linear(
    d_in, d_out, use_bias=False, kernel_init=nnx.with_partitioning(_INIT, axes), rngs=rngs
  )


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

  def __call__(self, x, attend, cache=None, at=None):
    """The block on ``x`` [b, t, d] attending by ``attend`` [b, t, t_keys].

    Returns the output and this block's keys and values. With ``cache`` (keys
    and values [b, T, d] of the positions seen so far), ``x`` is the one
    position ``at`` and its keys and values are written into the cache.
    """
    b, t, d = x.shape
    q, k, v = jnp.split(self.qkv(self.norm1(x)), 3, axis=-1)
    if cache is not None:
      k = jax.lax.dynamic_update_slice_in_dim(cache[0], k, at, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(cache[1], v, at, axis=1)
    heads = lambda z: z.reshape(b, z.shape[1], self.n_heads, d // self.n_heads)
    logits = jnp.einsum("bqhd,bkhd->bhqk", heads(q), heads(k)) / jnp.sqrt(d // self.n_heads)
    weights = jax.nn.softmax(jnp.where(attend[:, None], logits, -1e9), axis=-1)
    x = x + self.out(jnp.einsum("bhqk,bkhd->bqhd", weights, heads(v)).reshape(b, t, d))
    return x + self.down(jax.nn.gelu(self.up(self.norm2(x)))), (k, v)


class Transformer(nnx.Module):
  """Token and position embeddings, ``n_layers`` blocks, tied output layer."""

  def __init__(
    self,
    vocab: int,
    max_len: int,
    d_model: int,
    n_layers: int,
    n_heads: int,
    d_ff: int,
    *,
    rngs: nnx.Rngs,
  ):
    self.embed = nnx.Embed(
      vocab, d_model, embedding_init=nnx.with_partitioning(_INIT, (None, "model")), rngs=rngs
    )
    self.pos = nnx.Embed(max_len, d_model, embedding_init=_INIT, rngs=rngs)
    self.blocks = nnx.List([Block(d_model, n_heads, d_ff, rngs=rngs) for _ in range(n_layers)])
    self.norm = nnx.RMSNorm(d_model, rngs=rngs)

  def __call__(self, tokens):
    """Next-token logits ``[b, t, vocab]`` of int ``tokens`` ``[b, t]`` (PAD-aware)."""
    return self.prefill(tokens)[0]

  def prefill(self, tokens):
    """The logits of ``tokens`` and every block's keys and values (a `decode` cache)."""
    real = tokens != tokenizer.PAD
    # Count positions from the first real token, so left padding does not shift them.
    pos = jnp.maximum(jnp.cumsum(real, axis=1) - 1, 0)
    t = tokens.shape[1]
    attend = jnp.tril(jnp.ones((t, t), bool))[None] & real[:, None, :]
    # A PAD query attends to itself so its softmax row is never empty.
    attend = attend | jnp.eye(t, dtype=bool)[None]
    x = self.embed(tokens) + self.pos(pos)
    cache = []
    for block in self.blocks:
      x, kv = block(x, attend)
      cache.append(kv)
    return self.embed.attend(self.norm(x)), cache

  def decode(self, prompts, steps: int, pick):
    """Extend the left-padded ``prompts`` [b, t0] by ``steps`` tokens.

    The keys and values of the positions already seen are cached, so a new
    token costs one position rather than the whole sequence. ``pick(i,
    logits)`` chooses token ``i`` from its next-token logits [b, vocab].
    Returns the ``steps`` new tokens [b, steps].
    """
    b, t0 = prompts.shape
    logits, cache = self.prefill(prompts)
    grow = lambda z: jnp.pad(z, ((0, 0), (0, steps), (0, 0)))
    cache = [(grow(k), grow(v)) for k, v in cache]
    real = jnp.pad(prompts != tokenizer.PAD, ((0, 0), (0, steps)), constant_values=True)
    first_pos = jnp.sum(prompts != tokenizer.PAD, axis=1) - 1

    def body(i, carry):
      out, last, cache = carry
      token = pick(i, last).astype(prompts.dtype)
      out = out.at[:, i].set(token)
      at = t0 + i
      attend = (real & (jnp.arange(t0 + steps) <= at))[:, None, :]
      x = self.embed(token[:, None]) + self.pos((first_pos + 1 + i)[:, None])
      new_cache = []
      for block, kv in zip(self.blocks, cache, strict=True):
        x, kv = block(x, attend, kv, at)
        new_cache.append(kv)
      return out, self.embed.attend(self.norm(x))[:, 0], new_cache

    out = jnp.zeros((b, steps), prompts.dtype)
    return jax.lax.fori_loop(0, steps, body, (out, logits[:, -1], cache))[0]


def sample(model: Transformer, prompts, steps: int, key, temperature):
  """``steps`` tokens after each left-padded prompt row, sampled at ``temperature`` (0: greedy).

  Gumbel-max: :math:`\\arg\\max(\\ell + T g)` with Gumbel noise :math:`g` is
  a sample of :math:`\\mathrm{softmax}(\\ell / T)`. PAD and BOS are never
  generated, only real text and EOS, so a completion's text is its tokens up
  to the first EOS.
  """
  banned = jnp.zeros(tokenizer.VOCAB_SIZE).at[jnp.array([tokenizer.PAD, tokenizer.BOS])].set(-1e9)

  def pick(i, logits):
    noise = jax.random.gumbel(jax.random.fold_in(key, i), logits.shape)
    return jnp.argmax(logits + banned + temperature * noise, axis=-1)

  return model.decode(prompts, steps, pick)


def create(cfg, seed: int) -> Transformer:
  """A freshly initialised model of ``cfg``.

  Under a mesh (``jax.set_mesh``) each annotated kernel is created sharded;
  without one the annotations are kept as metadata only.
  """
  build = lambda: Transformer(
    tokenizer.VOCAB_SIZE,
    cfg.prompt_len + cfg.answer_len,
    cfg.d_model,
    cfg.n_layers,
    cfg.n_heads,
    cfg.d_ff,
    rngs=nnx.Rngs(seed),
  )
  if jax.sharding.get_abstract_mesh().empty:
    with nnx.use_eager_sharding(False):
      return build()
  return build()
