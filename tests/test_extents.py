"""RangeMap / RangeSet against a naive one-entry-per-page reference."""

from __future__ import annotations

from collections import Counter
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extents import RangeMap, RangeSet

LIMIT = 96

pfns = st.integers(min_value=0, max_value=LIMIT)
values = st.sampled_from(["a", "b", "c"])


@st.composite
def ranges(draw: st.DrawFn) -> tuple[int, int]:
    a = draw(pfns)
    b = draw(pfns)
    return min(a, b), max(a, b)


set_ops = st.lists(st.tuples(ranges(), values), max_size=25)


def compress(ref: list[str], start: int, end: int) -> list[tuple[int, int, str]]:
    """Maximal runs of equal values of ``ref[start:end]``."""
    out: list[tuple[int, int, str]] = []
    for pfn in range(start, end):
        if out and out[-1][1] == pfn and out[-1][2] == ref[pfn]:
            out[-1] = (out[-1][0], pfn + 1, ref[pfn])
        else:
            out.append((pfn, pfn + 1, ref[pfn]))
    return out


def build(ops: list[tuple[tuple[int, int], str]]) -> tuple[RangeMap[str], list[str]]:
    rmap: RangeMap[str] = RangeMap("a", LIMIT)
    ref = ["a"] * LIMIT
    for (s, e), v in ops:
        rmap.set(s, e, v)
        ref[s:e] = [v] * (e - s)
    return rmap, ref


# -- RangeMap -----------------------------------------------------------------


@settings(max_examples=300)
@given(set_ops)
def test_rangemap_matches_per_page_reference(ops: list[tuple[tuple[int, int], str]]) -> None:
    rmap, ref = build(ops)
    assert [rmap.get(p) for p in range(LIMIT)] == ref
    whole = compress(ref, 0, LIMIT)
    # Runs are maximal: equal neighbours are always merged, so len() is exact.
    assert list(rmap.runs()) == whole
    assert len(rmap) == len(whole)
    for (_, _, v1), (_, _, v2) in pairwise(whole):
        assert v1 != v2
    # Totals are kept incrementally; they must equal a recount.
    counts = Counter(ref)
    assert rmap.totals() == dict(counts)
    for v in ("a", "b", "c", "never-set"):
        assert rmap.total(v) == counts.get(v, 0)
    assert sum(rmap.totals().values()) == LIMIT


@settings(max_examples=200)
@given(set_ops, ranges(), values)
def test_rangemap_range_queries(
    ops: list[tuple[tuple[int, int], str]], window: tuple[int, int], value: str
) -> None:
    rmap, ref = build(ops)
    s, e = window
    assert list(rmap.runs(s, e)) == compress(ref, s, e)
    assert rmap.count(s, e, value) == ref[s:e].count(value)
    assert rmap.all_equal(s, e, value) == all(v == value for v in ref[s:e])
    # clip=False: the same runs but whole, i.e. extended to the full maximal runs.
    whole = compress(ref, 0, LIMIT)
    expected = [r for r in whole if r[0] < e and r[1] > s] if s < e else []
    assert list(rmap.runs(s, e, clip=False)) == expected
    for pfn in range(s, e):
        rs, re_, rv = rmap.run_at(pfn)
        assert rs <= pfn < re_ and rv == ref[pfn]
        assert (rs, re_, rv) in whole


def test_rangemap_merges_equal_neighbours_both_sides() -> None:
    rmap: RangeMap[int] = RangeMap(0, 100)
    rmap.set(10, 20, 1)
    rmap.set(30, 40, 1)
    assert len(rmap) == 5
    rmap.set(20, 30, 1)  # fills the gap: both neighbours merge with it
    assert list(rmap.runs()) == [(0, 10, 0), (10, 40, 1), (40, 100, 0)]
    assert len(rmap) == 3
    rmap.set(10, 40, 0)  # back to one run
    assert list(rmap.runs()) == [(0, 100, 0)]
    assert len(rmap) == 1
    assert rmap.total(1) == 0
    assert rmap.totals() == {0: 100}


def test_rangemap_set_same_value_inside_run_is_noop() -> None:
    rmap: RangeMap[int] = RangeMap(0, 100)
    rmap.set(10, 90, 7)
    rmap.set(20, 30, 7)
    assert list(rmap.runs()) == [(0, 10, 0), (10, 90, 7), (90, 100, 0)]
    assert rmap.total(7) == 80


def test_rangemap_empty_and_out_of_range() -> None:
    rmap: RangeMap[int] = RangeMap(0, 100)
    rmap.set(50, 50, 1)  # empty range: nothing happens
    rmap.set(60, 50, 1)
    assert len(rmap) == 1 and rmap.total(1) == 0
    assert list(rmap.runs(40, 40)) == []
    with pytest.raises(IndexError):
        rmap.get(100)
    with pytest.raises(IndexError):
        rmap.get(-1)
    with pytest.raises(IndexError):
        rmap.set(90, 101, 1)
    with pytest.raises(IndexError):
        list(rmap.runs(0, 101))
    assert rmap.total(1) == 0  # a refused set changes nothing
    assert list(rmap.runs()) == [(0, 100, 0)]


def test_rangemap_huge_limit_costs_runs_not_pages() -> None:
    rmap: RangeMap[str] = RangeMap("absent")  # 2^52 pages
    rmap.set(1 << 40, 1 << 41, "x")
    rmap.set(0, 1 << 20, "y")
    assert len(rmap) == 4
    assert rmap.total("x") == 1 << 40
    assert rmap.total("absent") == (1 << 52) - (1 << 40) - (1 << 20)


# -- RangeSet -----------------------------------------------------------------

set_ops_bool = st.lists(st.tuples(st.booleans(), ranges()), max_size=25)


def build_set(ops: list[tuple[bool, tuple[int, int]]]) -> tuple[RangeSet, set[int]]:
    rset = RangeSet(LIMIT)
    ref: set[int] = set()
    for add, (s, e) in ops:
        if add:
            rset.add(s, e)
            ref |= set(range(s, e))
        else:
            rset.remove(s, e)
            ref -= set(range(s, e))
    return rset, ref


def ref_ranges(ref: set[int], start: int, end: int, member: bool = True) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for p in range(start, end):
        if (p in ref) != member:
            continue
        if out and out[-1][1] == p:
            out[-1] = (out[-1][0], p + 1)
        else:
            out.append((p, p + 1))
    return out


@settings(max_examples=300)
@given(set_ops_bool, ranges())
def test_rangeset_matches_reference(
    ops: list[tuple[bool, tuple[int, int]]], window: tuple[int, int]
) -> None:
    rset, ref = build_set(ops)
    s, e = window
    assert len(rset) == len(ref)
    assert bool(rset) == bool(ref)
    assert [p for p in range(-2, LIMIT + 2) if p in rset] == sorted(ref)
    assert list(rset.ranges()) == ref_ranges(ref, 0, LIMIT)
    whole_ranges = ref_ranges(ref, 0, LIMIT)
    assert rset.first() == (whole_ranges[0] if whole_ranges else None)
    assert list(rset.ranges(s, e)) == ref_ranges(ref, s, e)
    assert list(rset.holes(s, e)) == ref_ranges(ref, s, e, member=False)
    assert rset.count(s, e) == len(ref & set(range(s, e)))
    assert rset.covers(s, e) == (set(range(s, e)) <= ref)
    assert rset.disjoint(s, e) == (not ref & set(range(s, e)))
    # extents(): whole ranges that overlap the window, never clipped.
    whole = ref_ranges(ref, 0, LIMIT)
    overlapping = [r for r in whole if r[0] < e and r[1] > s] if s < e else []
    assert list(rset.extents(s, e)) == overlapping
    copy = rset.copy()
    assert copy == rset and copy is not rset
    copy.add(0, LIMIT)
    assert (copy == rset) == (len(ref) == LIMIT)


def test_rangeset_extents_are_unclipped_and_clamped() -> None:
    rset = RangeSet(100)
    rset.add(10, 30)
    rset.add(60, 100)
    assert list(rset.extents(20, 21)) == [(10, 30)]
    assert list(rset.extents(29, 61)) == [(10, 30), (60, 100)]
    assert list(rset.extents(30, 60)) == []  # borders only: no overlap
    # Out-of-range windows are clamped (callers look one page either side).
    assert list(rset.extents(-1, 11)) == [(10, 30)]
    assert list(rset.extents(99, 101)) == [(60, 100)]
    assert list(rset.ranges(20, 70)) == [(20, 30), (60, 70)]
    assert list(rset.holes(0, 100)) == [(0, 10), (30, 60)]


def test_rangeset_merging_and_contains() -> None:
    rset = RangeSet(1000)
    rset.add(0, 10)
    rset.add(10, 20)
    assert list(rset.ranges()) == [(0, 20)]
    rset.remove(5, 6)
    assert list(rset.ranges()) == [(0, 5), (6, 20)]
    assert 5 not in rset and 6 in rset and 4 in rset
    assert "5" not in rset and -1 not in rset and 1000 not in rset
    assert len(rset) == 19
    assert repr(rset) == "RangeSet([0x0, 0x5), [0x6, 0x14))"
    with pytest.raises(TypeError):
        hash(rset)
