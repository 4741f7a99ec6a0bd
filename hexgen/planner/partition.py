"""Local search over how a cluster's GPUs are grouped into TP groups, replicas and stage orders.

A state is a tuple of replicas; a replica is a tuple of stages ``(node index, TP degree)`` in pipeline order.
GPUs of one node are interchangeable, so a state says how many GPUs of each node every stage takes; GPUs no
stage takes are unused. The search is simulated annealing over small moves (add/remove/retype a stage, move or
swap stages between replicas, reorder a pipeline, merge or split replicas), seeded and iteration-bounded so
that it is deterministic, with a wall-clock budget as a safety net.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence

Stage = tuple[int, int]  # (node index, TP degree)
Replica = tuple[Stage, ...]
State = tuple[Replica, ...]


def canonical(state: Sequence[Sequence[Stage]]) -> State:
    """Replicas sorted (their order does not matter) and empty ones dropped."""
    return tuple(sorted(tuple(r) for r in state if r))


def free_gpus(state: State, counts: Sequence[int]) -> list[int]:
    """GPUs of each node that no stage uses."""
    free = list(counts)
    for rep in state:
        for ni, tp in rep:
            free[ni] -= tp
    return free


def node_groups(counts: Sequence[int], degrees: Sequence[Sequence[int]], cap: int) -> list[Stage]:
    """Split every node into TP groups of the largest valid degree ≤ ``cap`` that still fits, greedily."""
    out = []
    for ni, count in enumerate(counts):
        left = count
        for d in sorted(degrees[ni], reverse=True):
            if d > cap:
                continue
            while left >= d:
                out.append((ni, d))
                left -= d
    return out


def greedy_states(
    counts: Sequence[int], degrees: Sequence[Sequence[int]], group_mem: Callable[[Stage], float], weight_bytes: float
) -> list[State]:
    """Starting points: nodes split into TP groups (several caps on the degree), groups sorted by memory and
    dealt into replicas until each holds ``factor`` times the weights; leftovers join the smallest replicas."""
    starts = []
    caps = sorted({max(max(d) for d in degrees if d)} | {1, 2, 4, 8})
    for cap in caps:
        groups = sorted(node_groups(counts, degrees, cap), key=lambda g: (-group_mem(g), g))
        if not groups:
            continue
        for factor in (1.15, 1.3, 1.6, 2.0, 3.0, 1e9):
            reps: list[list[Stage]] = []
            cur: list[Stage] = []
            mem = 0.0
            for g in groups:
                cur.append(g)
                mem += group_mem(g)
                if mem >= factor * weight_bytes:
                    reps.append(cur)
                    cur, mem = [], 0.0
            if cur:
                if reps:
                    for g in cur:
                        min(reps, key=lambda r: sum(group_mem(x) for x in r)).append(g)
                else:
                    reps.append(cur)
            starts.append(canonical([sorted(r, key=lambda g: (-group_mem(g), g)) for r in reps]))
    return list(dict.fromkeys(starts))


_Reps = list[list[Stage]]
_Slots = list[tuple[int, int]]  # (replica, stage) of every stage


def _add_stage(
    reps: _Reps, stages: _Slots, free: list[int], rng: random.Random, degrees: Sequence[Sequence[int]]
) -> bool:
    """Add a stage from free GPUs."""
    nodes = [i for i, f in enumerate(free) if f > 0 and any(d <= f for d in degrees[i])]
    if not nodes:
        return False
    ni = rng.choice(nodes)
    tp = rng.choice([d for d in degrees[ni] if d <= free[ni]])
    r = rng.randrange(len(reps) + 1)
    if r == len(reps):
        reps.append([])
    reps[r].insert(rng.randrange(len(reps[r]) + 1), (ni, tp))
    return True


def _remove_stage(
    reps: _Reps, stages: _Slots, free: list[int], rng: random.Random, degrees: Sequence[Sequence[int]]
) -> bool:
    r, s = rng.choice(stages)
    del reps[r][s]
    return True


def _retype_stage(
    reps: _Reps, stages: _Slots, free: list[int], rng: random.Random, degrees: Sequence[Sequence[int]]
) -> bool:
    """Change a stage's TP degree."""
    r, s = rng.choice(stages)
    ni, tp = reps[r][s]
    options = [d for d in degrees[ni] if d != tp and d <= free[ni] + tp]
    if not options:
        return False
    reps[r][s] = (ni, rng.choice(options))
    return True


def _move_to_node(
    reps: _Reps, stages: _Slots, free: list[int], rng: random.Random, degrees: Sequence[Sequence[int]]
) -> bool:
    """Move a stage to another node, at the TP degree nearest its own that fits there."""
    r, s = rng.choice(stages)
    ni, tp = reps[r][s]
    nodes = [i for i, f in enumerate(free) if i != ni and any(d <= f for d in degrees[i])]
    if not nodes:
        return False
    nj = rng.choice(nodes)
    near = [d for d in degrees[nj] if d <= free[nj]]
    reps[r][s] = (nj, min(near, key=lambda d: (abs(d - tp), d)))
    return True


def _swap_stages(
    reps: _Reps, stages: _Slots, free: list[int], rng: random.Random, degrees: Sequence[Sequence[int]]
) -> bool:
    """Swap two stages (anywhere)."""
    if len(stages) < 2:
        return False
    (r1, s1), (r2, s2) = rng.sample(stages, 2)
    reps[r1][s1], reps[r2][s2] = reps[r2][s2], reps[r1][s1]
    return True


def _move_to_replica(
    reps: _Reps, stages: _Slots, free: list[int], rng: random.Random, degrees: Sequence[Sequence[int]]
) -> bool:
    """Move a stage into another (or a new) replica."""
    r, s = rng.choice(stages)
    st = reps[r].pop(s)
    t = rng.randrange(len(reps) + 1)
    if t == len(reps):
        reps.append([])
    reps[t].insert(rng.randrange(len(reps[t]) + 1), st)
    return True


def _merge_replicas(
    reps: _Reps, stages: _Slots, free: list[int], rng: random.Random, degrees: Sequence[Sequence[int]]
) -> bool:
    if len(reps) < 2:
        return False
    a, b = rng.sample(range(len(reps)), 2)
    reps[a] = reps[a] + reps[b]
    reps[b] = []
    return True


def _split_replica(
    reps: _Reps, stages: _Slots, free: list[int], rng: random.Random, degrees: Sequence[Sequence[int]]
) -> bool:
    long = [r for r in range(len(reps)) if len(reps[r]) >= 2]
    if not long:
        return False
    r = rng.choice(long)
    cut = rng.randrange(1, len(reps[r]))
    reps.append(reps[r][cut:])
    reps[r] = reps[r][:cut]
    return True


def _reorder_stage(
    reps: _Reps, stages: _Slots, free: list[int], rng: random.Random, degrees: Sequence[Sequence[int]]
) -> bool:
    """Move a stage to another position in its pipeline."""
    r, s = rng.choice(stages)
    if len(reps[r]) < 2:
        return False
    st = reps[r].pop(s)
    reps[r].insert(rng.randrange(len(reps[r]) + 1), st)
    return True


# Drawn uniformly by neighbour(); each edits the replicas in place and returns False when it does not apply.
_MOVES = (
    _add_stage,
    _remove_stage,
    _retype_stage,
    _move_to_node,
    _swap_stages,
    _move_to_replica,
    _merge_replicas,
    _split_replica,
    _reorder_stage,
)


def neighbour(
    state: State, rng: random.Random, counts: Sequence[int], degrees: Sequence[Sequence[int]], max_stages: int
) -> State | None:
    """A random small change of ``state`` that keeps every node within its GPU count; None if the drawn move
    does not apply."""
    reps = [list(r) for r in state]
    free = free_gpus(state, counts)
    move = rng.randrange(len(_MOVES))
    stages = [(r, s) for r in range(len(reps)) for s in range(len(reps[r]))]
    if not stages:  # nothing to change yet: only adding a stage applies
        move = 0
    if not _MOVES[move](reps, stages, free, rng, degrees):
        return None
    if any(len(r) > max_stages for r in reps):
        return None
    new = canonical(reps)
    return new if new != state else None


def anneal(
    starts: Sequence[State],
    score: Callable[[State], float],
    rng: random.Random,
    counts: Sequence[int],
    degrees: Sequence[Sequence[int]],
    max_stages: int,
    *,
    max_iters: int,
    deadline: float,
    patience: int,
) -> tuple[State, float, int]:
    """Simulated annealing from the best start; returns (best state, its score, iterations run).

    Stops after ``max_iters`` iterations, ``patience`` iterations without a new best, or at ``deadline``
    (time.monotonic()), whichever comes first. Temperature falls linearly from 5% of the start's score.
    """
    cache: dict[State, float] = {}

    def value(s: State) -> float:
        v = cache.get(s)
        if v is None:
            v = cache[s] = score(s)
        return v

    cur = max(starts, key=lambda s: (value(s), s))
    cur_v = value(cur)
    best, best_v = cur, cur_v
    t0 = max(abs(cur_v) * 0.05, 1e-6)
    since = 0
    it = 0
    for it in range(1, max_iters + 1):
        if since >= patience or time.monotonic() > deadline:
            break
        since += 1
        cand = neighbour(cur, rng, counts, degrees, max_stages)
        if cand is None:
            continue
        v = value(cand)
        temp = t0 * (1.0 - it / max_iters) + 1e-12
        if v >= cur_v or rng.random() < math.exp((v - cur_v) / temp):
            cur, cur_v = cand, v
        if cur_v > best_v:
            best, best_v, since = cur, cur_v, 0
            t0 = max(t0, abs(best_v) * 0.05)
    return best, best_v, it
