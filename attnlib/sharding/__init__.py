"""attnlib.sharding: inference partitioning after Pope et al. 2022,
"Efficiently Scaling Transformer Inference".

* mesh: ``MeshConfig``, ``make_mesh`` (axes "x", "y", "z").
* feedforward: the layouts ws1d / ws2d / wg_x / wg_xy / wg_xyz as shard_map
  programs with explicit collectives and as jit + NamedSharding, and the
  exact per-chip collectives of each (``ffn_collectives``).
* attention: ``ShardedAttention`` ("heads"; "batch_kv": the multi-query KV
  cache sharded over batch with the all-to-alls) and ``attention_collectives``.
* rules: logical axis rules per layout, ``shard_model`` for any attnlib model,
  cache shardings, restoring checkpoints under another mesh.
* quant: int8 weights (per-channel scales).
* sequence_parallel: LASP-2 linear attention over a sequence split on a mesh axis.
* hlo: the collectives of a compiled program, in the same convention.
* chips, cost_model, planner: the analytical model (FLOPs, HBM and network
  bytes per chip -> time) and the layout planner.
"""

from attnlib.sharding import cost_model
from attnlib.sharding import planner
from attnlib.sharding.attention import ShardedAttention
from attnlib.sharding.attention import attention_collectives
from attnlib.sharding.chips import CHIPS
from attnlib.sharding.chips import ChipSpec
from attnlib.sharding.chips import get_chip
from attnlib.sharding.cost_model import ModelSpec
from attnlib.sharding.cost_model import estimate
from attnlib.sharding.feedforward import LAYOUTS
from attnlib.sharding.feedforward import Collective
from attnlib.sharding.feedforward import ffn_collectives
from attnlib.sharding.feedforward import ffn_pjit
from attnlib.sharding.feedforward import ffn_shard_map
from attnlib.sharding.hlo import collectives_in_compiled
from attnlib.sharding.hlo import sent_bytes_per_chip
from attnlib.sharding.mesh import MeshConfig
from attnlib.sharding.mesh import make_mesh
from attnlib.sharding.planner import plan
from attnlib.sharding.quant import quantize_model
from attnlib.sharding.rules import ATTENTION_LAYOUTS
from attnlib.sharding.rules import logical_axis_rules
from attnlib.sharding.rules import restore_sharded
from attnlib.sharding.rules import shard_model
from attnlib.sharding.sequence_parallel import linear_attention_sequence_parallel
from attnlib.sharding.sequence_parallel import sequence_parallel_collectives

__all__ = [
    "ATTENTION_LAYOUTS", "CHIPS", "ChipSpec", "Collective", "LAYOUTS", "MeshConfig",
    "ModelSpec", "ShardedAttention", "attention_collectives", "collectives_in_compiled",
    "cost_model", "estimate", "ffn_collectives", "ffn_pjit", "ffn_shard_map", "get_chip",
    "linear_attention_sequence_parallel", "logical_axis_rules", "make_mesh", "plan",
    "planner", "quantize_model", "restore_sharded", "sent_bytes_per_chip", "shard_model",
    "sequence_parallel_collectives",
]
