"""The task tree: which tasks share which copy of each segment.

Depth 0 is the input; depth ``l`` (1..L) holds copies of segment ``l``. Every task has exactly
one node per depth (its path), a node's tasks are a subset of its parent's, and siblings
partition their parent's tasks. Hard sharing is one node per depth; MTSL starts with one node
per task per depth; TAG's branched networks lie in between.

The tree is pure data (no tensors) so that it can be logged, diffed, hashed, saved as JSON and
broadcast between processes. Edits return a new tree and an ``origin`` map from each new node
id to the old node ids it derives from: the network uses that map to decide which weights each
new node starts from (reuse, copy, or a group initialised from several members).
"""
from __future__ import annotations

import json
import keyword
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from torch import nn

from graphsurgeon.errors import InvariantError, TaskSpecError, TreeEditError

__all__ = ["Origin", "TaskTree", "TreeNode"]

_MODULE_DICT = nn.ModuleDict()

Origin = dict[int, tuple[int, ...]]


@dataclass(frozen=True, order=True)
class TreeNode:
    """A copy of segment ``depth`` used by ``tasks``; ``parent`` is ``None`` only at depth 0."""

    id: int
    depth: int
    parent: int | None
    tasks: tuple[str, ...]

    @property
    def name(self) -> str:
        """The module key of this node in a network (``n7``)."""
        return f"n{self.id}"


@dataclass(frozen=True)
class TaskTree:
    """An immutable task tree over ``tasks`` with ``depth`` segment levels.

    Build one with `separate`, `shared`, `from_partitions` or `branched`; edit it with
    `merge`, `split` and `replicate`.
    """

    tasks: tuple[str, ...]
    depth: int
    nodes: tuple[TreeNode, ...] = field(repr=False)

    # ------------------------------------------------------------------ constructors
    @staticmethod
    def _check_tasks(tasks: Iterable[str]) -> tuple[str, ...]:
        tasks = tuple(tasks)
        if not tasks:
            raise TaskSpecError("a task tree needs at least one task. Pass e.g. tasks=['left', 'right'].")
        seen: set[str] = set()
        for t in tasks:
            if not isinstance(t, str) or not t:
                raise TaskSpecError(f"task names must be non-empty strings, got {t!r}. Rename the task.")
            if "." in t:
                raise TaskSpecError(f"task name {t!r} contains '.', which module names cannot. Rename the task.")
            # names become module attributes and code in exported graphs (self.heads.<name>)
            if not (t.isascii() and t.isidentifier()) or keyword.iskeyword(t) or hasattr(_MODULE_DICT, t):
                raise TaskSpecError(
                    f"task name {t!r} cannot name a module: use an ASCII Python identifier that is not a "
                    "keyword nor an nn.ModuleDict attribute (e.g. 'depth', 'seg_left'). Rename the task."
                )
            if t in seen:
                raise TaskSpecError(f"task name {t!r} appears twice. Give every task a unique name.")
            seen.add(t)
        return tasks

    @classmethod
    def from_partitions(cls, tasks: Sequence[str], partitions: Sequence[Sequence[Sequence[str]]]) -> TaskTree:
        """The tree whose depth-``l`` nodes are the blocks of ``partitions[l-1]``.

        A tree is determined by one partition of the tasks per depth, each refining the one
        above; node ids are assigned depth by depth in the order the blocks are given.
        """
        tasks = cls._check_tasks(tasks)
        order = {t: i for i, t in enumerate(tasks)}
        nodes = [TreeNode(0, 0, None, tasks)]
        owner = {t: 0 for t in tasks}
        for depth, partition in enumerate(partitions, start=1):
            new_owner = {}
            for block in partition:
                block = tuple(sorted(block, key=lambda t: order.get(t, len(order))))
                if not block:
                    raise TreeEditError(f"depth {depth} has an empty group. Drop it from the partition.")
                parents = {owner.get(t) for t in block}
                if None in parents:
                    unknown = [t for t in block if t not in owner]
                    raise TaskSpecError(f"depth {depth} names unknown tasks {unknown}. Use only {list(tasks)}.")
                if len(parents) != 1:
                    raise TreeEditError(
                        f"depth {depth} groups {list(block)}, whose tasks have different parents at depth "
                        f"{depth - 1}; each depth's partition must refine the one above it."
                    )
                node = TreeNode(len(nodes), depth, parents.pop(), block)
                nodes.append(node)
                for t in block:
                    if t in new_owner:
                        raise TreeEditError(f"task {t!r} appears twice at depth {depth}. Put it in one group.")
                    new_owner[t] = node.id
            missing = [t for t in tasks if t not in new_owner]
            if missing:
                raise TreeEditError(f"depth {depth} leaves out tasks {missing}. Every task needs a node at each depth.")
            owner = new_owner
        return cls(tasks, len(partitions), tuple(nodes))

    @classmethod
    def separate(cls, tasks: Sequence[str], depth: int) -> TaskTree:
        """One node per task at every depth: independent networks (MTSL's start)."""
        return cls.from_partitions(tasks, [[[t] for t in tasks]] * depth)

    @classmethod
    def shared(cls, tasks: Sequence[str], depth: int) -> TaskTree:
        """One node per depth: hard parameter sharing."""
        return cls.from_partitions(tasks, [[list(tasks)]] * depth)

    @classmethod
    def branched(cls, tasks: Sequence[str], depth: int, groups: Sequence[Sequence[str]], split_at: int = 1) -> TaskTree:
        """Shared up to depth ``split_at - 1``, then one branch per group (TAG's networks)."""
        if not 1 <= split_at <= depth + 1:
            raise TreeEditError(f"split_at={split_at} must lie in 1..{depth + 1}.")
        shared = [[list(tasks)]] * (split_at - 1)
        return cls.from_partitions(tasks, shared + [[list(g) for g in groups]] * (depth - split_at + 1))

    # ------------------------------------------------------------------ queries
    @cached_property
    def _index(self) -> tuple[dict[int, TreeNode], dict[int, tuple[TreeNode, ...]], dict[int | None, tuple[TreeNode, ...]]]:
        """Nodes by id (the first of a repeated id), by depth and by parent, in `nodes` order:
        built once, so that the queries below (and `check` on a checkpoint's tree of thousands
        of nodes) take linear time instead of scanning every node per query."""
        by_id: dict[int, TreeNode] = {}
        by_depth: dict[int, list[TreeNode]] = {}
        by_parent: dict[int | None, list[TreeNode]] = {}
        for n in self.nodes:
            by_id.setdefault(n.id, n)
            by_depth.setdefault(n.depth, []).append(n)
            by_parent.setdefault(n.parent, []).append(n)
        return by_id, {d: tuple(v) for d, v in by_depth.items()}, {p: tuple(v) for p, v in by_parent.items()}

    def node(self, node_id: int) -> TreeNode:
        found = self._index[0].get(node_id)
        if found is None:
            raise TreeEditError(f"node n{node_id} is not in this tree (nodes: {[n.name for n in self.nodes]}).")
        return found

    def at_depth(self, depth: int) -> tuple[TreeNode, ...]:
        return self._index[1].get(depth, ())

    def children(self, node_id: int) -> tuple[TreeNode, ...]:
        return self._index[2].get(node_id, ())

    def path(self, task: str) -> tuple[TreeNode, ...]:
        """The task's node at depths 0..L."""
        if task not in self.tasks:
            raise TaskSpecError(f"unknown task {task!r}; the tree has {list(self.tasks)}.")
        return tuple(next(n for n in self.at_depth(d) if task in n.tasks) for d in range(self.depth + 1))

    def partitions(self) -> tuple[tuple[tuple[str, ...], ...], ...]:
        """The tree's structure without ids: one partition of the tasks per depth 1..L."""
        return tuple(tuple(sorted(n.tasks for n in self.at_depth(d))) for d in range(1, self.depth + 1))

    def same_structure(self, other: TaskTree) -> bool:
        return self.tasks == other.tasks and self.partitions() == other.partitions()

    @property
    def next_id(self) -> int:
        return max(n.id for n in self.nodes) + 1

    def check(self) -> None:
        """Raise `InvariantError` naming the first violated invariant."""
        try:
            self._check_tasks(self.tasks)
        except TaskSpecError as exc:
            raise InvariantError(f"the tree's task list is invalid: {exc}") from exc
        ids = [n.id for n in self.nodes]
        if len(ids) != len(set(ids)):
            raise InvariantError(f"node ids repeat: {sorted(ids)}")
        roots = self.at_depth(0)
        if len(roots) != 1 or roots[0].parent is not None or sorted(roots[0].tasks) != sorted(self.tasks):
            raise InvariantError("depth 0 must be one root node holding every task")
        by_id = {n.id: n for n in self.nodes}
        task_sets = {n.id: set(n.tasks) for n in self.nodes}  # once per node, not once per child
        for n in self.nodes:
            if not 0 <= n.depth <= self.depth:
                raise InvariantError(f"{n.name} has depth {n.depth} outside 0..{self.depth}")
            if n.depth > 0:
                parent = by_id.get(n.parent)
                if parent is None or parent.depth != n.depth - 1:
                    raise InvariantError(f"{n.name} at depth {n.depth} has parent {n.parent} not at depth {n.depth - 1}")
                if not task_sets[n.id] <= task_sets[parent.id]:
                    raise InvariantError(f"{n.name} holds tasks {n.tasks} outside its parent {parent.name} {parent.tasks}")
            if not n.tasks:
                raise InvariantError(f"{n.name} holds no task")
        for d in range(1, self.depth + 1):
            for parent in self.at_depth(d - 1):
                kids = self.children(parent.id)
                held = [t for k in kids for t in k.tasks]
                if sorted(held) != sorted(parent.tasks):
                    raise InvariantError(
                        f"children of {parent.name} hold {sorted(held)}, not a partition of {sorted(parent.tasks)}"
                    )

    # ------------------------------------------------------------------ edits
    def _rebuild(self, partitions: Sequence[Sequence[tuple[str, ...]]], origin_of) -> tuple[TaskTree, Origin]:
        """Build a tree from partitions, reusing ids of nodes that ``origin_of`` maps one to one."""
        order = {t: i for i, t in enumerate(self.tasks)}
        fresh = self.next_id
        nodes = [self.nodes[0] if self.nodes[0].depth == 0 else self.at_depth(0)[0]]
        origin: Origin = {nodes[0].id: (nodes[0].id,)}
        owner = {t: nodes[0].id for t in self.tasks}
        used: set[int] = {nodes[0].id}
        for depth, partition in enumerate(partitions, start=1):
            new_owner = {}
            for block in partition:
                block = tuple(sorted(block, key=order.__getitem__))
                sources = origin_of(depth, block)
                if len(sources) == 1 and sources[0] not in used:
                    node_id = sources[0]
                else:
                    node_id, fresh = fresh, fresh + 1
                used.add(node_id)
                nodes.append(TreeNode(node_id, depth, owner[block[0]], block))
                origin[node_id] = sources
                for t in block:
                    new_owner[t] = node_id
            owner = new_owner
        tree = TaskTree(self.tasks, self.depth, tuple(nodes))
        tree.check()
        return tree, origin

    def merge(self, depth: int, node_ids: Sequence[int]) -> tuple[TaskTree, Origin]:
        """Fuse sibling nodes at ``depth`` into one group node.

        Only siblings may merge: they see the same input, so one copy of the segment can
        replace them. Their children become the group node's children.
        """
        if not 1 <= depth <= self.depth:
            raise TreeEditError(f"cannot merge at depth {depth}; segment depths are 1..{self.depth}.")
        members = [self.node(i) for i in node_ids]
        if len(members) < 2:
            raise TreeEditError(f"merge needs at least two nodes, got {[m.name for m in members]}.")
        if len({m.id for m in members}) != len(members):
            raise TreeEditError(f"merge lists a node twice: {[m.name for m in members]}.")
        wrong = [m.name for m in members if m.depth != depth]
        if wrong:
            raise TreeEditError(f"nodes {wrong} are not at depth {depth}. Pass nodes from tree.at_depth({depth}).")
        parents = {m.parent for m in members}
        if len(parents) != 1:
            desc = ", ".join(f"{m.name} (parent n{m.parent})" for m in members)
            raise TreeEditError(
                f"cannot merge {desc}: they are not siblings, so they see different inputs. "
                "Merge their parents first, or merge only nodes with the same parent."
            )
        group = tuple(t for m in members for t in m.tasks)
        member_ids = tuple(m.id for m in members)
        parts = [[n.tasks for n in self.at_depth(d)] for d in range(1, self.depth + 1)]
        parts[depth - 1] = [n.tasks for n in self.at_depth(depth) if n.id not in member_ids] + [group]

        def origin_of(d: int, block: tuple[str, ...]) -> tuple[int, ...]:
            if d == depth and set(block) == set(group):
                return member_ids
            return (self._node_holding(d, block),)

        return self._rebuild(parts, origin_of)

    def split(self, node_id: int, groups: Sequence[Sequence[str]]) -> tuple[TaskTree, Origin]:
        """Split a node into one node per group; every descendant is split along the same lines.

        Each new node starts as a copy of the node it was split from (``origin``).
        """
        target = self.node(node_id)
        if target.depth == 0:
            raise TreeEditError("the root (depth 0, the input) cannot be split; split a node at depth >= 1.")
        flat = [t for g in groups for t in g]
        if sorted(flat) != sorted(target.tasks) or any(not g for g in groups):
            raise TreeEditError(
                f"groups {[list(g) for g in groups]} must partition {target.name}'s tasks {list(target.tasks)}."
            )
        group_of = {t: i for i, g in enumerate(groups) for t in g}
        parts = []
        for d in range(1, self.depth + 1):
            blocks = []
            for n in self.at_depth(d):
                if d >= target.depth and set(n.tasks) & set(target.tasks):
                    for i in sorted({group_of[t] for t in n.tasks}):
                        blocks.append(tuple(t for t in n.tasks if group_of[t] == i))
                else:
                    blocks.append(n.tasks)
            parts.append(blocks)

        def origin_of(d: int, block: tuple[str, ...]) -> tuple[int, ...]:
            return (self._node_holding(d, block),)

        return self._rebuild(parts, origin_of)

    def replicate(self, depth: int = 1) -> tuple[TaskTree, Origin]:
        """Give every task its own copy of every segment from ``depth`` on."""
        if not 1 <= depth <= self.depth:
            raise TreeEditError(f"replicate depth must lie in 1..{self.depth}, got {depth}.")
        parts = [[n.tasks for n in self.at_depth(d)] for d in range(1, depth)]
        parts += [[(t,) for t in self.tasks]] * (self.depth - depth + 1)

        def origin_of(d: int, block: tuple[str, ...]) -> tuple[int, ...]:
            return (self._node_holding(d, block),)

        return self._rebuild(parts, origin_of)

    def _node_holding(self, depth: int, block: tuple[str, ...]) -> int:
        """Id of the old node at ``depth`` that holds all of ``block`` (its weights carry over)."""
        return next(n.id for n in self.at_depth(depth) if set(block) <= set(n.tasks))

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        return {
            "tasks": list(self.tasks),
            "depth": self.depth,
            "nodes": [{"id": n.id, "depth": n.depth, "parent": n.parent, "tasks": list(n.tasks)} for n in self.nodes],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping) -> TaskTree:
        """The tree `to_dict` described. Every field must have its exact JSON type (a string
        where an int belongs is an error, not converted): the data may come from a file."""

        def need(value: object, kind: type | tuple[type, ...], what: str) -> object:
            if not isinstance(value, kind) or isinstance(value, bool):
                raise InvariantError(
                    f"not a task tree description: {what} is {type(value).__name__} {value!r:.60}; "
                    "expected TaskTree.to_dict() output."
                )
            return value

        def names(value: object, what: str) -> tuple[str, ...]:
            return tuple(need(t, str, f"a task of {what}") for t in need(value, list, what))

        def node(n: object, i: int) -> TreeNode:
            n = need(n, dict, f"nodes[{i}]")
            missing = sorted({"id", "depth", "parent", "tasks"} - set(n))
            if missing:
                raise InvariantError(f"not a task tree description: nodes[{i}] lacks {missing}; expected TaskTree.to_dict() output.")
            parent = None if n["parent"] is None else need(n["parent"], int, f"nodes[{i}].parent")
            return TreeNode(need(n["id"], int, f"nodes[{i}].id"), need(n["depth"], int, f"nodes[{i}].depth"), parent,
                            names(n["tasks"], f"nodes[{i}].tasks"))

        data = need(data, dict, "the tree")
        missing = sorted({"tasks", "depth", "nodes"} - set(data))
        if missing:
            raise InvariantError(f"not a task tree description: it lacks {missing}; expected TaskTree.to_dict() output.")
        nodes = tuple(node(n, i) for i, n in enumerate(need(data["nodes"], list, "nodes")))
        tree = cls(names(data["tasks"], "tasks"), need(data["depth"], int, "depth"), nodes)
        tree.check()
        return tree

    @classmethod
    def from_json(cls, text: str) -> TaskTree:
        try:
            data = json.loads(text)
        except RecursionError:
            raise InvariantError("task tree JSON nests too deeply to be a task tree. Was it written by TaskTree.to_json()?") from None
        except json.JSONDecodeError as exc:
            raise InvariantError(f"task tree JSON does not parse: {exc}. Was it written by TaskTree.to_json()?") from exc
        return cls.from_dict(data)

    def __str__(self) -> str:
        lines = [f"TaskTree({len(self.tasks)} tasks, depth {self.depth}, {len(self.nodes) - 1} segment copies)"]

        stack = [(self.at_depth(0)[0], "", True)]  # depth-first without recursion: trees may be deep
        while stack:
            node, prefix, last = stack.pop()
            lines.append(prefix + ("└─ " if last else "├─ ") + f"{node.name} d{node.depth} {{{', '.join(node.tasks)}}}")
            kids = self.children(node.id)
            stack.extend((k, prefix + ("   " if last else "│  "), i == len(kids) - 1) for i, k in reversed(list(enumerate(kids))))
        return "\n".join(lines)
