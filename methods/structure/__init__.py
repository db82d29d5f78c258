"""Methods that learn the task tree: MTSL (fuse similar task nodes), TAG and IT-MTL (lookahead
affinity), DMTG (differentiable grouping), with the similarity, partition and knowledge-
amalgamation helpers only they use."""
from graphsurgeon.methods.structure.dmtg import DMTG, DMTGConfig
from graphsurgeon.methods.structure.itmtl import ITMTL
from graphsurgeon.methods.structure.lookahead import LookaheadMethod
from graphsurgeon.methods.structure.mtsl import MTSL, MTSLConfig
from graphsurgeon.methods.structure.tag import TAG, TAGConfig

__all__ = ["DMTG", "ITMTL", "MTSL", "TAG", "DMTGConfig", "LookaheadMethod", "MTSLConfig", "TAGConfig"]
