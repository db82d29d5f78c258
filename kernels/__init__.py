"""Fused kernels (Triton) with pure-PyTorch references."""
