"""The record protocol between the sandbox's runner and the grader (:mod:`vitcourse.grading.protocol`): no sandbox needed.

Everything a run writes is read as untrusted: a line that is not exactly one record is skipped, never raised on,
and a run that writes too much ends. The modules that write and read records take every name from the protocol.
"""

from __future__ import annotations

import ast
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vitcourse.grading import linux, protocol, runtime
from vitcourse.grading.protocol import (
    BEGIN,
    BUDGET,
    DONE,
    END,
    EXIT,
    FATAL,
    FIELDS,
    KINDS,
    MAX_OUTPUT,
    SIGNAL,
    STATUSES,
    TIMEOUT,
    Reader,
    Record,
    decode,
    encode,
    read_run,
)
from vitcourse.grading.sandbox import build_view, parse_record

GRADING = Path(protocol.__file__).resolve().parent
USERS = ("inside.py", "sandbox.py", "grader.py")  # the writer and the readers


def line(data: bytes) -> bytes:
    """What :func:`decode` is given: one line, without its newline."""
    assert data.startswith(b"\n") and data.endswith(b"\n") and data.count(b"\n") == 2
    return data[1:-1]


ROUND_TRIPS = [
    (BEGIN, "s0", {}),
    (BEGIN, "c3", {}),
    (DONE, "s1", {"ok": True}),
    (DONE, "s2", {"ok": False, "type": "Skipped", "error": "skipped: the setup time was used up"}),
    (DONE, "s3", {"ok": False, "type": "Timeout", "error": "it did not finish within the setup time", "where": ""}),
    (DONE, "s4", {"ok": False, "type": "ZeroDivisionError", "where": "cell 3, line 2",
                  "error": "ZeroDivisionError: division by zero (cell 3, line 2)"}),
    (DONE, "c0", {"ok": True, "value": runtime.encode([np.arange(3.0), {"n": 2}])}),
    (DONE, "c1", {"ok": True, "value": runtime.encode(1.5), "ops": ["aten._softmax", "autograd"]}),
    (DONE, "c2", {"ok": False, "type": "Unsupported", "error": "returned a generator", "where": ""}),
    (END, "c0", {"status": EXIT, "code": 0}),
    (END, "c1", {"status": SIGNAL, "signal": 9}),
    (END, "c2", {"status": TIMEOUT}),
    (END, "c3", {"status": BUDGET}),
    (FATAL, "the sandbox could not isolate the submission ([Errno 1] unshare failed)", {}),
]


@pytest.mark.parametrize("kind, key, fields", ROUND_TRIPS)
def test_every_record_kind_round_trips(kind, key, fields):
    record = decode(line(encode(kind, key, **fields)))
    assert isinstance(record, Record) and record.kind == kind and record.id == key
    assert record == {kind: key, **fields}
    assert parse_record(line(encode(kind, key, **fields))) == record  # the sandbox's reader is the protocol's


def test_the_round_trips_cover_every_kind_field_and_status():
    assert {k for k, _, _ in ROUND_TRIPS} == set(KINDS) == set(FIELDS)
    assert {f for k, _, fields in ROUND_TRIPS for f in fields} == set().union(*FIELDS.values())
    assert {fields["status"] for k, _, fields in ROUND_TRIPS if k == END} == set(STATUSES)
    value = next(f["value"] for k, key, f in ROUND_TRIPS if key == "c0" and k == DONE)
    back = runtime.decode(decode(line(encode(DONE, "c0", ok=True, value=value)))["value"])
    np.testing.assert_array_equal(back[0], np.arange(3.0))


@pytest.mark.parametrize("kind, key, fields", [
    ("phase", "public-done", {}),  # no longer a record
    ("status", "exit", {}),  # a field, not a kind
    (BEGIN, 3, {}),  # ids are strings
    (FATAL, None, {}),
    (BEGIN, "s0", {"ok": True}),  # a field of another kind
    (END, "c0", {"status": EXIT, "value": 1}),
    (DONE, "c0", {"ok": True, "done": "c1"}),  # two kinds in one
])
def test_the_runner_cannot_write_what_is_not_a_record(kind, key, fields):
    with pytest.raises(ValueError):
        encode(kind, key, **fields)


@pytest.mark.parametrize("data", [
    b"", b"   ", b"not json", b"\xff\xfe", b"[1]", b'"begin"', b"null", b"{",
    b"[" * 100_000 + b"]" * 100_000,  # nested too deeply: a RecursionError, caught
    b'{"a": "\\ud800"}', b"{}", b'{"ok": true, "value": 1}',  # no kind key
    b'{"phase": "public-done"}', b'{"status": "exit"}', b'{"Begin": "s0"}',  # unknown kinds
    b'{"begin": 0}', b'{"done": null, "ok": true}', b'{"end": ["c0"]}', b'{"fatal": {"m": 1}}',  # ids not strings
    b'{"begin": "s0", "done": "s0", "ok": true}', b'{"fatal": "x", "begin": "s0"}',  # more than one kind key
    b'{"begin": 5, "done": "s0"}',
])
def test_what_is_not_exactly_one_record_is_skipped(data):
    assert decode(data) is None
    assert list(Reader().feed(b"junk\n" + data + b"\n" + encode(BEGIN, "s0"))) == [{"begin": "s0"}]


def test_fields_are_kept_as_read_and_bounded():
    record = decode(b'{"done": "c0", "ok": "yes", "value": ' + b"9" * 5000 + b', "ops": 7, "error": "\\ud800", "x": 1}')
    assert record.kind == DONE and record["value"] == 0  # a huge integer reads as 0, quickly
    assert record["ok"] == "yes" and record["ops"] == 7 and record["x"] == 1  # the reader decides what to believe
    assert decode(b'{"end": "c0", "status": "exit", "code": -' + b"1" * 18 + b"}")["code"] == -int("1" * 18)
    assert decode('{"begin": "s\u00e9"}'.encode()).id == "s\u00e9"
    assert decode(b'{"begin": "s\xff"}').id == "s\ufffd"  # bytes that are not UTF-8 are replaced, not refused


def test_decode_never_raises():
    rng = random.Random(0)
    pieces = [b"{", b"}", b"[", b"]", b'"', b":", b",", b"\\", b"\\u", b"d800", b"begin", b"done", b"1e999",
              b"NaN", b"-", b"9" * 30, b"\x00", b"\xff", b" "]
    for _ in range(3000):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randrange(12)))
        record = decode(data)
        assert record is None or (record.kind in KINDS and isinstance(record.id, str))


def test_reader_joins_lines_across_chunks_and_ends_half_lines():
    reader = Reader()
    data = encode(BEGIN, "c0") + encode(DONE, "c0", ok=True, value=runtime.encode(2)) + encode(END, "c0", status=EXIT)
    got = [r for i in range(0, len(data), 7) for r in reader.feed(data[i:i + 7])]
    assert [(r.kind, r.id) for r in got] == [(BEGIN, "c0"), (DONE, "c0"), (END, "c0")]
    # Code that wrote half a line to the pipe cannot swallow the runner's next record: it starts on a new line.
    assert [r.id for r in Reader().feed(b'{"begin": "forged' + encode(END, "c1", status=TIMEOUT))] == ["c1"]
    assert list(Reader().feed(b'{"begin": "c0"}')) == []  # a line counts once it ends


def test_a_run_that_writes_too_much_ends():
    reader = Reader(limit=100)
    assert list(reader.feed(encode(BEGIN, "s0"))) == [{"begin": "s0"}]
    assert reader.feed(b"x" * (100 - reader.total)) is not None  # exactly the limit: still read
    assert reader.feed(b"\n") is None  # one byte more: the run ends, nothing of the chunk is read
    big = encode(DONE, "c0", ok=True, value="x" * 200)
    assert Reader(limit=100).feed(big) is None  # one record larger than the limit
    assert Reader(limit=100).feed(b"\n" * 101) is None  # garbage counts as much as records
    assert MAX_OUTPUT == 64 * 2**20


def records(*items) -> list:
    """``(record, t)`` pairs, ``t`` counting seconds, from ``(kind, id, fields)``."""
    return [(decode(line(encode(kind, key, **fields))), float(t)) for t, (kind, key, fields) in enumerate(items)]


def test_read_run_reads_an_honest_run():
    run = read_run(records(
        (BEGIN, "s0", {}), (DONE, "s0", {"ok": True}),
        (BEGIN, "s1", {}), (DONE, "s1", {"ok": False, "type": "NameError", "error": "NameError: x", "where": ""}),
        (DONE, "s2", {"ok": False, "type": "Skipped", "error": "skipped"}),  # without begin: not reported
        (BEGIN, "c0", {}), (DONE, "c0", {"ok": True, "value": 1}), (END, "c0", {"status": EXIT, "code": 0}),
        (END, "c1", {"status": BUDGET}),
        (BEGIN, "c2", {}),
    ), statements={"s0", "s1", "s2"}, checks={"c0", "c1", "c2"})
    assert run.fatal is None and [r.id for r in run.failed] == ["s1"]
    assert list(run.ended) == ["c0", "c1"]
    assert run.ended["c0"].done == {"done": "c0", "ok": True, "value": 1} and run.ended["c0"].spent == 2.0
    assert run.ended["c1"].done is None and run.ended["c1"].spent is None and run.ended["c1"].end["status"] == BUDGET
    assert run.current == "c2" and run.began == 9.0


def test_read_run_believes_forged_records_only_for_what_is_in_progress():
    run = read_run(records(
        (BEGIN, "c0", {}),
        (DONE, "c1", {"ok": True, "value": 1}),  # c1 is not in progress: ignored
        (DONE, "c0", {"ok": True, "value": 1}), (DONE, "c0", {"ok": True, "value": 2}),  # the first counts
        (DONE, "s0", {"ok": False}),  # a statement not in progress
        (BEGIN, "c9", {}), (END, "c9", {"status": EXIT}),  # not a check of this run
        (END, "c0", {"status": EXIT, "code": 0}), (END, "c0", {"status": SIGNAL, "signal": 9}),  # one end per check
        (BEGIN, "c0", {}),  # ended: it cannot begin again
    ), statements={"s0"}, checks={"c0", "c1"})
    assert run.failed == [] and list(run.ended) == ["c0"]
    assert run.ended["c0"].done["value"] == 1 and run.ended["c0"].end["status"] == EXIT and run.ended["c0"].spent == 7.0
    assert run.current is None and run.began == 0.0
    run = read_run(records((BEGIN, "s0", {}), (BEGIN, "c0", {}), (END, "c1", {"status": EXIT}), (FATAL, "no", {}),
                           (END, "c0", {"status": EXIT})), statements={"s0"}, checks={"c0", "c1"})
    # a fatal after submission code began is forged: ignored, so a student cannot stop their own grading
    assert run.fatal is None and run.ended["c1"].spent is None and "c0" in run.ended


def test_a_fatal_counts_only_as_the_first_record_of_a_run():
    run = read_run(records((FATAL, "the sandbox could not isolate the submission", {}), (BEGIN, "s0", {})),
                   statements={"s0"}, checks=set())
    assert run.fatal == "the sandbox could not isolate the submission" and run.current is None  # nothing after it


def _sources() -> dict[str, ast.Module]:
    return {name: ast.parse((GRADING / name).read_text()) for name in USERS}


def test_writer_and_readers_take_record_names_from_the_protocol():
    # Kinds, statuses and the runner's own error types; "signal" is also an end's field, and fields are spelled out.
    names = {*KINDS, *STATUSES, "phase", protocol.SKIPPED, protocol.SETUP_TIMEOUT, protocol.UNSUPPORTED} - {"signal"}
    own = {n for n, v in vars(protocol).items() if n.isupper() or getattr(v, "__module__", None) == protocol.__name__}
    for name, tree in _sources().items():
        spelled = sorted({node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and node.value in names})
        assert spelled == [], f"{name} spells protocol names itself: {spelled}"
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                    and node.module == "protocol" and node.level == 1 for alias in node.names}
        assert imported & {"BEGIN", "DONE", "END", "FATAL"}, f"{name} takes no record kind from .protocol"
        defined = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)}
        defined |= {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        assert not defined & (own | {"parse_record", "NEW"}), f"{name} defines {sorted(defined & own)} itself"


def test_prctl_mount_and_unshare_take_named_constants():
    calls = {"prctl": [0], "mount": [3], "unshare": [0], "umount2": [1]}  # which arguments are options or flags
    seen = 0
    for name, tree in _sources().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in calls:
                seen += 1
                for i in calls[node.func.attr]:
                    numbers = [n for n in ast.walk(node.args[i]) if isinstance(n, ast.Constant) and isinstance(n.value, int)]
                    assert numbers == [], f"{name}, line {node.lineno}: a bare number for {node.func.attr}"
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("kill", "killpg"):
                assert not isinstance(node.args[1], ast.Constant), f"{name}, line {node.lineno}: a bare signal number"
    assert seen >= 8
    assert (linux.PR_SET_PDEATHSIG, linux.PR_SET_DUMPABLE) == (1, 4)
    assert (linux.MS_RDONLY, linux.MS_NOSUID, linux.MS_NODEV, linux.MS_REC, linux.MS_PRIVATE) == (1, 2, 4, 16384, 262144)
    assert linux.CLONE_NEWUSER == 0x10000000 and linux.CLONE_NEWNS == 0x20000 and linux.CLONE_THREAD == 0x10000


def test_protocol_and_linux_import_nothing_of_vitcourse_and_reach_the_sandbox(tmp_path):
    for name in ("protocol.py", "linux.py"):
        tree = ast.parse((GRADING / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0 and node.module.split(".")[0] in sys.stdlib_module_names, (name, node.module)
            elif isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] in sys.stdlib_module_names for a in node.names), name
    view = build_view(tmp_path / "view", ())
    env = dict(os.environ, PYTHONPATH=str(view))
    code = ("import sys, torch, vitcourse.grading.inside as i, vitcourse.grading.protocol as p\n"
            "with i._operator_watch(frozenset({'aten.add'})):\n    torch.ones(1) + 1\n"
            "print(p.__file__, i.encode is p.encode, 'torch._dynamo' in sys.modules)")  # _dynamo: seconds per worker
    out = subprocess.run([sys.executable, "-s", "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    where, same, dynamo = out.stdout.split()
    assert where.startswith(str(view)) and same == "True" and dynamo == "False"


def test_the_grader_clock_moves_only_for_records_it_believes():
    from vitcourse.grading.grader import _Clock

    class Stmt:
        definition = False

    class Unit:
        exercise = "1.1"

    clock = _Clock({"setup_seconds": 10, "budgets": {"1.1": 20}}, {"s0": Stmt()}, {"c0": Unit()}, start_seconds=15)
    for data in (b'{"phase": "public-done"}', b'{"begin": "s0", "done": "s0"}', b'{"begin": 1}'):
        assert decode(data) is None  # never reaches the clock
    clock.see(decode(b'{"begin": "s0"}'), 1.0)
    assert clock.limit == 1.0 + 10 + _Clock.SLACK
    clock.see(decode(b'{"done": "c0", "ok": true}'), 2.0)  # not what is in progress
    assert clock.current == "s0"
    clock.see(decode(b'{"done": "s0", "ok": true}'), 3.0)
    assert clock.current is None and clock.setup_left == 8.0 and clock.limit == 3.0 + _Clock.GAP
    clock.see(decode(b'{"begin": "c0"}'), 4.0)
    clock.see(decode(b'{"end": "c0", "status": "exit", "code": 0}'), 9.0)
    assert clock.budgets["1.1"] == 15.0 and clock.limit == 9.0 + _Clock.GAP
