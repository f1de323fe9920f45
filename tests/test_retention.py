"""Retention policies: property tests against a brute-force reference, and the edge cases."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcp_engine.retention import (
    RetentionPolicy,
    best,
    keep_every_n_epochs,
    keep_last_n,
    keep_top_k,
    rank_by_metric,
)


@dataclass(frozen=True)
class E:
    step: int
    epoch: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------- reference
# Written differently on purpose: by counting who beats whom, not by sorting.


def value(e: E, monitor: str) -> float:
    return e.metrics.get(monitor, math.nan)


def beats(a: E, b: E, monitor: str, mode: str) -> bool:
    """Does ``a`` rank strictly before ``b``? Not finite (NaN, +-inf, missing) worst,
    newer step wins ties."""
    va, vb = value(a, monitor), value(b, monitor)
    fa, fb = math.isfinite(va), math.isfinite(vb)
    if fa != fb:
        return fa
    if fa and va != vb:
        return va > vb if mode == "max" else va < vb
    return a.step > b.step


def ref_top_k(entries: list[E], k: int, monitor: str, mode: str) -> set[int]:
    if k < 0:
        return {e.step for e in entries}
    return {
        e.step
        for e in entries
        if math.isfinite(value(e, monitor))
        and sum(beats(o, e, monitor, mode) for o in entries if o is not e) < k
    }


def ref_best(entries: list[E], monitor: str, mode: str) -> int | None:
    finite = [e for e in entries if math.isfinite(value(e, monitor))]
    for e in finite:
        if not any(beats(o, e, monitor, mode) for o in finite if o is not e):
            return e.step
    return None


def ref_kept(entries: list[E], p: RetentionPolicy, also: set[int]) -> set[int]:
    steps = {e.step for e in entries}
    if p.keep_top_k == -1 or all(
        x is None
        for x in (p.keep_top_k, p.keep_last_n, p.keep_every_n_steps, p.keep_every_n_epochs)
    ):
        return steps
    keep = set(also) | ({max(steps)} if steps else set())
    if p.monitor is not None:
        b = ref_best(entries, p.monitor, p.mode)
        keep |= {b} if b is not None else set()
    if p.keep_top_k is not None and p.monitor is not None:
        keep |= ref_top_k(entries, p.keep_top_k, p.monitor, p.mode)
    if p.keep_last_n is not None:
        keep |= {e.step for e in entries if sum(o.step > e.step for o in entries) < p.keep_last_n}
    if p.keep_every_n_steps is not None:
        keep |= {e.step for e in entries if e.step % p.keep_every_n_steps == 0}
    if p.keep_every_n_epochs is not None:
        n = p.keep_every_n_epochs
        keep |= {
            e.step
            for e in entries
            if e.epoch is not None
            and (e.epoch + 1) % n == 0
            and not any(o.epoch == e.epoch and o.step > e.step for o in entries)
        }
    return keep


# ----------------------------------------------------------------------------- strategies

metric = st.one_of(
    st.sampled_from([0.0, 1.0, 1.0, 2.5, -3.0, math.nan, math.inf, -math.inf]),
    st.floats(min_value=-10, max_value=10, allow_nan=False),
)


@st.composite
def entry_lists(draw: st.DrawFn) -> list[E]:
    steps = draw(st.lists(st.integers(0, 400), min_size=0, max_size=14, unique=True))
    out = []
    for s in sorted(steps):
        metrics = {} if draw(st.booleans()) and draw(st.booleans()) else {"loss": draw(metric)}
        out.append(E(s, draw(st.one_of(st.none(), st.integers(0, 6))), metrics))
    return out


policies = st.builds(
    RetentionPolicy,
    keep_top_k=st.one_of(st.none(), st.integers(-1, 5)),
    monitor=st.just("loss"),
    mode=st.sampled_from(["min", "max"]),
    keep_last_n=st.one_of(st.none(), st.integers(0, 4)),
    keep_every_n_steps=st.one_of(st.none(), st.integers(1, 50)),
    keep_every_n_epochs=st.one_of(st.none(), st.integers(1, 3)),
)


@settings(max_examples=400, deadline=None)
@given(entries=entry_lists(), policy=policies, data=st.data())
def test_policy_keeps_what_the_reference_keeps_and_never_the_newest_or_best(entries, policy, data):
    also = set(data.draw(st.sets(st.sampled_from([e.step for e in entries] or [0]), max_size=2)))
    kept = policy.kept(entries, also)
    doomed = policy.to_delete(entries, also)
    assert kept & {e.step for e in entries} == ref_kept(entries, policy, also) & {
        e.step for e in entries
    }
    assert set(doomed) | (kept & {e.step for e in entries}) == {e.step for e in entries}
    assert not set(doomed) & kept
    if entries:
        assert max(e.step for e in entries) not in doomed  # the newest
    b = ref_best(entries, "loss", policy.mode)
    assert b is None or b not in doomed  # the best
    assert not also & set(doomed)  # the one resumed from
    assert doomed == sorted(doomed)


@settings(max_examples=300, deadline=None)
@given(entries=entry_lists(), k=st.integers(-1, 6), mode=st.sampled_from(["min", "max"]))
def test_top_k_and_best_match_the_reference(entries, k, mode):
    assert keep_top_k(entries, k, "loss", mode) == ref_top_k(entries, k, "loss", mode)
    top = best(entries, "loss", mode)
    assert (top.step if top else None) == ref_best(entries, "loss", mode)


# ----------------------------------------------------------------------------- cases


def test_nan_and_missing_rank_worst_ties_go_to_the_newer_step():
    entries = [E(1, metrics={"loss": 1.0}), E(2, metrics={"loss": math.nan}), E(3),
               E(4, metrics={"loss": 1.0}), E(5, metrics={"loss": 0.5})]  # fmt: skip
    assert [e.step for e in rank_by_metric(entries, "loss", "min")] == [5, 4, 1, 3, 2]
    assert [e.step for e in rank_by_metric(entries, "loss", "max")] == [4, 1, 5, 3, 2]
    assert keep_top_k(entries, 2, "loss", "min") == {5, 4}
    # A diverged -inf is neither the best nor worth a top-k slot, in either mode.
    diverged = [E(1, metrics={"loss": 1.0}), E(2, metrics={"loss": -math.inf}),
                E(3, metrics={"loss": math.inf})]  # fmt: skip
    assert keep_top_k(diverged, 1, "loss", "min") == {1}
    assert keep_top_k(diverged, 3, "loss", "max") == {1}
    assert best(diverged, "loss", "min").step == 1
    assert keep_top_k(entries, 0, "loss", "min") == set()
    assert keep_top_k(entries, -1, "loss", "min") == {1, 2, 3, 4, 5}
    assert best([E(1), E(2, metrics={"loss": math.nan})], "loss", "min") is None


def test_keep_last_n_and_periodic_checkpoints():
    entries = [E(s, epoch=s // 100) for s in (50, 100, 150, 200, 250, 300)]
    assert keep_last_n(entries, 2) == {250, 300}
    assert keep_last_n(entries, 0) == set()
    # The end of the 2nd and 4th epochs (0-based 1 and 3): their newest checkpoints.
    assert keep_every_n_epochs(entries, 2) == {150, 300}
    p = RetentionPolicy(keep_last_n=1, keep_every_n_steps=100)
    assert p.to_delete(entries) == [50, 150, 250]


def test_a_keep_of_one_still_keeps_the_newest_best_and_resumed_from():
    entries = [E(s, metrics={"loss": v}) for s, v in ((1, 0.1), (2, 0.9), (3, 0.5))]
    p = RetentionPolicy(keep_top_k=1, monitor="loss", mode="min")
    assert p.to_delete(entries) == [2]  # 1 is the best, 3 the newest
    assert p.to_delete(entries, also={2}) == []
    assert RetentionPolicy(keep_last_n=0).to_delete(entries) == [1, 2]  # newest stays


def test_no_policy_or_top_k_minus_one_keeps_everything():
    entries = [E(s) for s in range(5)]
    assert RetentionPolicy().to_delete(entries) == []
    assert RetentionPolicy(keep_top_k=-1, monitor="loss", keep_last_n=1).to_delete(entries) == []


def test_top_k_needs_a_monitor():
    with pytest.raises(ValueError, match="monitor"):
        RetentionPolicy(keep_top_k=3)


def test_keep_every_n_epochs_keeps_what_save_every_n_epochs_saves():
    """The same n in both: every epoch-end save is kept for good (the end of the n-th,
    2n-th... epoch, 0-based n - 1, 2n - 1...), and nothing in between."""
    saved = [E(10 * (epoch + 1), epoch=epoch) for epoch in range(12) if (epoch + 1) % 3 == 0]
    steps_between = [E(10 * (epoch + 1) - 5, epoch=epoch) for epoch in range(12)]
    entries = sorted(saved + steps_between, key=lambda e: e.step)
    kept = RetentionPolicy(keep_last_n=0, keep_every_n_epochs=3).to_delete(entries)
    assert {e.step for e in saved}.isdisjoint(kept)
    assert set(kept) == {e.step for e in steps_between}
