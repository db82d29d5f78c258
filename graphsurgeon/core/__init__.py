"""The engine: model → `trace` → `segment` → `TaskTree` → `MultiTaskNetwork` → `surgery` →
`materialize` / export. Plain functions over fx graphs; methods decide, only `surgery` edits,
only the network executes."""
from graphsurgeon.core import surgery
from graphsurgeon.core.build import multitask
from graphsurgeon.core.checkpoint import load, save
from graphsurgeon.core.export import ExportError, materialise, materialize, to_export, to_onnx, to_torchscript
from graphsurgeon.core.invariants import check, count_flops, count_parameters
from graphsurgeon.core.modes import eval_mode
from graphsurgeon.core.network import MultiTaskNetwork, Task
from graphsurgeon.core.segments import Segment, segment
from graphsurgeon.core.trace import get_graph_node_names, trace
from graphsurgeon.core.tree import TaskTree, TreeNode

__all__ = [
    "ExportError",
    "MultiTaskNetwork",
    "Segment",
    "Task",
    "TaskTree",
    "TreeNode",
    "check",
    "count_flops",
    "count_parameters",
    "eval_mode",
    "get_graph_node_names",
    "load",
    "materialise",
    "materialize",
    "multitask",
    "save",
    "segment",
    "surgery",
    "to_export",
    "to_onnx",
    "to_torchscript",
    "trace",
]
