"""Every error the library raises on bad input derives from `GraphSurgeonError`; the warnings it
gives about a result that may not be what the user meant are here too.

Messages name the module/node at fault and end with what to do about it, so that a
user never has to read an fx traceback to find out what went wrong.
"""


class GraphSurgeonError(Exception):
    """Base class of the library's errors."""


class TraceError(GraphSurgeonError):
    """The backbone cannot be traced by torch.fx (e.g. data-dependent control flow)."""


class TrunkError(GraphSurgeonError):
    """The requested trunk node does not exist or cannot end the shared backbone."""


class BoundaryError(GraphSurgeonError):
    """A segment boundary between module blocks carries more live values than
    ``max_boundary_values`` allows (see `graphsurgeon.segment`)."""


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
class NonFiniteLossError(GraphSurgeonError, FloatingPointError):
    """A task loss became NaN or infinite during training (NaN inputs or targets, a diverging
    learning rate); the message names the task(s), the epoch and the step.

    Also a ``FloatingPointError``, the builtin for a numeric computation gone non-finite."""


class OptionError(GraphSurgeonError):
    """An option has a value outside what it accepts (``granularity=``, ``backend=``,
    ``activation=``, an aggregator's or a method's hyperparameter, an unknown method name).

    The message names the option, the value given and the values accepted. Deliberately not a
    ``ValueError``: code that catches ``ValueError`` around a training step should not swallow
    a misconfiguration.
    """


class MethodError(GraphSurgeonError):
    """A training method cannot run as configured: it does not combine with another option
    (``rep_grad`` with sharpness-aware training), needs a network it was not given (a shared
    first segment), or is called out of order (no measurement or batch yet)."""


class GradientError(GraphSurgeonError, ValueError):
    """Per-task losses or gradients handed to an aggregator or loss weighting have the wrong
    count, shape or dtype, or are not finite.

    Also a ``ValueError``, since these are bad values passed to a numeric function, which
    callers of such functions commonly catch as one.
    """


class HeadsInputError(GraphSurgeonError, ValueError):
    """Batched task heads (``BatchedHeads``, the fused heads kernel) were given weights or inputs
    of the wrong type, shape, dtype or device.

    Also a ``ValueError``, as ``nn.Linear`` raises for the same mistakes.
    """


class BackendError(GraphSurgeonError):
    """A compute backend that was asked for by name (``backend='triton'``) cannot run here (no
    GPU, no Triton); the message says why and which backend runs instead."""


class ExampleInputError(GraphSurgeonError):
    """``example_input`` does not run through the traced backbone (a shape, dtype or device the
    model does not take, e.g. 64x64 images for a model built for 224x224); the message names
    the module it failed in."""


class MergeError(GraphSurgeonError):
    """Separately trained models cannot be merged into one multi-task network: their
    architectures differ (the message names the task and the first segment that differs), a
    task's head cannot be found in its model, or the merge was asked for what it cannot measure
    (no loss or metric for a task, a budget with a negative tolerance)."""


class SideInputError(GraphSurgeonError):
    """A side input (a forward argument the backbone reads besides its main input, e.g. a
    transformer's ``attention_mask``) is missing from a call, unknown to the network, or not
    supported by the capture or export asked for; the message names it and what to pass."""


class UnusedNodesWarning(UserWarning):
    """Nodes of the traced backbone that the multi-task network will never run: computed from the
    input, but neither on the way to the trunk nor after it (GoogLeNet's auxiliary classifiers in
    train mode, LRASPP's low-level skip into its head). A warning, not an error: dropping an
    auxiliary head is often what the user wants. The message names them by module and says how to
    keep them (a trunk that consumes them) or silence it (``warnings.filterwarnings``)."""
