"""Checkpoints: the task tree as JSON plus the weights, in one safetensors file.

safetensors holds tensors without pickle (loading a checkpoint runs no code) and carries a
string metadata header, where the tree, the trunk and a fingerprint of every segment live.
The file is written to a temporary name and renamed, so an interrupted save never leaves a
half-written checkpoint behind.

The header also holds a SHA-256 of every tensor (its dtype, shape and bytes): safetensors
checks the layout of a file, not its contents, so a flipped bit in the weights would otherwise
load silently. Loading checks every value it reads (the JSON's types included) and refuses a
tensor whose dtype differs from the network's rather than casting it, so that a checkpoint is
either loaded exactly or refused with a `CheckpointError` naming what is wrong.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, get_args

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from graphsurgeon.core.build import TaskSpec, multitask
from graphsurgeon.core.network import MultiTaskNetwork
from graphsurgeon.core.segments import Granularity
from graphsurgeon.core.surgery import relayout
from graphsurgeon.core.tree import TaskTree
from graphsurgeon.errors import CheckpointError, GraphSurgeonError, OptionError, TraceError, TrunkError

__all__ = ["contents", "lay_out", "load", "load_weights", "read_metadata", "remove_temporaries", "save", "tensor_digest"]

FORMAT = "graphsurgeon-checkpoint/2"
# files of format 1 carry no tensor hashes; they still load (their data is then unchecked)
_LEGACY_FORMATS = ("graphsurgeon-checkpoint/1",)


def _digest(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()[:16]


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (what a checkpoint stores of it)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    digest = hashlib.sha256(f"{str(tensor.dtype).removeprefix('torch.')}|{list(tensor.shape)}|".encode())
    digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def contents(net: MultiTaskNetwork, extra: Mapping[str, Any] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the metadata header of ``net``'s checkpoint (`save` writes them to a
    file, the trainer's run folder into its versioned checkpoint)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "tree": net.tree.to_json(),
        "config": json.dumps(net.config, sort_keys=True),
        "fingerprints": json.dumps([_digest(c) for c in net.fingerprints]),
        "extra": json.dumps(dict(extra or {}), sort_keys=True, default=str),
        "sha256": json.dumps({k: tensor_digest(v) for k, v in tensors.items()}, sort_keys=True),
    }
    return tensors, metadata


def save(net: MultiTaskNetwork, path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``net``'s tree, configuration and weights to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors, metadata = contents(net, extra)
    remove_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb+") as handle:  # on disk before the rename makes it the checkpoint
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def remove_temporaries(path: Path) -> None:
    """Remove the temporaries (``.NAME.*.tmp``, made with ``mkstemp``) that writes of ``path``
    killed before their rename left behind; a symlink of that name is unlinked, not followed."""
    for orphan in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if orphan.is_symlink() or orphan.is_file():
            orphan.unlink(missing_ok=True)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's tree, config, fingerprints and extra data, without loading weights."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist. Check the path (graphsurgeon.save writes it).")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or not a safetensors file ({exc}). Re-save it.") from exc
    if meta.get("format") != FORMAT and meta.get("format") not in _LEGACY_FORMATS:
        raise CheckpointError(
            f"{str(path)!r} is a safetensors file but not a graphsurgeon checkpoint (format {meta.get('format')!r}). "
            "Write checkpoints with graphsurgeon.save(net, path)."
        )
    try:
        return {
            "tree": TaskTree.from_json(_field(meta, "tree", str)),
            "config": _json_field(meta, "config", dict),
            "fingerprints": _fingerprints(meta),
            "extra": _json_field(meta, "extra", dict, default="{}"),
            "sha256": _digests(meta),
        }
    except GraphSurgeonError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} has corrupt metadata ({exc}). Re-save it.") from exc


class _MetadataError(CheckpointError):
    """A metadata field is missing or of the wrong JSON type; `read_metadata` re-raises it
    naming the file."""


def _field(meta: Mapping[str, str], name: str, kind: type, default: str | None = None) -> Any:
    if name not in meta and default is None:
        raise _MetadataError(f"field {name!r} is missing")
    value = meta.get(name, default)
    if not isinstance(value, kind):
        raise _MetadataError(f"field {name!r} is a {type(value).__name__}, expected a {kind.__name__}")
    return value


def _json_field(meta: Mapping[str, str], name: str, kind: type, default: str | None = None) -> Any:
    """A JSON-encoded field of type ``kind``; deep nesting is a corrupt field, not a RecursionError."""
    try:
        value = json.loads(_field(meta, name, str, default))
    except (json.JSONDecodeError, RecursionError) as exc:
        raise _MetadataError(f"field {name!r} is not valid JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(value, kind):
        raise _MetadataError(f"field {name!r} holds a JSON {type(value).__name__}, expected a {kind.__name__}")
    return value


def _fingerprints(meta: Mapping[str, str]) -> list[str]:
    value = _json_field(meta, "fingerprints", list)
    if not all(isinstance(f, str) for f in value):
        raise _MetadataError("field 'fingerprints' must be a list of strings")
    return value


def _digests(meta: Mapping[str, str]) -> dict[str, str] | None:
    """Every tensor's `tensor_digest`; ``None`` for a legacy file, which has none."""
    if meta.get("format") in _LEGACY_FORMATS:
        return None
    value = _json_field(meta, "sha256", dict)
    if not all(isinstance(v, str) for v in value.values()):
        raise _MetadataError("field 'sha256' must map tensor names to hex digests")
    return value


def lay_out(net: MultiTaskNetwork, tree: TaskTree, path: str | os.PathLike) -> None:
    """Lay ``net`` out as the tree of the checkpoint at ``path``: every node a copy of its
    pristine segment, which the checkpoint's weights overwrite next (`load_weights`)."""
    if set(tree.tasks) != set(net.tasks) or tree.depth != net.depth:
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds a network of tasks {list(tree.tasks)} over {tree.depth} segments, not "
            f"this network's {list(net.tasks)} over {net.depth}. Load it into a network of those tasks and backbone "
            "(or restart the run)."
        )
    relayout(net, tree, {n.id: () for n in tree.nodes if n.depth})


def load_weights(net: MultiTaskNetwork, path: str | os.PathLike, meta: Mapping[str, Any] | None = None) -> None:
    """Load a checkpoint's weights into a network of the same tree and backbone.

    ``meta`` is the checkpoint's `read_metadata` when the caller has read it already (`load`
    laid the network out as its tree)."""
    if meta is None:
        meta = read_metadata(path)
        if not meta["tree"].same_structure(net.tree) or meta["tree"] != net.tree:
            raise CheckpointError(
                f"checkpoint {str(path)!r} holds a different task tree than the network:\n{meta['tree']}\n"
                f"vs\n{net.tree}\nUse graphsurgeon.load(path, model, tasks) to rebuild the network from it."
            )
    fingerprints = meta["fingerprints"]
    ours = [_digest(c) for c in net.fingerprints]
    if list(fingerprints) != ours:
        bad = next((i for i, (a, b) in enumerate(zip(fingerprints, ours), 1) if a != b), min(len(ours), len(fingerprints)) + 1)
        raise CheckpointError(
            f"checkpoint {str(path)!r} was cut from a different backbone: segment {bad} differs "
            f"({len(fingerprints)} segments saved, {len(ours)} here). Load it with the same model, trunk=, granularity= and capture= (older files do not record capture=)."
        )
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt ({exc}). Re-save it.") from exc
    own = net.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not match the network: missing {missing[:3]}, unexpected {unexpected[:3]}. "
            "Were the heads or tasks changed? Build the network with the heads the checkpoint was saved with."
        )
    digests = meta["sha256"]
    if digests is not None and set(digests) != set(tensors):
        raise CheckpointError(
            f"checkpoint {str(path)!r} lists hashes for other tensors than it holds "
            f"({sorted(set(digests) ^ set(tensors))[:3]}): the file is corrupt. Re-save it."
        )
    for k, v in tensors.items():
        if v.shape != own[k].shape:
            raise CheckpointError(
                f"checkpoint {str(path)!r}: {k} has shape {tuple(v.shape)}, the network expects {tuple(own[k].shape)}. "
                "Build the network with the same heads/backbone configuration."
            )
        if v.dtype != own[k].dtype:  # load_state_dict would cast it silently
            raise CheckpointError(
                f"checkpoint {str(path)!r}: {k} is {v.dtype}, the network's is {own[k].dtype}. Convert the network "
                f"to the checkpoint's dtype before loading (e.g. net.to({v.dtype})), or re-save it from a network of this dtype."
            )
        if digests is not None and tensor_digest(v) != digests[k]:
            raise CheckpointError(
                f"checkpoint {str(path)!r}: the data of {k} does not match its hash: the file is corrupt. Re-save it."
            )
    net.load_state_dict(tensors)


def _saved_capture(cfg: Mapping[str, Any], path: str | os.PathLike) -> str:
    """How the saved network's backbone was captured; files written before this was saved say
    nothing and were, unless ``capture=`` is passed, captured by fx."""
    capture = cfg.get("capture", "fx")
    if capture not in ("fx", "export"):
        raise CheckpointError(
            f"checkpoint {str(path)!r} has corrupt metadata (config field 'capture' is {capture!r}, not 'fx' or "
            "'export'). Re-save it, or pass capture= to load()."
        )
    return capture


def _saved_example(cfg: Mapping[str, Any], path: str | os.PathLike) -> torch.Tensor:
    """An input of the shape and dtype the backbone was captured with by torch.export (which
    specialises on shapes, not on values): zeros."""
    example = cfg.get("example_input")
    shape = example.get("shape") if isinstance(example, dict) else None
    dtype = getattr(torch, str(example.get("dtype")), None) if isinstance(example, dict) else None
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape) and isinstance(dtype, torch.dtype)):
        raise CheckpointError(
            f"checkpoint {str(path)!r} was captured with torch.export but does not record its example input "
            f"(config field 'example_input' is {example!r}). Pass example_input=<a batch of the shape it was built with>."
        )
    return torch.zeros(shape, dtype=dtype)


def load(
    path: str | os.PathLike,
    model: nn.Module,
    tasks: Mapping[str, TaskSpec] | Sequence[tuple[str, TaskSpec]],
    **multitask_kwargs: Any,
) -> MultiTaskNetwork:
    """Rebuild the network saved at ``path`` on ``model``'s architecture, with ``tasks``' heads.

    The tree, trunk, granularity, boundary bound, side inputs and capture path (with, for
    ``capture="export"``, an input of the shape it was captured with) come from the checkpoint;
    the backbone's code comes from
    ``model`` (checkpoints hold no code), and its segments must match the saved fingerprints.
    """
    meta = read_metadata(path)
    cfg = meta["config"]
    wrong = [k for k in ("backbone", "trunk", "granularity") if not isinstance(cfg.get(k, ""), str)]
    if wrong:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has corrupt metadata (config field {wrong[0]!r} is a "
            f"{type(cfg[wrong[0]]).__name__}, not a string). Re-save it."
        )
    # checkpoints from before multi-value boundaries were cut at single values only
    bound = cfg.get("max_boundary_values", 1)
    if isinstance(bound, bool) or not isinstance(bound, int):
        raise CheckpointError(
            f"checkpoint {str(path)!r} has corrupt metadata (config field 'max_boundary_values' is a "
            f"{type(bound).__name__}, not an int). Re-save it."
        )
    side_inputs = cfg.get("side_inputs", [])  # files written before side inputs have none
    if not (isinstance(side_inputs, list) and all(isinstance(s, str) for s in side_inputs)):
        raise CheckpointError(
            f"checkpoint {str(path)!r} has corrupt metadata (config field 'side_inputs' is {side_inputs!r}, "
            "not a list of names). Re-save it."
        )
    saved_backbone = cfg.get("backbone")
    if saved_backbone is not None and saved_backbone != type(model).__name__:
        raise CheckpointError(
            f"checkpoint {str(path)!r} was saved from a {saved_backbone} backbone, not {type(model).__name__}. "
            f"Pass a {saved_backbone} model to load()."
        )
    unknown_capture = "capture" not in multitask_kwargs and "capture" not in cfg  # an older file
    if "capture" not in multitask_kwargs:
        multitask_kwargs["capture"] = _saved_capture(cfg, path)
        if multitask_kwargs["capture"] == "export":
            multitask_kwargs.setdefault("example_input", _saved_example(cfg, path))
    saved_granularity = "granularity" not in multitask_kwargs
    try:
        net = multitask(
            model,
            tasks,
            trunk=multitask_kwargs.pop("trunk", cfg.get("trunk")),
            granularity=multitask_kwargs.pop("granularity", cfg.get("granularity", "block")),
            max_boundary_values=multitask_kwargs.pop("max_boundary_values", bound),
            side_inputs=multitask_kwargs.pop("side_inputs", side_inputs),
            sharing="shared",
            **multitask_kwargs,
        )
    except OptionError as exc:
        if not saved_granularity or cfg.get("granularity", "block") in get_args(Granularity):
            raise  # an option the caller passed
        raise CheckpointError(f"checkpoint {str(path)!r} has corrupt metadata ({exc}). Re-save it.") from exc
    except TraceError as exc:
        if not unknown_capture:
            raise
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not record how its backbone was captured (it was written before that "
            f"was saved), and torch.fx cannot trace {type(model).__name__}. Fix: if it was built with "
            "capture='export', pass capture='export' and example_input=<a batch of the shape it was built with>."
        ) from exc
    except TrunkError as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r} ends its trunk at node {cfg.get('trunk')!r}, which this "
            f"{type(model).__name__} backbone does not have: it was saved from another backbone. "
            "Pass the model the checkpoint was saved from."
        ) from exc
    if set(meta["tree"].tasks) != set(net.tasks):
        raise CheckpointError(
            f"checkpoint {str(path)!r} was saved for tasks {list(meta['tree'].tasks)}, not {list(net.tasks)}. "
            "Pass the same task names."
        )
    if meta["tree"].depth != net.depth:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has {meta['tree'].depth} segments; this backbone gives {net.depth}. "
            "Load it with the same model, trunk=, granularity= and capture= (older files do not record capture=)."
        )
    lay_out(net, meta["tree"], path)
    load_weights(net, path, meta)
    return net
