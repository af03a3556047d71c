"""Traces: the file format is checked line by line; replay through the real cache code
reproduces shared/traces/README.md exactly."""

from __future__ import annotations

import json
import re

import pytest

from runtime.trace import TraceError, TraceRecord, TraceWriter, read_trace, replay
from tests.conftest import SHARED

TRACES = SHARED / "traces"
#: the tests that read the shared traces (the file format's own tests need none)
needs_traces = pytest.mark.skipif(not TRACES.is_dir(), reason=f"no shared traces at {TRACES}")


def readme_table() -> dict[int, dict[str, float]]:
    """Rows of the README's table: slots -> {policy: hit rate}, parsed from the README itself."""
    rows = {}
    for line in (TRACES / "README.md").read_text().splitlines():
        m = re.fullmatch(r"\|\s*(\d+)\s*\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|", line.strip())
        if m:
            rows[int(m.group(1))] = {
                "lru": float(m.group(2)),
                "lfu": float(m.group(3)),
                "belady": float(m.group(4)),
            }
    assert rows, "the README's table was not found"
    return rows


@needs_traces
def test_replay_reproduces_readme_table():
    records = read_trace(TRACES / "mixtral-8x7b-humaneval.jsonl")
    assert len(records) == 77 * 32
    for slots, expected in readme_table().items():
        for policy, want in expected.items():
            got = replay(records, policy, slots).hit_rate
            assert round(got, 4) == want, (slots, policy, got, want)


@needs_traces
def test_belady_bounds_every_online_policy():
    records = read_trace(TRACES / "mixtral-8x7b-humaneval.jsonl")
    for slots in (2, 3, 5, 7):
        best = replay(records, "belady", slots).hit_rate
        for policy in ("lru", "lfu", "arc"):
            assert replay(records, policy, slots).hit_rate <= best


def test_trace_round_trip_and_errors(tmp_path):
    recs = [TraceRecord(0, 0, (6, 5), (0.7, 0.3)), TraceRecord(0, 1, (1, 2), (0.5, 0.5))]
    w = TraceWriter(tmp_path / "t.jsonl")
    w.write(recs)
    w.close()
    assert read_trace(tmp_path / "t.jsonl") == recs
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"token": 0, "layer": 0, "experts": [1, 2]}\n{"token": 1}\n')
    with pytest.raises(TraceError, match=r"bad.jsonl:2"):
        read_trace(bad)
    with pytest.raises(TraceError, match="not found"):
        read_trace(tmp_path / "missing.jsonl")


@needs_traces
def test_replay_needs_as_many_slots_as_the_trace_routes_to(tmp_path):
    from runtime.errors import UsageError

    records = read_trace(TRACES / "mixtral-8x7b-humaneval.jsonl")  # top-2 of 8
    with pytest.raises(UsageError, match=r"top-k = 2 experts per layer, so at least 2 slots per layer"):
        replay(records, "lru", 1)
    assert 0 < replay(records, "lru", 2).hit_rate < replay(records, "lru", 3).hit_rate


def test_bad_expert_ids_and_folders_are_refused(tmp_path):
    good = '{"token": 0, "layer": 0, "experts": [1, 2]}\n'
    for experts, needle in (("[99, -1]", "expert id -1"), ("[1, 1]", "expert 1 is listed twice"),
                            ("[3, 2, 3]", "expert 3 is listed twice")):  # fmt: skip
        bad = tmp_path / "bad.jsonl"
        bad.write_text(good + "\n" + f'{{"token": 1, "layer": 0, "experts": {experts}}}\n')
        with pytest.raises(TraceError, match=rf"bad.jsonl:3: {needle}"):  # the blank line counts
            read_trace(bad)
    bad.write_text(good + '{"token": 1, "layer": -1, "experts": [1, 2]}\n')
    with pytest.raises(TraceError, match=r"bad.jsonl:2: layer -1 is not a non-negative integer"):
        read_trace(bad)
    bad.write_text(good + '{"token": 1, "layer": 0, "experts": [1, 2], "weights": [1.0]}\n')
    with pytest.raises(TraceError, match=r"bad.jsonl:2: 1 weights for 2 experts"):
        read_trace(bad)
    bad.write_bytes(good.encode() + b"\xff\xfe\n")
    with pytest.raises(TraceError, match=r"bad.jsonl:2: not a trace record \(UnicodeDecodeError"):
        read_trace(bad)
    with pytest.raises(TraceError, match="is a folder, not a trace file"):
        read_trace(tmp_path)


@pytest.mark.parametrize(
    "record, needle",
    [
        ('{"token": true, "layer": 0, "experts": [1]}', "token true is not a non-negative integer"),
        ('{"token": 0, "layer": 1.5, "experts": [1]}', "layer 1.5 is not a non-negative integer"),
        ('{"token": 0, "layer": "2", "experts": [1]}', 'layer "2" is not a non-negative integer'),
        ('{"token": 0, "layer": 0, "experts": []}', "no experts listed"),
        ('{"token": 0, "layer": 0, "experts": [true, 2]}', "expert id true is not a non-negative integer"),
        ('{"token": 0, "layer": 0, "experts": [1.5, 2]}', "expert id 1.5 is not a non-negative integer"),
    ],
)
def test_a_record_int_would_take_is_still_refused(tmp_path, record, needle):
    """int() takes true, 1.5 and "2": the record is checked as written, not as converted."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text(record + "\n")
    with pytest.raises(TraceError, match=rf"bad.jsonl:1: {re.escape(needle)}"):
        read_trace(bad)


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_a_trace_without_records_is_refused(tmp_path, content):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(content)
    with pytest.raises(TraceError, match="is empty"):
        read_trace(empty)


def test_weights_are_written_to_five_places_as_in_the_shared_traces(tmp_path):
    path = tmp_path / "runs" / "t.jsonl"  # a folder that is not there yet is made
    w = TraceWriter(path)
    w.write([TraceRecord(0, 0, (6, 5), (0.123456789, 0.876543211))])
    w.close()
    assert json.loads(path.read_text())["weights"] == [0.12346, 0.87654]


def test_replay_needs_slots_for_the_widest_record_wherever_it_is():
    from runtime.errors import UsageError

    records = [TraceRecord(0, 0, (1,), (1.0,)), TraceRecord(1, 0, (1, 2), (0.5, 0.5))]
    with pytest.raises(UsageError, match="top-k = 2"):
        replay(records, "lru", 1)
    assert replay(records, "lru", 2).stats.total().hits == 1  # expert 1 stayed for the second token


def test_a_number_too_large_for_an_id_is_refused_naming_the_line(tmp_path):
    from runtime.trace import TraceError, read_trace

    bad = tmp_path / "huge.jsonl"
    bad.write_text(
        '{"token": 0, "layer": 0, "experts": [1, 2]}\n{"token": 1, "layer": 0, "experts": [1, 1e999]}\n'
    )
    with pytest.raises(TraceError, match=r"huge.jsonl:2: not a trace record \(OverflowError"):
        read_trace(bad)
