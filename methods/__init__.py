"""Training methods: strategies over the one training loop (`graphsurgeon.training`) that
decide what to edit (through `graphsurgeon.core.surgery`) and how to combine the tasks.

- `structure/`: methods that learn the tree (MTSL, TAG, IT-MTL, DMTG);
- `aggregation/`: gradient methods' aggregators (EW, UW, DWA, GradNorm, PCGrad, CAGrad, MGDA,
  IMTL-G, Nash-MTL), used by `GradientMethod` and `SharpnessAware`;
- `Method`: the contract every method implements (the plain sum of the task losses).
"""
from graphsurgeon.methods.aggregation import (
    AGGREGATORS,
    DWA,
    EW,
    IMTLG,
    MGDA,
    UW,
    Aggregator,
    CAGrad,
    GradNorm,
    NashMTL,
    PCGrad,
    make_aggregator,
)
from graphsurgeon.methods.base import Method, Step
from graphsurgeon.methods.gradient_method import GradientMethod
from graphsurgeon.methods.sam import SharpnessAware
from graphsurgeon.methods.structure import DMTG, ITMTL, MTSL, TAG, DMTGConfig, MTSLConfig, TAGConfig, depth_schedule

__all__ = [
    "AGGREGATORS",
    "DMTG",
    "DWA",
    "EW",
    "IMTLG",
    "ITMTL",
    "MGDA",
    "MTSL",
    "TAG",
    "UW",
    "Aggregator",
    "CAGrad",
    "DMTGConfig",
    "GradNorm",
    "GradientMethod",
    "MTSLConfig",
    "Method",
    "NashMTL",
    "PCGrad",
    "SharpnessAware",
    "Step",
    "TAGConfig",
    "depth_schedule",
    "make_aggregator",
]
