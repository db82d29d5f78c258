"""graphsurgeon: multi-task networks from any traceable PyTorch backbone.

Data flows one way: model → `trace` → `segment` → `TaskTree` → `MultiTaskNetwork` →
(train, surgery)* → `materialise` / `to_export` / `to_torchscript`.
"""
from graphsurgeon.build import multitask
from graphsurgeon.checkpoint import load, save
from graphsurgeon.errors import (
    CheckpointError,
    GraphSurgeonError,
    HeadMismatchError,
    InvariantError,
    TaskSpecError,
    TraceError,
    TreeEditError,
    TrunkError,
)
from graphsurgeon.export import ExportError, materialise, to_export, to_torchscript
from graphsurgeon.invariants import check, count_parameters
from graphsurgeon.network import MultiTaskNetwork, Task
from graphsurgeon.segments import Segment, segment
from graphsurgeon.trace import get_graph_node_names, trace
from graphsurgeon.tree import TaskTree, TreeNode

__all__ = [
    "CheckpointError",
    "ExportError",
    "GraphSurgeonError",
    "HeadMismatchError",
    "InvariantError",
    "MultiTaskNetwork",
    "Segment",
    "Task",
    "TaskSpecError",
    "TaskTree",
    "TraceError",
    "TreeEditError",
    "TreeNode",
    "TrunkError",
    "check",
    "count_parameters",
    "get_graph_node_names",
    "load",
    "materialise",
    "multitask",
    "save",
    "segment",
    "to_export",
    "to_torchscript",
    "trace",
]
