"""Methods that learn the task tree: MTSL (fuse similar task nodes), TAG and IT-MTL (lookahead
affinity), DMTG (differentiable grouping), with the similarity, partition and knowledge-
amalgamation helpers only they use; and `merge_trained`, MTSL's structural learning run post
hoc on separately trained models."""
from graphsurgeon.methods.structure.dmtg import DMTG, DMTGConfig
from graphsurgeon.methods.structure.itmtl import ITMTL
from graphsurgeon.methods.structure.lookahead import LookaheadMethod
from graphsurgeon.methods.structure.merge_trained import MergeBudget, MergeConfig, MergeResult, merge_trained
from graphsurgeon.methods.structure.mtsl import MTSL, MTSLConfig, depth_schedule
from graphsurgeon.methods.structure.tag import TAG, TAGConfig

__all__ = [
    "DMTG",
    "ITMTL",
    "MTSL",
    "TAG",
    "DMTGConfig",
    "LookaheadMethod",
    "MTSLConfig",
    "MergeBudget",
    "MergeConfig",
    "MergeResult",
    "TAGConfig",
    "depth_schedule",
    "merge_trained",
]
