"""Write the adversarial grading corpus (tests/grading_corpus/chNN/*.ipynb) and its expected scores.

Each submission is a chapter's solution notebook with a few cells changed. Run
``python tests/grading_corpus/make_corpus.py`` after changing a solution notebook;
``expected.json`` holds the scores the grader must give to each file under the test's
budgets (setup 4 s, 3 s per exercise: ``LIMITS``). ``needs_sandbox`` marks files whose
score relies on the sandbox; ``timed`` marks attacks on the grader's time, whose scores
depend on the machine and which must finish within the submission's cap.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOLUTION = ROOT / "notebooks" / "solutions" / "ch01_exercises.ipynb"
OUT = Path(__file__).resolve().parent / "ch01"
SOFTMAX, ATTENTION, MHSA = "ch01-03", "ch01-06", "ch01-09"

# attention with its own correct softmax, so a broken `softmax` costs exercise 1.1 only
OWN_ATTENTION = '''
def attention(q, k, v, mask=None):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return weights @ v, weights
'''

CASES: dict[str, tuple[dict, dict]] = {}
LIMITS = {"setup_seconds": 4.0, "exercise_seconds": 3.0}


def case(name: str, scores, sandbox: bool = False, chapter: str = "ch01", timed: bool = False):
    def register(fn):
        ids = ["1.1", "1.2", "1.3", "1.4"] if chapter == "ch01" else ["4.1", "4.2", "4.3", "4.4"]
        assert len(scores) == len(ids), f"{name}: one expected score per exercise {ids}"
        CASES[f"{chapter}/{name}"] = (fn, {**dict(zip(ids, scores)), "needs_sandbox": sandbox, "timed": timed})
        return fn
    return register


def cell(nb, cell_id):
    return next(c for c in nb["cells"] if c.get("id") == cell_id)


def src(nb, cell_id) -> str:
    return "".join(cell(nb, cell_id)["source"])


def set_src(nb, cell_id, text: str) -> None:
    cell(nb, cell_id)["source"] = text.strip("\n")


def method_body(nb, marker: str, extra: str) -> None:
    """Insert ``extra`` (8-space indented lines) at the start of MHSA's method ``marker``."""
    text = src(nb, MHSA)
    head = f"    def {marker}"
    start = text.index(head)
    body = text.rindex("\n", 0, text.index("### BEGIN SOLUTION", start)) + 1  # start of the marker's line
    set_src(nb, MHSA, text[:body] + extra.strip("\n") + "\n" + text[body:])


@case("missing_cell", (2, 3, 0, 4))
def _(nb):
    nb["cells"] = [c for c in nb["cells"] if c.get("id") != MHSA]


@case("duplicated_cells", (2, 3, 4, 4))
def _(nb):
    cells = []
    for c in nb["cells"]:
        cells.append(c)
        if c.get("id") in (SOFTMAX, ATTENTION, MHSA):
            twin = copy.deepcopy(c)
            twin["id"] = c["id"] + "-copy"
            cells.append(twin)
    stub = copy.deepcopy(cell(nb, SOFTMAX))
    stub["id"] = "stub-copy"
    stub["source"] = "def softmax(x, dim=-1):\n    # YOUR CODE HERE\n    raise NotImplementedError()"
    cells.append(stub)  # a leftover stub after the real answer must not win
    nb["cells"] = cells


@case("retyped_cell", (2, 3, 0, 4))
def _(nb):
    cell(nb, MHSA)["cell_type"] = "markdown"
    cell(nb, MHSA).pop("outputs", None)
    cell(nb, MHSA).pop("execution_count", None)
    cell(nb, "ch01-04")["cell_type"] = "raw"  # a retyped check cell costs nothing


@case("syntax_errors", (2, 3, 0, 4))
def _(nb):
    set_src(nb, SOFTMAX, src(nb, SOFTMAX) + "\n\nthis is not python (\n")
    set_src(nb, MHSA, src(nb, MHSA).replace("return self.proj(", "return self.proj((", 1))


@case("infinite_loop", (0.8, 3, 4, 4))  # one hidden check passes in the hidden run's own budget
def _(nb):
    set_src(nb, SOFTMAX, src(nb, SOFTMAX).replace(
        "    ### BEGIN SOLUTION", "    while dim != -1:\n        pass\n    ### BEGIN SOLUTION", 1))


# forward() fails, so do the output checks of 1.3; its parameter checks pass
@case("memory_bomb", (2, 3, 1.6, 4))
def _(nb):
    # 1 GiB more each time until the memory limit stops it: quick, so the outcome does not
    # depend on the machine's speed (a bomb that fills memory slowly would hit the time limit)
    method_body(nb, "forward", "        hoard = [bytearray(100_000_000)]\n        while True:\n"
                               "            hoard.append(torch.empty(2**28))")


@case("huge_output", (2, 3, 1.6, 4))
def _(nb):
    set_src(nb, SOFTMAX, src(nb, SOFTMAX).replace(
        "    ### BEGIN SOLUTION", "    print('x' * 20_000_000)\n    ### BEGIN SOLUTION", 1))
    method_body(nb, "forward", "        return torch.zeros(30_000_000)")
    cell(nb, "ch01-12")["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "y" * 3_000_000}]


@case("sys_exit", (2, 3, 0, 4))
def _(nb):
    set_src(nb, SOFTMAX, src(nb, SOFTMAX) + "\n\nimport sys\nsys.exit(0)\n")
    method_body(nb, "__init__", "        import sys\n        sys.exit(3)")


@case("os_exit", (2, 1.8, 4, 4))
def _(nb):
    set_src(nb, ATTENTION, src(nb, ATTENTION).replace(
        "    ### BEGIN SOLUTION", "    if mask is not None:\n        import os\n        os._exit(0)\n    ### BEGIN SOLUTION", 1))


@case("segfault", (2, 3, 0, 4))
def _(nb):
    set_src(nb, SOFTMAX, src(nb, SOFTMAX) + "\n\nimport ctypes\n\nclass Boom:\n    ctypes.string_at(0)\n")
    method_body(nb, "__init__", "        import ctypes\n        ctypes.string_at(0)")


@case("kills_grader_worker", (2, 1.8, 4, 4))
def _(nb):
    # Without a sandbox this kills the worker; in one, the worker is PID 1 of its namespace,
    # which ignores the signal, and the code ends its own process instead.
    set_src(nb, ATTENTION, src(nb, ATTENTION).replace(
        "    ### BEGIN SOLUTION",
        "    if mask is not None:\n        import os, signal\n        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):\n"
        "            os.kill(os.getppid(), sig)\n        os._exit(0)\n"
        "    ### BEGIN SOLUTION", 1))


@case("fork_bomb", (2, 3, 0, 4))
def _(nb):
    method_body(nb, "__init__", "        import os\n        while True:\n            os.fork()")


@case("disk_search", (0, 3, 4, 4), sandbox=True)
def _(nb):
    set_src(nb, SOFTMAX, '''
import glob
import os
import sys


def _steal():
    """Look for the solution notebooks, the hidden checks or the reference code, and use them."""
    try:
        from vitcourse.attention import softmax as reference
        return reference
    except ImportError:
        pass
    roots = {"/work", "/root", "/home", os.getcwd(), os.path.expanduser("~")} | set(sys.path)
    for root in roots:
        for pattern in ("**/solutions/ch01_exercises.ipynb", "**/grading/hidden/ch01.py", "**/vitcourse/attention.py"):
            for path in glob.glob(os.path.join(root, pattern), recursive=True)[:3]:
                if path.endswith(".ipynb"):
                    import json
                    found = {}
                    for c in json.load(open(path))["cells"]:
                        if c["cell_type"] == "code" and "def softmax" in "".join(c["source"]):
                            exec("import torch, math\\n" + "".join(c["source"]), found)
                            return found["softmax"]
                elif path.endswith("attention.py"):
                    found = {}
                    exec(open(path).read(), found)
                    return found["softmax"]
    return None


def softmax(x, dim=-1):
    stolen = _steal()
    if stolen is not None:
        return stolen(x, dim)
    return torch.zeros_like(x)
''')
    set_src(nb, ATTENTION, OWN_ATTENTION)


@case("monkeypatch_checker", (0, 3, 4, 4))
def _(nb):
    set_src(nb, SOFTMAX, '''
import numpy as np
import numpy.testing
import torch.testing

def _always_equal(*args, **kwargs):
    return True

np.allclose = np.array_equal = _always_equal
numpy.testing.assert_allclose = numpy.testing.assert_array_equal = lambda *a, **k: None
torch.allclose = torch.equal = _always_equal
torch.testing.assert_close = lambda *a, **k: None
try:
    import vitcourse.grading.spec as spec
    spec.allclose = lambda *a, **k: (lambda actual, expected, where="": None)
except Exception:
    pass


def softmax(x, dim=-1):
    return x * 0 + 1  # wrong, and hoping nobody compares
''')
    set_src(nb, ATTENTION, OWN_ATTENTION)


@case("fake_results", (0, 3, 4, 4))
def _(nb):
    set_src(nb, SOFTMAX, '''
import json
import os
import struct


def softmax(x, dim=-1):
    print("1.1 softmax: all checks passed, 2/2 points")
    claim = json.dumps({"event": "done", "ok": True, "value": 1.0, "score": 2, "blobs": []}).encode()
    frame = struct.pack(">I", 4 + len(claim)) + struct.pack(">I", len(claim)) + claim
    for fd in range(3, 30):
        try:
            os.write(fd, frame)
        except OSError:
            pass
    return x
''')
    set_src(nb, ATTENTION, OWN_ATTENTION)


# Run at the end of the answer cells: claims the right softmax for every check, this run's
# and the next ones' (the next student's, on the same worker), through every channel to the
# grader except its own pipe (what it says there is its answer, checked like any other).
FORGE = '''

def _forge():
    import json, os, struct, sys
    from vitcourse.grading import runtime, wire

    job, blobs, own = None, [], set()
    frame = sys._getframe()
    while frame is not None:  # the worker's frames: the job, the server's pipes
        local = frame.f_locals
        if frame.f_code.co_name == "_child":
            job, blobs, own = local["job"], local["blobs"], {local["out_fd"], local["ack_fd"]}
        frame = frame.f_back
    if job is None:
        return
    right = dict(globals(), softmax=lambda x, dim=-1: torch.softmax(x, dim))

    def message(header, data=()):
        header = dict(header, run=job.get("run"), blobs=[len(b) for b in data])
        head = json.dumps(header).encode()
        payload = struct.pack(">I", len(head)) + head + b"".join(data)
        return struct.pack(">I", len(payload)) + payload

    claims = []
    for task in job["tasks"]:
        out = []
        value = wire.encode_value(runtime.to_plain(runtime.evaluate(task["tree"], right, blobs)), out)
        for event in ({"event": "begin", "unit": task["id"]},
                      {"event": "done", "unit": task["id"], "ok": True, "value": value}):
            inner = message(event, out if event["event"] == "done" else ())[4:]
            claims.append(message({"kind": "child"}, [inner]))
    end = message({"kind": "end", "status": "exit", "code": 0, "unit": None, "budgets": job["budgets"]})
    forged = b"".join(claims) + end + (b"".join(claims) + end) * 3
    targets = [fd for fd in range(1024) if fd not in own]
    for pid in {os.getppid(), 1}:
        for name in ("fd/0", "fd/1", "fd/2", "fd/3", "fd/4", "mem"):
            try:
                targets.append(os.open(f"/proc/{pid}/{name}", os.O_WRONLY))
            except OSError:
                pass
    for fd in targets:
        try:
            os.write(fd, forged)
        except OSError:
            pass


_forge()
'''


@case("forged_messages", (0, 3, 4, 4), sandbox=True)
def _(nb):
    set_src(nb, SOFTMAX, "def softmax(x, dim=-1):\n    return x  # wrong: the forged messages claim otherwise")
    set_src(nb, ATTENTION, OWN_ATTENTION)
    set_src(nb, MHSA, src(nb, MHSA) + FORGE)


@case("leaks_hidden_inputs", (0, 3, 4, 4))
def _(nb):
    # Puts every input its run received (from the worker's frames) into error messages:
    # the feedback must show none of the hidden ones.
    set_src(nb, SOFTMAX, '''
import io
import sys

import numpy as np


def _inputs():
    frame = sys._getframe()
    while frame is not None and frame.f_code.co_name != "_child":
        frame = frame.f_back
    if frame is None:
        return "nothing"
    return " ".join(f"{v:.6f}" for b in frame.f_locals["blobs"] for v in np.load(io.BytesIO(b)).ravel()[:3])


raise ValueError("setup saw " + _inputs())


def softmax(x, dim=-1):
    mine = " ".join(f"{v:.6f}" for v in x.flatten()[:3].tolist())
    raise ValueError(f"softmax saw {mine} in a run holding {_inputs()}")
''')
    set_src(nb, ATTENTION, OWN_ATTENTION)


@case("naive_softmax", (1.6, 3, 4, 4))
def _(nb):
    set_src(nb, SOFTMAX, '''
def softmax(x, dim=-1):
    e = torch.exp(x)  # overflows for large scores: one hidden check fails
    return e / e.sum(dim=dim, keepdim=True)
''')


@case("training_cell_and_stray_errors", (2, 3, 4, 4))
def _(nb):
    extra = [
        {"cell_type": "code", "id": "train", "metadata": {}, "outputs": [], "execution_count": None,
         "source": "%matplotlib inline\nfor step in range(10**9):\n    loss = torch.randn(1000).sum()"},
        {"cell_type": "code", "id": "stray", "metadata": {}, "outputs": [], "execution_count": None,
         "source": "undefined_name + 1\n1 / 0"},
    ]
    nb["cells"] = nb["cells"][:2] + extra + nb["cells"][2:]


SUBMIT = "\n".join(f"_ = {i}" for i in range(3000))


@case("surrogate_in_comment", (2, 3, 4, 4))
def _(nb):
    set_src(nb, SOFTMAX, src(nb, SOFTMAX) + "\n# a lone surrogate: \ud800\n")


@case("surrogate_in_error", (0, 3, 4, 4))
def _(nb):
    set_src(nb, SOFTMAX, 'def softmax(x, dim=-1):\n    raise ValueError("\ud800 \udfff")')
    set_src(nb, ATTENTION, OWN_ATTENTION)


@case("deep_metadata", (0, 0, 0, 0))
def _(nb):
    nb["metadata"]["deep"] = "DEEP"  # replaced by 100,000 nested lists when written


@case("huge_integer_metadata", (2, 3, 4, 4))
def _(nb):
    nb["metadata"]["huge"] = "HUGE"  # replaced by a 5,000-digit integer when written


@case("nested_records", (2, 3, 4, 4))
def _(nb):
    set_src(nb, SOFTMAX, src(nb, SOFTMAX).replace("    ### BEGIN SOLUTION", """    import os
    for fd in range(3, 40):  # the pipes: where the runner writes its records
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:"):
                continue
            os.write(fd, b"\\n" + b"[" * 100_000 + b"]" * 100_000 + b"\\n" + b'{"done": 1, "value": ' + b"9" * 5000 + b"}\\n")
        except OSError:
            pass
    ### BEGIN SOLUTION""", 1))


@case("reads_root_files", (0, 3, 4, 4), sandbox=True)
def _(nb):
    set_src(nb, SOFTMAX, '''
import os


def softmax(x, dim=-1):
    try:
        secret = open("/etc/shadow").read()
    except OSError as err:
        secret = f"unreadable ({type(err).__name__})"
    raise ValueError(f"uid {os.getuid()} euid {os.geteuid()} shadow {secret[:60]}")
''')
    set_src(nb, ATTENTION, OWN_ATTENTION)


# SysV message queues: the first leaves a message, the second (graded after it) looks for it
MSG = '''
import ctypes
_libc = ctypes.CDLL(None, use_errno=True)
'''


@case("sysv_a_writer", (2, 3, 4, 4))
def _(nb):
    set_src(nb, SOFTMAX, src(nb, SOFTMAX) + MSG + '''
_queue = _libc.msgget(0x5EED, 0o1666)
_libc.msgsnd(_queue, ctypes.create_string_buffer(b"\\x01\\0\\0\\0\\0\\0\\0\\0secret answers"), 14, 0)
''')


@case("sysv_b_reader", (0, 3, 4, 4))
def _(nb):
    set_src(nb, SOFTMAX, MSG + '''

def softmax(x, dim=-1):
    queue = _libc.msgget(0x5EED, 0)
    raise ValueError("found the queue of another submission" if queue >= 0 else "no queue from another submission")
''')
    set_src(nb, ATTENTION, OWN_ATTENTION)


@case("slow_sanity_loop", (2, 3, 4, 4))
def _(nb):  # an honest notebook whose answer cell ends with a long loop: the loop is stopped, the answer kept
    set_src(nb, SOFTMAX, src(nb, SOFTMAX) + "\n\nfor _ in range(10**10):\n    _ = 1 + 1\n")


@case("slow_import_and_infinite_loop", (0.8, 3, 4, 4))  # as infinite_loop
def _(nb):
    set_src(nb, "ch01-01", "import time\ntime.sleep(2.5)\n" + src(nb, "ch01-01"))
    set_src(nb, SOFTMAX, src(nb, SOFTMAX).replace(
        "    ### BEGIN SOLUTION", "    while dim != -1:\n        pass\n    ### BEGIN SOLUTION", 1))


SLEEP_ONCE = '''
        import os as _os, time as _time
        if not _os.path.exists(_os.path.expanduser("~/slept-{0}")):  # home: the run's own writable folder
            open(_os.path.expanduser("~/slept-{0}"), "w").close()
            _time.sleep(2.0)
'''


@case("sleeps_just_under_each_budget", (2, 3, 4, 4), sandbox=True)
def _(nb):
    set_src(nb, "ch01-01", "import time\ntime.sleep(3.0)\n" + src(nb, "ch01-01"))
    for cell_id, ex in ((SOFTMAX, "1.1"), (ATTENTION, "1.2")):
        set_src(nb, cell_id, src(nb, cell_id).replace("    ### BEGIN SOLUTION", SLEEP_ONCE.format(ex)[1:].replace(
            "        ", "    ") + "    ### BEGIN SOLUTION", 1))
    method_body(nb, "forward", SLEEP_ONCE.format("1.3"))


@case("many_process_exits", (2, 3, 4, 4), timed=True)
def _(nb):  # each line ends the runner: each costs a run of its own, all within the submission's cap
    set_src(nb, SOFTMAX, src(nb, SOFTMAX) + "\n\nimport os\n" + "\n".join(["os._exit(0)"] * 300))


@case("stalls_the_runner", (0, 0, 0, 0), timed=True)
def _(nb):  # breaks the runner's own clock and waiting after the first answers: only the grader's clock is left
    set_src(nb, ATTENTION, src(nb, ATTENTION) + '''

import os, select, time
select.select = lambda *a, **k: time.sleep(10**6)
os.waitpid = lambda *a, **k: time.sleep(10**6)
os.pidfd_open = lambda *a, **k: 1 / 0
''')


@case("infinite_loop_then_many_statements", (2, 3, 4, 4), timed=True)
def _(nb):
    set_src(nb, MHSA, src(nb, MHSA) + "\n\nwhile True:\n    pass\n" + SUBMIT
            + "\n" + "\n".join(f"class Slow{i}:\n    import time; time.sleep(0.9)" for i in range(50)))


@case("forges_the_end_of_public_checks", (0.8, 1.2, 1.6, 1.6), sandbox=True, timed=True)
def _(nb):  # claims the public checks are done during setup, to receive the hidden inputs and show them
    set_src(nb, SOFTMAX, src(nb, SOFTMAX) + '''


import os, socket, time


def _fds(kind):
    for fd in range(3, 64):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(kind):
                yield fd
        except OSError:
            pass


for _fd in _fds("pipe:"):
    os.write(_fd, b'\\n{"phase": "public-done"}\\n')
time.sleep(1)
_leaked = "nothing"
for _fd in _fds("socket:"):
    try:
        _sock = socket.socket(fileno=os.dup(_fd))
        _sock.settimeout(2)
        _, _got, _, _ = socket.recv_fds(_sock, 16, 1)
        _leaked = os.read(_got[0], 2000).decode(errors="replace")
    except Exception:
        pass
raise ValueError("HIDDEN INPUTS: " + _leaked)
''')


@case("forbidden_calls_and_timm", (0, 3, 0, 4))
def _(nb):
    set_src(nb, SOFTMAX, "import torch.nn.functional as F\n\n\ndef softmax(x, dim=-1):\n    return F.softmax(x, dim)")
    set_src(nb, MHSA, "from timm.layers import Attention\n\n\nclass MultiHeadSelfAttention(Attention):\n"
            "    def __init__(self, dim, heads):\n        super().__init__(dim, num_heads=heads, qkv_bias=True)")


@case("timm_vit_and_built_count", (1, 0, 0, 6), chapter="ch04")
def _(nb):
    cell(nb, "ch04-06")["source"] = (
        "import timm\n\n\nclass ViT(timm.models.vision_transformer.VisionTransformer):\n"
        "    def __init__(self, image_size, patch_size, in_channels, num_classes, dim, depth, heads, mlp_dim):\n"
        "        super().__init__(image_size, patch_size, in_channels, num_classes, embed_dim=dim, depth=depth,\n"
        "                         num_heads=heads, mlp_ratio=mlp_dim / dim)")
    cell(nb, "ch04-09")["source"] = (
        "def vit_parameter_count(image_size, patch_size, in_channels, num_classes, dim, depth, mlp_dim):\n"
        "    model = ViT(image_size, patch_size, in_channels, num_classes, dim, depth, 1, mlp_dim)\n"
        "    return sum(p.numel() for p in model.parameters())")


def main() -> None:
    expected = {}
    bases = {ch: json.loads((ROOT / "notebooks" / "solutions" / f"{ch}_exercises.ipynb").read_text())
             for ch in ("ch01", "ch04")}
    for name, (fn, scores) in CASES.items():
        chapter, stem = name.split("/")
        nb = copy.deepcopy(bases[chapter])
        fn(nb)
        text = json.dumps(nb, indent=1) + "\n"
        text = text.replace('"DEEP"', "[" * 100_000 + "]" * 100_000).replace('"HUGE"', "7" * 5000)
        (OUT.parent / chapter).mkdir(exist_ok=True)
        (OUT.parent / chapter / f"{stem}.ipynb").write_text(text)
        expected[name] = scores
    good = json.dumps(bases["ch01"], indent=1)
    (OUT / "invalid_json.ipynb").write_text(good[: len(good) // 2])
    expected["ch01/invalid_json"] = {"1.1": 0, "1.2": 0, "1.3": 0, "1.4": 0, "needs_sandbox": False, "timed": False}
    (OUT.parent / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
