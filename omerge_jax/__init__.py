"""omerge_jax: online merging optimizers (OnDARE, OnTIES) as Optax transforms.

Lu et al., "Online Merging Optimizers for Boosting Rewards and Mitigating Tax
in Alignment", 2024 (arXiv 2405.17931).
"""

from omerge_jax import consensus
from omerge_jax import offline
from omerge_jax import sparsify
from omerge_jax import trim
from omerge_jax.alias import decoupled_weight_decay
from omerge_jax.alias import ondare
from omerge_jax.alias import onties
from omerge_jax.delta import reference_delta
from omerge_jax.transform import MergeStats
from omerge_jax.transform import OnlineMergeState
from omerge_jax.transform import merge_stats
from omerge_jax.transform import online_merge

__version__ = "0.1.0"

__all__ = [
  "MergeStats",
  "OnlineMergeState",
  "consensus",
  "decoupled_weight_decay",
  "merge_stats",
  "offline",
  "ondare",
  "online_merge",
  "onties",
  "reference_delta",
  "sparsify",
  "trim",
]
