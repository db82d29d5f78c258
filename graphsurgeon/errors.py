"""Every error the library raises on bad input derives from `GraphSurgeonError`.

Messages name the module/node at fault and end with what to do about it, so that a
user never has to read an fx traceback to find out what went wrong.
"""


class GraphSurgeonError(Exception):
    """Base class of the library's errors."""


class TraceError(GraphSurgeonError):
    """The backbone cannot be traced by torch.fx (e.g. data-dependent control flow)."""


class TrunkError(GraphSurgeonError):
    """The requested trunk node does not exist or cannot end the shared backbone."""


class TaskSpecError(GraphSurgeonError):
    """Task names or task specifications are invalid (empty, duplicate, wrong type)."""


class HeadMismatchError(GraphSurgeonError):
    """A task head cannot consume the trunk output."""


class TreeEditError(GraphSurgeonError):
    """A task-tree edit is not allowed (e.g. merging nodes that are not siblings)."""


class InvariantError(GraphSurgeonError):
    """A multi-task network or task tree violates one of the engine's invariants."""


class CheckpointError(GraphSurgeonError):
    """A checkpoint is corrupt or does not match the network it is loaded into."""


class MissingDependencyError(GraphSurgeonError, ImportError):
    """A feature needs an optional package (an extra) that is not installed."""


class ConfigError(GraphSurgeonError):
    """A training setting (`graphsurgeon.training.TrainConfig` field, CLI flag) has an invalid value."""
