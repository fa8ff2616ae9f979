"""The student side of grading: a warm fork server and the short-lived child it forks per run.

The grader starts one server per worker, inside the sandbox when there is one
(``python -c "from vitcourse.grading.worker import serve; serve()"``). The
server imports torch once, then for every *run* the grader sends it forks a
fresh child, which

1. closes every file descriptor but its own two pipes (never the server's pipes
   to the grader), applies the resource limits (CPU time, address space, file
   size, processes), moves to its own empty working directory and silences
   stdout/stderr;
2. executes the notebook statements the grader selected, one by one;
3. evaluates each task (:mod:`vitcourse.grading.runtime`) and sends back the
   plain result or the error, announcing each unit before it starts.

The server relays the child's messages, enforces the wall-time budget of each
group of units (the setup, then one budget per exercise), kills the child and
every process it left behind when it ends, wipes the scratch directory, and
reports how the child ended. It never compares anything: the grader does.

Only the server writes to the grader. Every message it sends carries the run id
the grader chose for the run (random, so no submission can know the next one);
the child's messages travel inside them, from a pipe made for that child alone.

Imported inside the sandbox: standard library and NumPy (plus what is preloaded).
"""

from __future__ import annotations

import argparse
import builtins
import ctypes
import os
import resource
import select
import signal
import struct
import sys
import time
import traceback

from . import runtime, wire

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
GRACE = 3.0  # seconds a child may spend between units (or exiting) before it counts as hung


def _prctl(option: int, value: int) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the limits below still apply
        pass


# --- the child -------------------------------------------------------------------


def _vm_size() -> int:
    """This process's current address-space size in bytes."""
    with open("/proc/self/status") as f:
        return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize")), 0)


def _set_limits(limits: dict) -> None:
    """Apply the resource limits of one run (values in seconds and bytes)."""
    def lim(kind, value):
        try:
            resource.setrlimit(kind, (value, value))
        except (ValueError, OSError):
            pass

    lim(resource.RLIMIT_CPU, int(limits["cpu"]))
    lim(resource.RLIMIT_AS, _vm_size() + int(limits["memory"]))  # on top of what is mapped now
    lim(resource.RLIMIT_FSIZE, int(limits["file_size"]))
    lim(resource.RLIMIT_NPROC, int(limits["processes"]))
    lim(resource.RLIMIT_CORE, 0)
    lim(resource.RLIMIT_NOFILE, 256)


# seccomp: the child may start threads but no new processes (RLIMIT_NPROC does not bind root).
_ARCH = {"x86_64": (0xC000003E, {"fork": 57, "vfork": 58, "clone": 56, "clone3": 435, "ptrace": 101}),
         "aarch64": (0xC00000B7, {"clone": 220, "clone3": 435, "ptrace": 117})}
_CLONE_THREAD = 0x00010000


def _bpf(code: int, k: int, jt: int = 0, jf: int = 0) -> tuple:
    return (code, jt, jf, k)


def no_new_processes() -> bool:
    """Install a seccomp filter: ``fork``/``vfork``/``clone`` of a process and ``ptrace`` fail with EPERM.

    Threads (``clone`` with ``CLONE_THREAD``) still work; ``clone3`` answers ENOSYS so the C
    library falls back to ``clone``, which the filter can inspect. Returns False where
    seccomp is unavailable (then only RLIMIT_NPROC limits processes).
    """
    import platform

    arch = _ARCH.get(platform.machine())
    if arch is None:
        return False
    audit, nr = arch
    ld, jeq, jset, ret = 0x20, 0x15, 0x45, 0x06
    allow, deny, enosys, kill = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38, 0x80000000
    blocked = [nr[n] for n in ("fork", "vfork", "ptrace") if n in nr]
    prog = [_bpf(ld, 4), _bpf(jeq, audit, 1, 0), _bpf(ret, kill),  # foreign architecture: kill
            _bpf(ld, 0), _bpf(0x35, 0x40000000, 0, 1), _bpf(ret, deny)]  # x32 system calls: deny
    for number in blocked:
        prog += [_bpf(jeq, number, 0, 1), _bpf(ret, deny)]
    prog += [_bpf(jeq, nr["clone3"], 0, 1), _bpf(ret, enosys),
             _bpf(jeq, nr["clone"], 0, 4),  # not clone: jump to the final "allow"
             _bpf(ld, 16), _bpf(jset, _CLONE_THREAD, 0, 1),  # clone flags (low 32 bits)
             _bpf(ret, allow),  # a new thread
             _bpf(ret, deny),  # a new process
             _bpf(ret, allow)]
    try:
        libc = ctypes.CDLL(None, use_errno=True)

        class Filter(ctypes.Structure):
            _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                        ("k", ctypes.c_uint)]

        class Program(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

        filters = (Filter * len(prog))(*[Filter(*f) for f in prog])
        program = Program(len(prog), filters)
        if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
            return False
        return libc.prctl(22, 2, ctypes.byref(program), 0, 0) == 0  # PR_SET_SECCOMP, FILTER
    except (OSError, AttributeError):
        return False


def _describe_error(err: BaseException) -> dict:
    """The fields of a failed unit's message: ``error``, ``error_type`` and ``where``.

    ``error`` is ``Type: message (cell N, line L)`` with the innermost notebook location,
    short; the grader shows it only where it cannot reveal hidden inputs, and otherwise
    just the type and the location.
    """
    try:
        where = ""
        for frame in traceback.extract_tb(err.__traceback__):
            if frame.filename.startswith("<cell"):
                where = f"{frame.filename[1:-1]}, line {frame.lineno}"
        name, text = type(err).__name__, str(err)
        if len(text) > 300:
            text = text[:300] + " ..."
        error = (f"{name}: {text}" if text else name) + (f" ({where})" if where else "")
        return {"error": error, "error_type": name, "where": where}
    except BaseException:  # noqa: BLE001 - e.g. MemoryError while formatting
        return {"error": "an error that could not be described", "error_type": "", "where": ""}


def _close_fds_except(*keep: int) -> None:
    """Close every file descriptor above 2 except ``keep``: the child inherits none of the server's."""
    try:
        top = max(int(fd) for fd in os.listdir("/proc/self/fd")) + 1
    except (OSError, ValueError):
        top = os.sysconf("SC_OPEN_MAX")
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, max(top, low))


def _child(job: dict, blobs: list[bytes], out_fd: int, ack_fd: int, workdir: str) -> None:
    """Run one job's statements and tasks, sending messages to ``out_fd``.

    After each message the child waits for the server's acknowledgement on ``ack_fd``:
    by then the server has passed the message on to the grader, so whatever the student
    code does next (even killing the server) the grader knows which unit was running.
    """
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    def send(header: dict, data=()) -> None:
        wire.write_frame(out_fd, wire.pack(header, list(data)))
        if not os.read(ack_fd, 1):
            os._exit(71)  # the server is gone

    _set_limits(job["limits"])
    no_new_processes()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    if devnull > 2:
        os.close(devnull)
    os.chdir(workdir)
    os.environ.update(HOME=workdir, TMPDIR=workdir, MPLCONFIGDIR=workdir, MPLBACKEND="Agg")
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    for stmt in job["statements"]:
        send({"event": "begin", "unit": stmt["id"]})
        error = None
        try:
            code = compile("\n" * (stmt["line"] - 1) + stmt["src"], stmt["file"], "exec")
            exec(code, namespace)  # noqa: S102 - student code, inside the sandbox
        except BaseException as err:  # noqa: BLE001 - SystemExit too: it must not end the run
            error = _describe_error(err)
        send({"event": "done", "unit": stmt["id"], "ok": error is None, **(error or {})})
    for task in job["tasks"]:
        send({"event": "begin", "unit": task["id"]})
        runtime.seed_all(0)
        try:
            plain = runtime.to_plain(runtime.evaluate(task["tree"], namespace, blobs))
            out: list[bytes] = []
            header = {"event": "done", "unit": task["id"], "ok": True, "value": wire.encode_value(plain, out)}
            if sum(map(len, out)) > wire.MAX_FRAME - 2**20:
                raise runtime.Unsupported("an output too large to send back")
        except runtime.Unsupported as err:
            header, out = {"event": "done", "unit": task["id"], "ok": False, "error": f"returned {err}",
                           "error_type": "Unsupported", "where": ""}, []
        except BaseException as err:  # noqa: BLE001
            header, out = {"event": "done", "unit": task["id"], "ok": False, **_describe_error(err)}, []
        send(header, out)


# --- the server ------------------------------------------------------------------


def _descendants() -> list[int]:
    """Every process below this one (orphans come back to it: it is a child subreaper)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
                parents[int(entry)] = int(stat[stat.rfind(b")") + 2 :].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = [], [os.getpid()]
    while frontier:
        parent = frontier.pop()
        kids = [pid for pid, ppid in parents.items() if ppid == parent]
        found.extend(kids)
        frontier.extend(kids)
    return found


def _kill_all() -> None:
    """SIGKILL every descendant until none is left, and reap them."""
    for _ in range(100):
        pids = _descendants()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pid = 0
            if pid == 0:
                break
        if not pids:
            return
        time.sleep(0.01)


def _empty(directory: str) -> None:
    """Remove what ``directory`` holds, making it usable first (the student code may have ``chmod 0``-ed it)."""
    os.chmod(directory, 0o700)
    for entry in os.listdir(directory):
        path = os.path.join(directory, entry)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                _empty(path)
                os.rmdir(path)
            else:
                os.unlink(path)
        except OSError:
            pass


def _wipe(directory: str) -> bool:
    """Empty ``directory`` (the run's scratch space) without removing it; True if it is empty now.

    Modes the student code set (a folder it made unreadable, or ``chmod 0`` on the
    scratch space itself) are reset first: the next run must find nothing of this one.
    """
    try:
        _empty(directory)
        return not os.listdir(directory)
    except Exception:  # noqa: BLE001 - e.g. RecursionError on a very deep tree
        return False


class _Relay:
    """Split the child's byte stream into frames and follow which unit is running."""

    def __init__(self, job: dict, send, ack_fd: int) -> None:
        self.ack_fd = ack_fd
        self.groups = {u["id"]: u["group"] for u in job["statements"] + job["tasks"]}
        self.budget = dict(job["budgets"])  # seconds left per group
        self.send = send
        self.buffer = b""
        self.total = 0
        self.current: str | None = None
        self.started_at = time.monotonic()
        self.seen: set[str] = set()

    def feed(self, data: bytes) -> str | None:
        """Consume bytes; return a reason string if the child broke the protocol or sent too much."""
        self.buffer += data
        self.total += len(data)
        if self.total > 4 * wire.MAX_FRAME:
            return "sent more output than the grader accepts"
        while len(self.buffer) >= 4:
            (n,) = struct.unpack(">I", self.buffer[:4])
            if n > wire.MAX_FRAME:
                return "sent an output larger than the grader accepts"
            if len(self.buffer) < 4 + n:
                break
            payload, self.buffer = self.buffer[4 : 4 + n], self.buffer[4 + n :]
            try:
                header, _ = wire.unpack(payload)
            except wire.WireError:
                return "sent bytes that are not grader messages"
            self._track(header)
            self.send({"kind": "child"}, [payload])
            os.write(self.ack_fd, b"\x01")
        return None

    def _track(self, header: dict) -> None:
        unit, now = header.get("unit"), time.monotonic()
        if not isinstance(unit, str):
            return
        if header.get("event") == "begin" and unit in self.groups and unit not in self.seen:
            self._close(now)
            self.seen.add(unit)
            self.current, self.started_at = unit, now
        elif header.get("event") == "done" and unit == self.current:
            self._close(now)

    def _close(self, now: float) -> None:
        if self.current is not None:
            group = self.groups[self.current]
            self.budget[group] = self.budget.get(group, 0.0) - (now - self.started_at)
        self.current, self.started_at = None, now

    def deadline(self) -> float:
        if self.current is None:
            return self.started_at + GRACE
        return self.started_at + max(self.budget.get(self.groups[self.current], 0.0), 0.0)


def _run(job: dict, blobs: list[bytes], send_to_grader, scratch: str, counter: int) -> None:
    def send(header: dict, data=()) -> None:  # every message names the run it belongs to
        send_to_grader(dict(header, run=job.get("run")), data)

    workdir = os.path.join(scratch, f"run{counter}")
    os.mkdir(workdir, 0o700)
    rfd, wfd = os.pipe()
    ack_r, ack_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 0
        try:
            os.setsid()
            _close_fds_except(wfd, ack_r)  # above all the server's pipes to and from the grader
            _child(job, blobs, wfd, ack_r, workdir)
        except BaseException as err:  # noqa: BLE001 - reported to the grader, never raised
            try:
                wire.write_frame(wfd, wire.pack({"event": "crash", **_describe_error(err),
                                                 "trace": traceback.format_exc()[-2000:]}))
            except BaseException:  # noqa: BLE001
                pass
            code = 70
        os._exit(code)
    os.close(wfd)
    os.close(ack_r)
    relay = _Relay(job, send, ack_w)
    end: dict = {"kind": "end"}
    status, eof = None, False
    while True:
        now = time.monotonic()
        if now > relay.deadline():
            end.update(status="timeout", unit=relay.current)
            break
        ready, _, _ = select.select([rfd], [], [], min(0.1, max(relay.deadline() - now, 0.0)))
        if ready:
            data = os.read(rfd, 1 << 20)
            if data:
                problem = relay.feed(data)
                if problem:
                    end.update(status="output", unit=relay.current, reason=problem)
                    break
                continue
            eof = True
        if status is None:
            done_pid, raw = os.waitpid(pid, os.WNOHANG)
            status = raw if done_pid else None
        if status is not None:  # exited, and nothing more is waiting in the pipe
            if os.WIFSIGNALED(status):
                end.update(status="signal", signal=os.WTERMSIG(status), unit=relay.current)
            else:
                end.update(status="exit", code=os.WEXITSTATUS(status), unit=relay.current)
            break
        if eof:
            time.sleep(0.05)
    relay._close(time.monotonic())
    os.close(rfd)
    os.close(ack_w)
    _kill_all()
    if not _wipe(scratch):
        end["restart"] = True  # something of this run is left behind: the grader starts a new server
    end["budgets"] = relay.budget
    send(end)


def serve(argv: list[str] | None = None) -> None:
    """Fork-server main loop: read jobs on stdin, write messages on stdout (see module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scratch", required=True)
    parser.add_argument("--preload", default="torch")
    args = parser.parse_args(argv)
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    _prctl(PR_SET_DUMPABLE, 0)  # children may not ptrace or read this process's memory
    _prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans of a child come back here to be killed
    # In the sandbox the server is PID 1 of its namespace: its children can send it only the
    # signals it handles, and it handles none (Python's SIGINT handler would let them end it).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    in_fd, out_fd = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    for name in filter(None, args.preload.split(",")):
        __import__(name)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    send = lambda header, data=(): wire.write_frame(out_fd, wire.pack(header, list(data)))  # noqa: E731
    import numpy.random  # noqa: F401 - every child seeds it: import it once here

    send({"kind": "ready", "pid": os.getpid(), "vm_size": _vm_size()})
    counter = 0
    while True:
        payload = wire.read_frame(in_fd)
        if payload is None:
            return
        header, blobs = wire.unpack(payload)
        if header.get("op") != "run":
            return
        counter += 1
        _run(header, blobs, send, args.scratch, counter)


if __name__ == "__main__":  # pragma: no cover
    serve()
