"""Fused kernels with pure-PyTorch references: batched task heads (`graphsurgeon.kernels.heads`)."""
from graphsurgeon.kernels.heads import BatchedHeads, batched_heads, explain, reference_heads

__all__ = ["BatchedHeads", "batched_heads", "explain", "reference_heads"]
