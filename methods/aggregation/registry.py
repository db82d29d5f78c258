"""Registry of gradient-aggregation methods, so that configs and the CLI name them."""
from __future__ import annotations

import inspect
from typing import Any

from graphsurgeon.errors import OptionError
from graphsurgeon.methods.aggregation.base import Aggregator
from graphsurgeon.methods.aggregation.cagrad import CAGrad
from graphsurgeon.methods.aggregation.imtl import IMTLG
from graphsurgeon.methods.aggregation.mgda import MGDA
from graphsurgeon.methods.aggregation.nash_mtl import NashMTL
from graphsurgeon.methods.aggregation.pcgrad import PCGrad
from graphsurgeon.methods.aggregation.weighting import DWA, EW, UW, GradNorm

__all__ = ["AGGREGATORS", "make_aggregator"]

AGGREGATORS: dict[str, type[Aggregator]] = {
    "ew": EW,
    "uw": UW,
    "dwa": DWA,
    "gradnorm": GradNorm,
    "pcgrad": PCGrad,
    "cagrad": CAGrad,
    "mgda": MGDA,
    "imtl_g": IMTLG,
    "nash_mtl": NashMTL,
}


def make_aggregator(name: str, num_tasks: int, **kwargs: Any) -> Aggregator:
    """Build the aggregator registered as ``name`` for ``num_tasks`` tasks.

    ``kwargs`` are the method's own options (e.g. ``c`` for CAGrad, ``normalization`` for
    MGDA); they are checked against its constructor so that a typo in a config fails here
    with the valid names rather than as a bare ``TypeError``.
    """
    key = str(name).lower()
    if key not in AGGREGATORS:
        raise OptionError(
            f"unknown aggregator {name!r}; use one of: {', '.join(sorted(AGGREGATORS))}."
        )
    cls = AGGREGATORS[key]
    parameters = inspect.signature(cls.__init__).parameters
    options = [p for p in parameters if p not in ("self", "num_tasks")]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise OptionError(
            f"aggregator {key!r} has no option(s) {unknown}; valid options: "
            f"{', '.join(options) if options else 'none'}."
        )
    return cls(num_tasks, **kwargs)
