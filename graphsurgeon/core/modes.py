"""`eval_mode`: run modules in evaluation mode for a while, then give every submodule its own mode back.

``was = net.training; net.eval(); ...; net.train(was)`` loses information: ``net.train(was)``
sets *every* submodule to ``was``, so a BatchNorm the user froze (put in eval inside a training
network) comes back in train mode and its statistics start moving; and when the body raises, the
network stays in eval. This is the one place that saves and restores modes; every site that
needs eval mode for a measurement (shape propagation, a head check, a similarity pass,
distillation targets, FLOP counting) goes through it.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["copy_modes", "eval_mode"]


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put ``modules`` (and all their submodules) in eval mode; on exit, also on an exception,
    restore each submodule's own previous ``training`` flag."""
    saved = {m: m.training for module in modules for m in module.modules()}
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for m, mode in saved.items():
            m.training = mode


def copy_modes(source: nn.Module, target: nn.Module) -> None:
    """Give each submodule of ``target`` the ``training`` flag of ``source``'s submodule of the
    same relative name (``target`` itself takes ``source``'s), so that a copy made of a module
    runs in the modes the original ran in, a user-frozen BatchNorm included. Submodules without
    a counterpart take ``source``'s own mode."""
    modes = {name: m.training for name, m in source.named_modules()}
    for name, m in target.named_modules():
        m.training = modes.get(name, source.training)
