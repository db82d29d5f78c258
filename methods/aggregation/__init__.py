"""Gradient aggregation: how T per-task gradients (or losses) become one update direction.

One file per aggregator behind `Aggregator` (`base.py`); `AGGREGATORS` maps the command-line
names to the classes.
"""
from graphsurgeon.methods.aggregation.base import Aggregator, gram, per_task_gradients, split_parameters
from graphsurgeon.methods.aggregation.cagrad import CAGrad
from graphsurgeon.methods.aggregation.imtl import IMTLG
from graphsurgeon.methods.aggregation.mgda import MGDA
from graphsurgeon.methods.aggregation.nash_mtl import NashMTL
from graphsurgeon.methods.aggregation.pcgrad import PCGrad
from graphsurgeon.methods.aggregation.registry import AGGREGATORS, make_aggregator
from graphsurgeon.methods.aggregation.weighting import DWA, EW, UW, GradNorm

__all__ = [
    "AGGREGATORS",
    "DWA",
    "EW",
    "IMTLG",
    "MGDA",
    "UW",
    "Aggregator",
    "CAGrad",
    "GradNorm",
    "NashMTL",
    "PCGrad",
    "gram",
    "make_aggregator",
    "per_task_gradients",
    "split_parameters",
]
