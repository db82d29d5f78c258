"""The trainer's checkpoint folder: each checkpoint one atomic unit, nothing on disk that runs code.

A run folder someone hands you is input, so resuming from it must not execute anything:
tensors are stored as safetensors, everything else as JSON (`encode` turns the optimizer,
schedule, scaler and RNG states into both, exactly). Nothing is unpickled.

A checkpoint is a version folder written whole before it counts::

    checkpoint_dir/
      LATEST                  the name of the current version ("v000012")
      v000012/
        model.safetensors     the network (`graphsurgeon.core.checkpoint`)
        optimizer.safetensors the tensors of the optimizer, schedule and RNG states
        state.json            the trainer's position, history, method state; the rest of those states
        manifest.json         every file's size and SHA-256
      best.safetensors, metrics.csv, tensorboard/   (written by the trainer, outside the versions)

`save` writes the files into a fresh ``.tmp-*`` folder (``mkdtemp``: a new name no one else
can have prepared; each file opened with ``O_EXCL | O_NOFOLLOW``, so a planted symlink is
never written through), fsyncs them and the folder, renames the folder to the next version,
and then replaces ``LATEST`` (itself written to a ``mkstemp`` temporary) in one
``os.replace``. Until that replace the previous version is the checkpoint, whatever fails or
is killed; older versions are removed only after it, and temporaries a killed run left behind
are removed by the next `save`. `load` checks the manifest (every file's size and hash)
before using any file, so a truncated, corrupted or swapped file is a `CheckpointError` naming
it, never a crash or a silently mismatched pair of model and optimizer.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from graphsurgeon.core.checkpoint import contents, read_metadata
from graphsurgeon.core.network import MultiTaskNetwork
from graphsurgeon.errors import CheckpointError

__all__ = ["Checkpoint", "decode", "encode", "latest", "load", "read_state", "save"]

FORMAT = "graphsurgeon-run/1"
POINTER = "LATEST"
MODEL, OPTIMIZER, STATE, MANIFEST = "model.safetensors", "optimizer.safetensors", "state.json", "manifest.json"
FILES = (MODEL, OPTIMIZER, STATE)
_VERSION = re.compile(r"v(\d{6,})")
_TMP = ".tmp-"  # version folders being written
_POINTER_TMP = ".LATEST-"  # LATEST being written
# what a checkpoint folder of graphsurgeon before versioned checkpoints held
_OLD_FILES = ("optimizer.pt", "model.safetensors")


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint: its folder, the trainer state and the states `encode` stored."""

    folder: Path
    state: dict[str, Any]
    restore: dict[str, Any]

    @property
    def model(self) -> Path:
        """The network's file (verified against the manifest, loaded by path with
        `graphsurgeon.core.checkpoint.load_weights`)."""
        return self.folder / MODEL


# ---------------------------------------------------------------------------------- JSON + tensors
def encode(value: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """``value`` as JSON, its tensors moved into ``tensors`` (keyed by where they were).

    Exact for what training state holds: tensors (any dtype), tuples (python's RNG state, Adam's
    betas), dicts with non-string keys (an optimizer's per-parameter state), ``Counter`` (a
    MultiStep schedule's milestones), numpy arrays and scalars (numpy's RNG state) and JSON's
    own types; anything else is refused rather than stored approximately."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous().clone()  # clone: safetensors refuses shared storage
        return {"__tensor__": path}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": value.dtype.str}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        if isinstance(value, collections.Counter) or not all(isinstance(k, str) and not k.startswith("__") for k in value):
            pairs = [[encode(k, tensors, f"{path}.{k}#key"), encode(v, tensors, f"{path}.{k}")] for k, v in value.items()]
            return {"__dict__": pairs, "counter": isinstance(value, collections.Counter)}
        return {k: encode(v, tensors, f"{path}.{k}") for k, v in value.items()}
    raise CheckpointError(
        f"cannot checkpoint {type(value).__name__} at {path.lstrip('.')!r} without pickle: training state must be "
        "tensors, numbers, strings, lists, tuples or dicts of them. Return such values from the state_dict() that holds it."
    )


def decode(value: Any, tensors: Mapping[str, torch.Tensor], where: str) -> Any:
    """What `encode` turned into ``value``; a malformed value is a `CheckpointError` naming ``where``."""

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{where} is corrupt ({why}). Start a fresh run, or resume from an intact copy.")

    def walk(v: Any) -> Any:
        if isinstance(v, list):
            return [walk(x) for x in v]
        if not isinstance(v, dict):
            return v
        if "__tensor__" in v:
            if not isinstance(v["__tensor__"], str) or v["__tensor__"] not in tensors:
                raise bad(f"tensor {v['__tensor__']!r} is missing")
            return tensors[v["__tensor__"]]
        if "__tuple__" in v:
            if not isinstance(v["__tuple__"], list):
                raise bad("a tuple is not a list")
            return tuple(walk(x) for x in v["__tuple__"])
        if "__ndarray__" in v:
            try:
                return np.asarray(v["__ndarray__"], dtype=np.dtype(v["dtype"]))
            except (KeyError, TypeError, ValueError) as exc:
                raise bad(f"an array does not decode: {exc}") from None
        if "__dict__" in v:
            pairs = v["__dict__"]
            if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
                raise bad("a dict is not a list of pairs")
            try:
                items = {walk(k): walk(x) for k, x in pairs}
            except TypeError as exc:  # an unhashable key
                raise bad(f"a dict key does not decode: {exc}") from None
            return collections.Counter(items) if v.get("counter") else items
        return {k: walk(x) for k, x in v.items()}

    try:
        return walk(value)
    except RecursionError:
        raise bad("it nests too deeply") from None


# ---------------------------------------------------------------------------------- writing
def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` (``os.write`` may write less than asked)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _create(path: Path, data: bytes) -> None:
    """Create ``path`` with ``data``, on disk when this returns. ``O_EXCL | O_NOFOLLOW``: fails
    on anything already there (a planted symlink included) instead of writing through it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make the entries of folder ``path`` (new files, renames) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _versions(folder: Path) -> list[Path]:
    """The version folders in ``folder`` (real folders only: a symlink is never a version)."""
    with os.scandir(folder) as entries:
        return sorted(Path(e.path) for e in entries if _VERSION.fullmatch(e.name) and e.is_dir(follow_symlinks=False))


def _remove(path: Path) -> None:
    """Remove a file, a symlink (not what it points to) or a folder tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove_orphans(folder: Path) -> None:
    """Temporaries of a save that was killed, and versions it wrote but never pointed to."""
    current = _pointed(folder)
    with os.scandir(folder) as entries:
        names = [e.name for e in entries]
    for name in names:
        if name.startswith((_TMP, _POINTER_TMP)) or (_VERSION.fullmatch(name) and name != current):
            _remove(folder / name)


def save(folder: str | os.PathLike, net: MultiTaskNetwork, state: Mapping[str, Any], restore: Mapping[str, Any]) -> Path:
    """Write a checkpoint of ``net``, the trainer ``state`` (JSON-able) and ``restore`` (states
    `encode` takes) as the next version in ``folder``; its path. See the module's docstring for
    why each step is there. On failure the previous checkpoint stays the current one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _remove_orphans(folder)
    tensors: dict[str, torch.Tensor] = {}
    document = {"format": FORMAT, "trainer": dict(state), "restore": encode(dict(restore), tensors)}
    model_tensors, model_metadata = contents(net)
    files = {
        MODEL: save_tensors(model_tensors, metadata=model_metadata),
        OPTIMIZER: save_tensors(tensors),
        STATE: json.dumps(document, sort_keys=True).encode(),
    }
    manifest = {"format": FORMAT, "files": {n: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in files.items()}}
    files[MANIFEST] = json.dumps(manifest, sort_keys=True, indent=1).encode()
    numbers = [int(_VERSION.fullmatch(p.name).group(1)) for p in _versions(folder)]
    version = folder / f"v{max(numbers, default=0) + 1:06d}"
    staging = Path(tempfile.mkdtemp(prefix=_TMP, dir=folder))
    try:
        for name, data in files.items():
            _create(staging / name, data)
        _fsync_dir(staging)
        os.rename(staging, version)  # a fresh name: no version of that number exists
        _fsync_dir(folder)
        _point(folder, version.name)
    except OSError as exc:
        _remove(staging)
        if version.is_dir() and not version.is_symlink() and _pointed(folder) != version.name:
            _remove(version)  # renamed into place, but LATEST still names the previous checkpoint
        raise CheckpointError(
            f"could not write the checkpoint in {str(folder)!r} ({exc.strerror or exc}); the previous checkpoint "
            f"({_pointed(folder) or 'none'}) is kept. Free space or fix the folder's permissions, then resume."
        ) from exc
    for old in _versions(folder):  # only now that the new version is the checkpoint
        if old != version:
            _remove(old)
    return version


def _point(folder: Path, name: str) -> None:
    """Make ``name`` the current version in one ``os.replace`` of ``LATEST`` (which replaces a
    symlink there rather than writing through it)."""
    fd, tmp = tempfile.mkstemp(prefix=_POINTER_TMP, dir=folder)
    try:
        try:
            _write_all(fd, f"{name}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, folder / POINTER)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(folder)


# ---------------------------------------------------------------------------------- reading
def _pointed(folder: Path) -> str | None:
    """The version ``LATEST`` names; ``None`` when there is no ``LATEST``."""
    pointer = folder / POINTER
    if not os.path.lexists(pointer):
        return None
    try:
        name = _read(pointer, limit=64).decode("ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{str(pointer)!r} cannot be read ({exc}). Start a fresh run (--overwrite).") from exc
    if not _VERSION.fullmatch(name):
        raise CheckpointError(f"{str(pointer)!r} names {name[:40]!r}, not a checkpoint version like 'v000001'. Start a fresh run (--overwrite).")
    return name


def _read(path: Path, limit: int) -> bytes:
    """The bytes of regular file ``path`` (a symlink is refused), at most ``limit + 1`` of them."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read(limit + 1)
    finally:
        os.close(fd)


def latest(folder: str | os.PathLike) -> Path | None:
    """The current checkpoint's version folder in ``folder``; ``None`` when it holds none.

    A folder of the format before versioned checkpoints is refused (its ``optimizer.pt`` is a
    pickle, which is never loaded)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    name = _pointed(folder)
    if name is None:
        if (folder / "model.safetensors").is_file() and not (folder / "optimizer.pt").exists():
            if "trainer" not in read_metadata(folder / "model.safetensors")["extra"]:
                raise CheckpointError(
                    f"{str(folder / 'model.safetensors')!r} is a network saved with gs.save, not a training checkpoint "
                    "(it holds no trainer state); load it with gs.load, or resume from the checkpoint folder a Trainer wrote."
                )
        old = [n for n in _OLD_FILES if (folder / n).exists()]
        if old:
            raise CheckpointError(
                f"{str(folder / old[0])!r} is a checkpoint of an older graphsurgeon, which this version does not load "
                "(its optimizer.pt is a pickle, which could run code). Start a fresh run (--overwrite, or another folder)."
            )
        return None
    return folder / name


def _verified(version: Path) -> dict[str, bytes]:
    """The bytes of the optimizer and state files; every file (the model too, which loads from
    its path) checked against the manifest first."""
    where = str(version / MANIFEST)
    try:
        manifest = json.loads(_read(version / MANIFEST, limit=1 << 20))
    except FileNotFoundError:
        raise CheckpointError(f"{where!r} is missing: {str(version)!r} is not a complete checkpoint. Start a fresh run.") from None
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{where!r} cannot be read ({exc}). Start a fresh run, or resume from an intact copy.") from None
    entries = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(entries, dict) or set(entries) != set(FILES):
        raise CheckpointError(f"{where!r} is not a {FORMAT} manifest of {list(FILES)}. Start a fresh run, or resume from an intact copy.")
    data = {}
    for name in FILES:
        entry = entries[name]
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)):
            raise CheckpointError(f"{where!r}: the entry of {name} is malformed. Start a fresh run, or resume from an intact copy.")
        content = _check(version / name, entry["size"], entry["sha256"], keep=name != MODEL)
        if content is not None:
            data[name] = content
    return data


def _check(path: Path, size: int, sha256: str, keep: bool) -> bytes | None:
    """Check file ``path`` has ``size`` bytes of hash ``sha256`` (read in chunks); its bytes when ``keep``."""
    digest, chunks, total = hashlib.sha256(), [], 0
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as handle:
            while total <= size and (chunk := handle.read(min(1 << 24, size + 1 - total))):
                digest.update(chunk)
                total += len(chunk)
                if keep:
                    chunks.append(chunk)
    except OSError as exc:
        raise CheckpointError(f"checkpoint file {str(path)!r} cannot be read ({exc.strerror or exc}). Resume from an intact copy.") from exc
    if total != size:
        raise CheckpointError(
            f"checkpoint file {str(path)!r} has {'more than ' if total > size else ''}{total} bytes, its manifest says "
            f"{size}: it was truncated or replaced. Resume from an intact copy or start a fresh run."
        )
    if digest.hexdigest() != sha256:
        raise CheckpointError(
            f"checkpoint file {str(path)!r} does not match the SHA-256 in its manifest: it is corrupt or from another "
            "checkpoint. Resume from an intact copy or start a fresh run."
        )
    return b"".join(chunks) if keep else None


def load(folder: str | os.PathLike) -> Checkpoint | None:
    """The current checkpoint in ``folder``, verified; ``None`` when there is none."""
    version = latest(folder)
    if version is None:
        return None
    if version.is_symlink() or not version.is_dir():  # a version is a folder save made, never a link elsewhere
        raise CheckpointError(f"{str(Path(folder) / POINTER)!r} names {version.name}, which is not a checkpoint folder. Start a fresh run.")
    data = _verified(version)
    try:
        tensors = load_tensors(data[OPTIMIZER])
    except (SafetensorError, ValueError) as exc:
        raise CheckpointError(f"checkpoint file {str(version / OPTIMIZER)!r} is not a safetensors file ({exc}). Start a fresh run.") from exc
    where = str(version / STATE)
    try:
        document = json.loads(data[STATE])
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"checkpoint file {where!r} is not JSON ({type(exc).__name__}). Start a fresh run.") from None
    if not (isinstance(document, dict) and document.get("format") == FORMAT
            and isinstance(document.get("trainer"), dict) and isinstance(document.get("restore"), dict)):
        raise CheckpointError(f"checkpoint file {where!r} is not a {FORMAT} trainer state. Start a fresh run.")
    return Checkpoint(version, document["trainer"], decode(document["restore"], tensors, where))


def read_state(folder: str | os.PathLike) -> dict[str, Any]:
    """The trainer state (epoch, step, history, ...) of the current checkpoint in ``folder``."""
    checkpoint = load(folder)
    if checkpoint is None:
        raise CheckpointError(f"{str(folder)!r} holds no checkpoint ({POINTER} is missing). Train with checkpoint_dir set first.")
    return checkpoint.state

