"""The task tree as pure data: invariants under random edits, origin maps, serialisation, bad input.

Trees and edit sequences are drawn by `strategies` (random refining partitions per depth;
merges of random sibling sets, splits into random partitions, replicates), with task names
ranging over any string the tree accepts, not only identifiers.
"""
from __future__ import annotations

import json
import re

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from strategies import Merge, apply_edits, edit_sequences, examples, partitions_of, sibling_sets, task_lists, trees

from graphsurgeon import InvariantError, TaskSpecError, TaskTree, TreeEditError

TREES = settings(max_examples=examples(30), deadline=None)


def assert_tree_invariants(tree: TaskTree) -> None:
    """The tree's promises, checked independently of `TaskTree.check`."""
    tree.check()
    assert len({n.id for n in tree.nodes}) == len(tree.nodes)
    (root,) = tree.at_depth(0)
    assert root.parent is None and sorted(root.tasks) == sorted(tree.tasks)
    by_id = {n.id: n for n in tree.nodes}
    for d in range(1, tree.depth + 1):
        level = tree.at_depth(d)
        held = [t for n in level for t in n.tasks]
        assert sorted(held) == sorted(tree.tasks), f"depth {d} does not hold every task exactly once"
        for n in level:
            assert n.tasks, f"{n.name} is empty"
            parent = by_id[n.parent]
            assert parent.depth == d - 1 and set(n.tasks) <= set(parent.tasks)
    for t in tree.tasks:
        path = tree.path(t)
        assert [n.depth for n in path] == list(range(tree.depth + 1))
        assert all(t in n.tasks for n in path)
        assert all(child.parent == parent.id for parent, child in zip(path, path[1:]))
        # exactly one node per depth holds the task
        for d in range(tree.depth + 1):
            assert sum(t in n.tasks for n in tree.at_depth(d)) == 1


# ---------------------------------------------------------------------------------- construction
@TREES
@given(trees(safe=False, min_depth=0))
def test_random_trees_satisfy_every_invariant(tree: TaskTree) -> None:
    assert_tree_invariants(tree)


@TREES
@given(task_lists(1, 5, safe=False), st.integers(0, 4))
def test_separate_and_shared_have_one_node_per_task_or_per_depth(tasks: list[str], depth: int) -> None:
    sep, sh = TaskTree.separate(tasks, depth), TaskTree.shared(tasks, depth)
    assert_tree_invariants(sep)
    assert_tree_invariants(sh)
    for d in range(1, depth + 1):
        assert sorted(n.tasks for n in sep.at_depth(d)) == sorted((t,) for t in tasks)
        assert [n.tasks for n in sh.at_depth(d)] == [tuple(tasks)]
    assert len(sep.nodes) == 1 + depth * len(tasks) and len(sh.nodes) == 1 + depth


def test_branched_shares_up_to_split_at_then_one_branch_per_group() -> None:
    tree = TaskTree.branched(["a", "b", "c"], 4, [["a", "c"], ["b"]], split_at=3)
    assert_tree_invariants(tree)
    assert tree.partitions() == (
        (("a", "b", "c"),),
        (("a", "b", "c"),),
        (("a", "c"), ("b",)),
        (("a", "c"), ("b",)),
    )
    with pytest.raises(TreeEditError, match="split_at"):
        TaskTree.branched(["a", "b"], 2, [["a"], ["b"]], split_at=4)


# ---------------------------------------------------------------------------------- serialisation
@TREES
@given(st.data())
def test_json_round_trip_gives_an_equal_tree_also_after_edits(data: st.DataObject) -> None:
    tree = data.draw(trees(safe=False))
    edited = tree
    for edit in data.draw(edit_sequences(tree, min_size=0, max_size=3)):
        edited, _ = edit.apply(edited)
    for t in (tree, edited):
        text = t.to_json()
        json.loads(text)  # plain JSON
        back = TaskTree.from_json(text)
        assert back == t and hash(back) == hash(t)
        assert [n.id for n in back.nodes] == [n.id for n in t.nodes]
        assert TaskTree.from_dict(t.to_dict()) == t
        assert back.to_json() == text


@TREES
@given(trees(safe=False))
def test_trees_are_hashable_values(tree: TaskTree) -> None:
    twin = TaskTree.from_partitions(tree.tasks, [[n.tasks for n in tree.at_depth(d)] for d in range(1, tree.depth + 1)])
    assert twin == tree and twin is not tree
    assert hash(twin) == hash(tree)
    assert len({tree, twin}) == 1
    assert {tree: 1}[twin] == 1
    with pytest.raises(AttributeError):
        tree.depth = tree.depth + 1  # frozen


def test_same_structure_ignores_ids_but_equality_does_not() -> None:
    a = TaskTree.from_partitions(["x", "y", "z"], [[["x"], ["y", "z"]], [["x"], ["y"], ["z"]]])
    b = TaskTree.from_partitions(["x", "y", "z"], [[["y", "z"], ["x"]], [["z"], ["y"], ["x"]]])
    assert a.same_structure(b) and a.partitions() == b.partitions()
    assert a != b
    assert a.node(1).tasks == ("x",) and b.node(1).tasks == ("y", "z")
    c = TaskTree.shared(["x", "y", "z"], 2)
    assert not a.same_structure(c)


@pytest.mark.parametrize(
    "text, match",
    [
        ("{not json", "does not parse"),
        ("[1, 2]", "not a task tree description"),
        ('{"tasks": ["a"], "depth": 1}', "not a task tree description"),
        ('{"tasks": ["a"], "depth": 1, "nodes": [{"id": 0}]}', "not a task tree description"),
    ],
)
def test_from_json_rejects_text_that_is_not_a_tree(text: str, match: str) -> None:
    with pytest.raises(InvariantError, match=match):
        TaskTree.from_json(text)


def _node(i, d, p, tasks):
    return {"id": i, "depth": d, "parent": p, "tasks": tasks}


@pytest.mark.parametrize(
    "nodes, match",
    [
        ([_node(0, 0, None, ["a", "b"]), _node(1, 1, 0, ["a"])], "not a partition"),
        ([_node(0, 0, None, ["a", "b"]), _node(1, 1, 0, ["a", "b"]), _node(1, 1, 0, ["a", "b"])], "ids repeat"),
        ([_node(0, 0, None, ["a", "b"]), _node(1, 1, 0, ["a", "b", "c"])], "outside its parent"),
        ([_node(0, 0, None, ["a", "b"]), _node(1, 1, 5, ["a", "b"])], "parent"),
        ([_node(0, 0, None, ["a", "b"]), _node(1, 2, 0, ["a", "b"])], "depth"),
        ([_node(0, 0, None, ["a", "b"]), _node(1, 1, 0, ["a", "b"]), _node(2, 1, 0, [])], "n2 holds no task"),
        ([_node(0, 0, None, ["a"]), _node(1, 0, None, ["b"]), _node(2, 1, 0, ["a", "b"])], "one root"),
    ],
)
def test_from_dict_rejects_descriptions_that_break_an_invariant(nodes, match) -> None:
    with pytest.raises(InvariantError, match=match):
        TaskTree.from_dict({"tasks": ["a", "b"], "depth": 1, "nodes": nodes})


@pytest.mark.parametrize(
    "data",
    [
        {
            "tasks": ["a", "a"],
            "depth": 1,
            "nodes": [_node(0, 0, None, ["a", "a"]), _node(1, 1, 0, ["a"]), _node(2, 1, 0, ["a"])],
        },
        {
            "tasks": ["a", "b"],
            "depth": 1,
            "nodes": [_node(0, 0, None, ["a", "b", "a"]), _node(1, 1, 0, ["a"]), _node(2, 1, 0, ["a", "b"])],
        },
    ],
    ids=["duplicate-task-names", "task-twice-at-one-depth"],
)
def test_from_dict_rejects_a_task_held_twice(data) -> None:
    with pytest.raises((InvariantError, TaskSpecError)):
        TaskTree.from_dict(data)


# ---------------------------------------------------------------------------------- edits
@TREES
@given(st.data())
def test_every_edit_sequence_keeps_the_tree_invariants(data: st.DataObject) -> None:
    tree = data.draw(trees(safe=False))
    sequence = data.draw(edit_sequences(tree, max_size=5))
    before = tree
    for _edit, after, origin in apply_edits(tree, sequence):
        assert_tree_invariants(after)
        assert after.tasks == before.tasks and after.depth == before.depth
        assert set(origin) == {n.id for n in after.nodes}
        before = after


@TREES
@given(st.data())
def test_origin_of_any_edit_is_consistent_with_the_old_tree(data: st.DataObject) -> None:
    """Reused ids keep their depth and map to themselves; fresh ids never recycle an old id."""
    tree = data.draw(trees(safe=False))
    for _edit, after, origin in apply_edits(tree, data.draw(edit_sequences(tree, max_size=4))):
        old = {n.id: n for n in tree.nodes}
        for n in after.nodes:
            sources = origin[n.id]
            assert sources and all(s in old for s in sources)
            assert all(old[s].depth == n.depth for s in sources)
            assert set(n.tasks) <= {t for s in sources for t in old[s].tasks}
            if n.id in old:
                assert sources == (n.id,), f"{n.name} kept its id but derives from {sources}"
                assert set(n.tasks) <= set(old[n.id].tasks)
            else:
                assert n.id > max(old), f"fresh id {n.id} is not above the old ids {sorted(old)}"
        tree = after


@TREES
@given(st.data())
def test_merge_origin_maps_the_group_to_its_members_and_keeps_other_ids(data: st.DataObject) -> None:
    tree = data.draw(trees(min_tasks=2, min_depth=1))
    siblings = sibling_sets(tree)
    assume(siblings)
    depth, kids = data.draw(st.sampled_from(siblings))
    edit = Merge(depth, tuple(data.draw(st.lists(st.sampled_from(kids), min_size=2, unique=True))))
    after, origin = tree.merge(edit.depth, edit.node_ids)
    members = [tree.node(i) for i in edit.node_ids]
    (group,) = [n for n in after.nodes if n.id not in {m.id for m in tree.nodes}]
    assert origin[group.id] == edit.node_ids
    assert group.depth == edit.depth and group.parent == members[0].parent
    assert set(group.tasks) == {t for m in members for t in m.tasks}
    assert not {m.id for m in members} & {n.id for n in after.nodes}
    for n in tree.nodes:
        if n.id in edit.node_ids:
            continue
        kept = after.node(n.id)
        assert origin[n.id] == (n.id,)
        assert (kept.depth, kept.tasks) == (n.depth, n.tasks)
        if n.parent in edit.node_ids:
            assert kept.parent == group.id  # the members' children now hang under the group
        else:
            assert kept.parent == n.parent
    assert len(after.nodes) == len(tree.nodes) - len(members) + 1


@TREES
@given(st.data())
def test_split_origin_maps_every_piece_to_the_node_it_was_cut_from(data: st.DataObject) -> None:
    tree = data.draw(trees(min_depth=1))
    target = data.draw(st.sampled_from([n for n in tree.nodes if n.depth >= 1]))
    groups = data.draw(partitions_of(target.tasks))
    after, origin = tree.split(target.id, groups)
    group_of = {t: i for i, g in enumerate(groups) for t in g}
    for old in tree.nodes:
        pieces = [n for n in after.nodes if n.depth == old.depth and set(n.tasks) & set(old.tasks)]
        if old.depth >= target.depth and set(old.tasks) <= set(target.tasks):
            # the target and its descendants: one piece per group they hold, each from `old`
            assert sorted(p.tasks for p in pieces) == sorted(
                tuple(t for t in old.tasks if group_of[t] == i) for i in {group_of[t] for t in old.tasks}
            )
            assert all(origin[p.id] == (old.id,) for p in pieces)
            assert sum(p.id == old.id for p in pieces) == 1  # one piece keeps the id
        else:
            (same,) = pieces
            assert same.id == old.id and same.tasks == old.tasks and origin[old.id] == (old.id,)
    assert len(after.at_depth(target.depth)) == len(tree.at_depth(target.depth)) + len(groups) - 1


@TREES
@given(st.data())
def test_replicate_gives_every_task_its_own_copy_from_that_depth(data: st.DataObject) -> None:
    tree = data.draw(trees(min_depth=1))
    depth = data.draw(st.integers(1, tree.depth))
    after, origin = tree.replicate(depth)
    for d in range(1, tree.depth + 1):
        if d < depth:
            assert after.at_depth(d) == tree.at_depth(d)
        else:
            assert sorted(n.tasks for n in after.at_depth(d)) == sorted((t,) for t in tree.tasks)
            for n in after.at_depth(d):
                (source,) = origin[n.id]
                assert n.tasks[0] in tree.node(source).tasks and tree.node(source).depth == d
    again, _ = after.replicate(depth)
    assert again == after  # idempotent


def _non_siblings(tree: TaskTree) -> list[tuple[int, int, int]]:
    return [
        (a.depth, a.id, b.id)
        for a in tree.nodes
        for b in tree.nodes
        if a.depth == b.depth >= 1 and a.id < b.id and a.parent != b.parent
    ]


@TREES
@given(st.data())
def test_merging_non_siblings_raises_an_error_naming_them_and_the_fix(data: st.DataObject) -> None:
    tree = data.draw(trees(min_tasks=2, min_depth=2))
    pairs = _non_siblings(tree)
    assume(pairs)
    depth, a, b = data.draw(st.sampled_from(pairs))
    with pytest.raises(TreeEditError) as info:
        tree.merge(depth, [a, b])
    msg = str(info.value)
    assert f"n{a} " in msg and f"n{b} " in msg
    assert "not siblings" in msg
    assert re.search(r"merge their parents first", msg, re.IGNORECASE)


@pytest.mark.parametrize(
    "depth, ids, match",
    [
        (0, [1, 2], "depth 0"),
        (3, [1, 2], "depth 3"),
        (1, [1], "at least two"),
        (1, [1, 1], "twice"),
        (1, [1, 99], "n99 is not in this tree"),
        (1, [1, 3], r"nodes \['n3'\] are not at depth 1"),
    ],
)
def test_merge_rejects_bad_node_lists(depth, ids, match) -> None:
    tree = TaskTree.separate(["a", "b"], 2)  # n1, n2 at depth 1; n3, n4 at depth 2
    with pytest.raises(TreeEditError, match=match):
        tree.merge(depth, ids)


@pytest.mark.parametrize(
    "groups",
    [
        [["a", "b"]],  # leaves out c
        [["a", "b"], ["c", "d"]],  # d is not the node's
        [["a", "b"], ["b", "c"]],  # b twice
        [["a", "b", "c"], []],  # an empty group
        [["a"], ["b"], ["c"], ["c"]],
    ],
)
def test_split_with_groups_that_do_not_partition_the_node_raises(groups) -> None:
    tree = TaskTree.shared(["a", "b", "c", "d"], 2).split(1, [["a", "b", "c"], ["d"]])[0]
    node = next(n for n in tree.at_depth(1) if n.tasks == ("a", "b", "c"))
    with pytest.raises(TreeEditError, match=f"must partition {node.name}'s tasks"):
        tree.split(node.id, groups)


def test_split_rejects_the_root_and_unknown_nodes() -> None:
    tree = TaskTree.shared(["a", "b"], 1)
    with pytest.raises(TreeEditError, match="root"):
        tree.split(0, [["a"], ["b"]])
    with pytest.raises(TreeEditError, match="n7 is not in this tree"):
        tree.split(7, [["a"], ["b"]])


@pytest.mark.parametrize("depth", [0, 3, -1])
def test_replicate_rejects_depths_outside_the_segments(depth: int) -> None:
    with pytest.raises(TreeEditError, match="1..2"):
        TaskTree.shared(["a", "b"], 2).replicate(depth)


def test_edits_leave_the_original_tree_untouched() -> None:
    tree = TaskTree.separate(["a", "b", "c"], 2)
    text = tree.to_json()
    tree.merge(1, [1, 2])
    tree.split(1, [["a"]])
    tree.replicate(1)
    assert tree.to_json() == text


# ---------------------------------------------------------------------------------- rendering
@TREES
@given(st.data())
def test_str_renders_every_node_once_with_its_depth_and_tasks(data: st.DataObject) -> None:
    tree = data.draw(trees())
    for _, edited, _ in apply_edits(tree, data.draw(edit_sequences(tree, min_size=0, max_size=3))):
        tree = edited
    lines = str(tree).splitlines()
    assert lines[0].startswith(f"TaskTree({len(tree.tasks)} tasks, depth {tree.depth}, {len(tree.nodes) - 1} ")
    assert len(lines) == 1 + len(tree.nodes)
    for n in tree.nodes:
        label = f"{n.name} d{n.depth} {{{', '.join(n.tasks)}}}"
        assert sum(line.endswith(label) for line in lines[1:]) == 1, label
    # children are drawn below and indented deeper than their parent
    row = {n.id: next(i for i, line in enumerate(lines) if line.endswith(f"{n.name} d{n.depth} {{{', '.join(n.tasks)}}}")) for n in tree.nodes}
    for n in tree.nodes:
        if n.parent is not None:
            assert row[n.id] > row[n.parent]


# ---------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "partitions, match",
    [
        ([[["a", "b"], ["c"]], [["a", "c"], ["b"]]], "different parents.*refine"),
        ([[["a"], ["b", "c"]], [["a", "b", "c"]]], "refine"),
        ([[["a", "b", "c"]], [["a"], ["b"]]], r"leaves out tasks \['c'\]"),
        ([[["a", "b"], ["b", "c"]]], "appears twice at depth 1"),
        ([[["a", "b", "c"], []]], "empty group"),
    ],
)
def test_from_partitions_rejects_partitions_that_do_not_refine_or_cover(partitions, match) -> None:
    with pytest.raises(TreeEditError, match=match):
        TaskTree.from_partitions(["a", "b", "c"], partitions)


@TREES
@given(st.data())
def test_from_partitions_rejects_a_random_non_refining_partition(data: st.DataObject) -> None:
    tree = data.draw(trees(min_tasks=2, min_depth=2, max_depth=3))
    parts = [list(p) for p in tree.partitions()]
    # a depth-d block that mixes tasks of two different depth-(d-1) nodes
    candidates = [d for d in range(1, tree.depth) if len(parts[d - 1]) >= 2]
    assume(candidates)
    d = data.draw(st.sampled_from(candidates))
    first, second = parts[d - 1][0][0], parts[d - 1][1][0]
    mixed = [first, second]
    rest = [[t for t in block if t not in mixed] for block in parts[d]]
    parts[d] = [mixed] + [b for b in rest if b]
    with pytest.raises(TreeEditError, match="refine"):
        TaskTree.from_partitions(tree.tasks, parts)


@pytest.mark.parametrize(
    "tasks, match",
    [
        ([], "at least one task"),
        (["a", "a"], "appears twice"),
        (["a", ""], "non-empty"),
        (["a", None], "non-empty strings"),
        (["a", 3], "non-empty strings"),
        (["a.b"], "contains '.'"),
    ],
)
def test_bad_task_names_raise_task_spec_errors(tasks, match) -> None:
    for build in (
        lambda: TaskTree.from_partitions(tasks, [[list(tasks)]]),
        lambda: TaskTree.separate(tasks, 2),
        lambda: TaskTree.shared(tasks, 1),
    ):
        with pytest.raises(TaskSpecError, match=match):
            build()


def test_from_partitions_rejects_unknown_tasks() -> None:
    with pytest.raises(TaskSpecError, match=r"unknown tasks \['z'\]"):
        TaskTree.from_partitions(["a", "b"], [[["a", "b", "z"]]])


def test_path_of_an_unknown_task_raises() -> None:
    with pytest.raises(TaskSpecError, match="unknown task 'z'"):
        TaskTree.shared(["a"], 1).path("z")
