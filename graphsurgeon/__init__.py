"""graphsurgeon: multi-task networks from any traceable PyTorch backbone.

Data flows one way: model → `trace` → `segment` → `TaskTree` → `MultiTaskNetwork` →
(train, surgery)* → `materialize` / `to_export` / `to_torchscript`. `merge_trained` starts the
same flow from several separately trained models of one architecture.

Layers (each subpackage exports its public names):
    ``graphsurgeon.core``      the engine: tracing, segments, tree, network, surgery, export
    ``graphsurgeon.training``  the one training loop (`Trainer`) and multi-process support
    ``graphsurgeon.methods``   MTSL, TAG, IT-MTL, DMTG, gradient methods, sharpness-aware MTL
    ``graphsurgeon.kernels``   batched task heads (Triton, PyTorch) with references
    ``graphsurgeon.data``      datasets, task descriptions, corruptions
    ``graphsurgeon.apps``      command line, demo, experiment wiring, plots
"""
from graphsurgeon.core import (
    MultiTaskNetwork,
    Segment,
    Task,
    TaskTree,
    TreeNode,
    check,
    count_parameters,
    get_graph_node_names,
    load,
    materialise,
    materialize,
    multitask,
    save,
    segment,
    surgery,
    to_export,
    to_onnx,
    to_torchscript,
    trace,
)
from graphsurgeon.core.export import ExportError
from graphsurgeon.errors import (
    BackendError,
    BoundaryError,
    CheckpointError,
    ConfigError,
    ExampleInputError,
    GradientError,
    GraphSurgeonError,
    HeadMismatchError,
    HeadsInputError,
    InvariantError,
    MergeError,
    MethodError,
    MissingDependencyError,
    NonFiniteLossError,
    OptionError,
    SideInputError,
    TaskSpecError,
    TraceError,
    TreeEditError,
    TrunkError,
    UnusedNodesWarning,
)
from graphsurgeon.methods.structure.merge_trained import MergeBudget, MergeConfig, MergeResult, merge_trained
from graphsurgeon.training import Callback, TrainConfig, Trainer, fit

__version__ = "0.2.0"

__all__ = [
    "BackendError",
    "BoundaryError",
    "Callback",
    "CheckpointError",
    "ConfigError",
    "ExampleInputError",
    "ExportError",
    "GradientError",
    "GraphSurgeonError",
    "HeadMismatchError",
    "HeadsInputError",
    "InvariantError",
    "MergeBudget",
    "MergeConfig",
    "MergeError",
    "MergeResult",
    "MethodError",
    "MissingDependencyError",
    "MultiTaskNetwork",
    "NonFiniteLossError",
    "OptionError",
    "Segment",
    "SideInputError",
    "Task",
    "TaskSpecError",
    "TaskTree",
    "TraceError",
    "TrainConfig",
    "Trainer",
    "TreeEditError",
    "TreeNode",
    "TrunkError",
    "UnusedNodesWarning",
    "__version__",
    "check",
    "count_parameters",
    "fit",
    "get_graph_node_names",
    "load",
    "materialise",
    "materialize",
    "merge_trained",
    "multitask",
    "save",
    "segment",
    "surgery",
    "to_export",
    "to_onnx",
    "to_torchscript",
    "trace",
]
