"""Every error the library raises on bad input is a specific `GraphSurgeonError` subclass.

The scan reads the source (AST), so a new ``raise ValueError(...)`` or a bare
``raise GraphSurgeonError(...)`` fails here, in CI, rather than surprising a user who catches
``GraphSurgeonError`` subclasses.
"""
import ast
import builtins
import importlib
import inspect
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import graphsurgeon as gs
from graphsurgeon import errors

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("graphsurgeon", "methods", "kernels")

# builtin exceptions that are no user error: internal invariants, abstract methods, control flow
ALLOWED_BUILTINS = {"AssertionError", "NotImplementedError", "KeyboardInterrupt", "SystemExit", "StopIteration"}
# (file, exception) pairs that are deliberate: the import-time torch version guard
ALLOWED_AT = {("graphsurgeon/core/trace.py", "ImportError")}


def _source_files() -> list[Path]:
    """The library's Python files, each once: graphsurgeon/methods and graphsurgeon/kernels are
    symlinks to the top-level methods/ and kernels/, which are scanned under their own names."""
    files = []
    for top in SOURCES:
        for path in (ROOT / top).rglob("*.py"):
            parts = path.relative_to(ROOT).parts
            if top == "graphsurgeon" and parts[1] in ("methods", "kernels"):
                continue
            files.append(path)
    return sorted(files)


def _raised_names(path: Path) -> list[tuple[int, str]]:
    """(line, class name) of every ``raise Name(...)`` / ``raise Name`` in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name):
                found.append((node.lineno, exc.id))
    return found


def test_the_scan_sees_the_whole_library():
    files = {str(p.relative_to(ROOT)) for p in _source_files()}
    assert {"graphsurgeon/core/segments.py", "methods/sam.py", "kernels/heads/spec.py"} <= files


def test_no_builtin_exception_is_raised_for_user_errors():
    bad = []
    for path in _source_files():
        rel = str(path.relative_to(ROOT))
        for line, name in _raised_names(path):
            builtin = getattr(builtins, name, None)
            is_exception = isinstance(builtin, type) and issubclass(builtin, BaseException)
            if is_exception and name not in ALLOWED_BUILTINS and (rel, name) not in ALLOWED_AT:
                bad.append(f"{rel}:{line}: raise {name}")
    assert not bad, "raise a GraphSurgeonError subclass (graphsurgeon/errors.py) instead:\n" + "\n".join(bad)


def test_no_bare_base_class_is_raised():
    bad = [
        f"{path.relative_to(ROOT)}:{line}"
        for path in _source_files()
        for line, name in _raised_names(path)
        if name == "GraphSurgeonError"
    ]
    assert not bad, "raise the specific subclass for the kind of error (graphsurgeon/errors.py):\n" + "\n".join(bad)


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in ("methods", "kernels"):
        parts = ["graphsurgeon", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def test_every_raised_library_class_is_a_graphsurgeon_error():
    bad = []
    for path in _source_files():
        names = {name for _, name in _raised_names(path) if not hasattr(builtins, name)}
        if not names:
            continue
        module = importlib.import_module(_module_name(path))
        for name in sorted(names):
            cls = getattr(module, name, None)
            if isinstance(cls, type) and not issubclass(cls, gs.GraphSurgeonError):
                bad.append(f"{path.relative_to(ROOT)}: {name}")
    assert not bad, bad


def test_every_error_class_says_what_it_is_for():
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, Exception)]
    assert len(classes) >= 12
    for cls in classes:
        assert cls.__doc__ and len(cls.__doc__) > 30, cls
        assert cls.__name__ in gs.__all__, f"{cls.__name__} is not exported from graphsurgeon"


def test_bad_granularity_is_an_option_error_not_a_value_error():
    with pytest.raises(gs.OptionError) as err:
        gs.multitask(torchvision.models.resnet18(), {"a": nn.Linear(512, 2)}, granularity="blocks")
    assert not isinstance(err.value, ValueError)
    assert "granularity='blocks'" in str(err.value) and "granularity='fine'" in str(err.value)


def test_aggregator_errors_name_the_option_and_the_fix():
    from graphsurgeon.methods.aggregation import make_aggregator

    with pytest.raises(gs.OptionError, match="unknown aggregator 'pcgradd'.*pcgrad"):
        make_aggregator("pcgradd", 2)
    agg = make_aggregator("ew", 2)
    with pytest.raises(gs.GradientError, match=r"shape \[tasks, params\]") as err:
        agg.aggregate(torch.zeros(3), torch.ones(2))
    assert isinstance(err.value, ValueError)  # a bad value to a numeric function


def test_batched_heads_input_errors_are_value_errors_too():
    from graphsurgeon.kernels.heads import BatchedHeads

    heads = BatchedHeads(4, (2, 3))
    with pytest.raises(gs.HeadsInputError, match="in_features=4") as err:
        heads(torch.zeros(5, 3))
    assert isinstance(err.value, ValueError)
