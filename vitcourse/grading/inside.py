"""What runs inside the sandbox: a warm zygote, and per submission one sealed runner.

The grader starts one zygote per worker (``python -m vitcourse.grading.inside``), inside
bubblewrap when it can. The zygote drops to the worker's unprivileged uid when started as
root, imports torch (and JAX) once, and then, for every submission, forks a process that

1. enters new user, mount, IPC, network, UTS and PID namespaces and mounts an empty
   :data:`SCRATCH` of its own (its home, working folder and ``TMPDIR``), so nothing of one
   submission is visible to the next (the sandbox's ``/tmp`` is read-only);
2. forks the *runner*, PID 1 of the new PID namespace, which enters one more user
   namespace (so it holds no capability over anything it can reach), applies resource
   limits, and runs the notebook statements the grader selected, each setup statement
   within what is left of the setup budget;
3. forks one child per check; the child evaluates the check's task and writes the plain
   result as one JSON line; the runner kills it when the exercise's time is used up.

Everything is written to a pipe the grader made for this submission alone, one JSON
record per line, as :mod:`.protocol` defines them. A run gets either the public checks or the hidden ones, never both: the
grader runs the hidden checks in runs of their own, whose only output it uses is pass or fail.
Nothing here compares, scores or enforces a deadline that matters: the grader does, outside,
from what it observes; it ends a run by killing the runner, PID 1 of the submission's PID
namespace, and the kernel then ends every process the submission started, whatever it did
with its process group or its parent-death signal.
Imported inside the sandbox: standard library, NumPy and what is preloaded.
"""

from __future__ import annotations

import builtins
import ctypes
import json
import math
import os
import resource
import select
import signal
import socket
import sys
import tempfile
import time
import traceback

from . import runtime
from .linux import (
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWUSER,
    CLONE_NEWUTS,
    CLONE_THREAD,
    MS_NODEV,
    MS_NOSUID,
    MS_PRIVATE,
    MS_REC,
    PR_SET_DUMPABLE,
    PR_SET_PDEATHSIG,
)
from .protocol import (
    BEGIN,
    BUDGET,
    DONE,
    END,
    EXIT,
    FATAL,
    SETUP_TIMEOUT,
    SIGNAL,
    SKIPPED,
    TIMEOUT,
    UNSUPPORTED,
    encode,
)

_libc = ctypes.CDLL(None, use_errno=True)


def _sys(result: int, what: str) -> None:
    if result != 0:
        raise OSError(ctypes.get_errno(), f"{what} failed")


def _enter_user_namespace(extra: int = 0) -> None:
    """``unshare`` a new user namespace (plus ``extra``), mapping only our own uid and gid."""
    uid, gid = os.getuid(), os.getgid()
    _sys(_libc.unshare(CLONE_NEWUSER | extra), "unshare")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


SCRATCH = "/scratch"
"""Inside the sandbox, the one writable folder: a fresh tmpfs per submission. Not ``/tmp``, because the Python
environment may live under ``/tmp`` (a checkout made with ``mktemp``), and a tmpfs there would hide it."""


def isolate() -> None:
    """Steps 1-2 of the module docstring for the calling (single-threaded, forked) process."""
    _libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
    _enter_user_namespace(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWNET | CLONE_NEWUTS | CLONE_NEWPID)
    _sys(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "making mounts private")
    _sys(_libc.mount(b"tmpfs", SCRATCH.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=256m,mode=1777"),
         f"mounting {SCRATCH}")


def _write(fd: int, kind: str, key: str, **fields) -> None:
    """Write one record (:func:`.protocol.encode`) to ``fd``."""
    data = encode(kind, key, **fields)
    while data:
        data = data[os.write(fd, data):]


def _describe(err: BaseException) -> dict:
    """The error as a record; never raises, whatever the exception's ``__str__`` or file names hold."""
    where = ""
    try:  # no source lines: a file name may be anything, a lone surrogate included
        for frame in traceback.StackSummary.extract(traceback.walk_tb(err.__traceback__), lookup_lines=False):
            if isinstance(frame.filename, str) and frame.filename.startswith("<cell"):
                where = f"{frame.filename[1:-1]}, line {frame.lineno}"
    except Exception:  # noqa: BLE001
        where = ""
    try:
        text = str(err)[:300] if not isinstance(err, RecursionError) else "maximum recursion depth exceeded"
    except BaseException:  # noqa: BLE001 - a __str__ that raises, or exits
        text = "(its message could not be read)"
    name = type(err).__name__ if isinstance(type(err).__name__, str) else "Exception"
    return {"type": name, "where": where, "error": f"{name}: {text}" + (f" ({where})" if where else "")}


def _limit(kind: int, value: int) -> None:
    try:
        resource.setrlimit(kind, (value, value))
    except (ValueError, OSError):
        pass


def _no_new_processes() -> None:
    """A libseccomp filter: new processes (fork, or clone without CLONE_THREAD) and ptrace fail."""
    try:
        import errno

        import pyseccomp as sc
    except (ImportError, OSError, AttributeError, RuntimeError):  # no libseccomp here: the process limit still applies
        return
    f = sc.SyscallFilter(sc.ALLOW)
    for name in ("fork", "vfork", "ptrace"):
        f.add_rule(sc.ERRNO(errno.EPERM), name)
    f.add_rule(sc.ERRNO(errno.EPERM), "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD, 0))
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")  # the C library falls back to clone, checked above
    f.load()


class _Timeout(BaseException):
    pass


_armed = False


def _alarm(*_):
    if _armed:
        raise _Timeout()


def _run_statements(job: dict, namespace: dict, out: int) -> None:
    global _armed
    remaining, grace = float(job["setup_seconds"]), 2.0  # grace: for definitions once the budget is used up
    signal.signal(signal.SIGALRM, _alarm)
    for st in job["statements"]:
        allowance = remaining if remaining > 0 else (grace if st["definition"] else 0.0)
        if allowance <= 0:
            _write(out, DONE, st["id"], ok=False, type=SKIPPED, error="skipped: the setup time was used up")
            continue
        _write(out, BEGIN, st["id"])
        start, error = time.monotonic(), None
        try:
            try:
                _armed = True
                signal.setitimer(signal.ITIMER_REAL, allowance, 0.05)  # fires again until cleared
                exec(compile("\n" * (st["line"] - 1) + st["src"], f"<cell {st['cell']}>", "exec"), namespace)
            finally:
                _armed = False  # first: from here on the alarm raises nothing
                signal.setitimer(signal.ITIMER_REAL, 0)
        except _Timeout:
            error = {"type": SETUP_TIMEOUT, "error": "it did not finish within the setup time", "where": ""}
        except BaseException as err:  # noqa: BLE001 - SystemExit too: it must not end the run
            error = _describe(err)
        spent = time.monotonic() - start
        grace -= spent if remaining <= 0 else max(spent - remaining, 0)
        remaining -= spent
        _write(out, DONE, st["id"], ok=error is None, **(error or {}))


def _operator_watch(watched: frozenset):
    """A torch dispatch mode noting which of the ``watched`` operators run (``"aten._softmax"``, ...;
    ``"autograd"`` for any operator that autograd's engine runs), however the code reached them:
    by name, alias, ``operator.attrgetter``, ``pkgutil.resolve_name`` or a private function."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Watch(TorchDispatchMode):
        seen: set = set()

        @classmethod
        def _should_skip_dynamo(cls) -> bool:  # else defining the class imports torch._dynamo (seconds)
            return False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket)
            if name in watched:
                self.seen.add(name)
            if "autograd" in watched and torch._C._current_autograd_node() is not None:
                self.seen.add("autograd")
            return func(*args, **(kwargs or {}))

    return Watch()


def _evaluate(check: dict, namespace: dict) -> tuple[object, list[str]]:
    """The check's value and the watched operators it ran (see :func:`_operator_watch`)."""
    task = runtime.decode(check["task"])
    watched = frozenset(check.get("ops") or ())
    if not watched or "torch" not in sys.modules:
        return runtime.evaluate(task, namespace), []
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    watch = _operator_watch(watched)
    with watch:
        value = runtime.evaluate(task, namespace)
        intact = any(mode is watch for mode in _get_current_dispatch_mode_stack())
    return value, sorted(watch.seen) + ([] if intact else ["a change to the operator watch"])


def _check_child(check: dict, namespace: dict, out: int, seconds: float) -> None:
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    _limit(resource.RLIMIT_CPU, math.ceil(seconds) + 1)
    _no_new_processes()
    runtime.seed_all(0)
    try:
        value, ops = _evaluate(check, namespace)
        result = {"ok": True, "value": runtime.encode(runtime.to_plain(value)), **({"ops": ops} if ops else {})}
    except runtime.Unsupported as err:
        result = {"ok": False, "type": UNSUPPORTED, "error": f"returned {err}", "where": ""}
    except BaseException as err:  # noqa: BLE001
        result = {"ok": False, **_describe(err)}
    _write(out, DONE, check["id"], **result)


def _wait(pid: int, seconds: float) -> int | None:
    """The wait status of ``pid``, or None after ``seconds`` (it is then killed)."""
    try:
        fd = os.pidfd_open(pid)
        ready = select.select([fd], [], [], max(seconds, 0))[0]
        os.close(fd)
    except (AttributeError, OSError):  # no pidfd: poll
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and os.waitpid(pid, os.WNOHANG)[0] == 0:
            time.sleep(0.005)
        ready = True
    if not ready:
        os.kill(pid, signal.SIGKILL)
    status = os.waitpid(pid, 0)[1]
    return status if ready else None


def _run_checks(checks: list, budgets: dict, namespace: dict, out: int) -> None:
    for check in checks:
        group = check["exercise"]
        if budgets[group] <= 0:
            _write(out, END, check["id"], status=BUDGET)
            continue
        _write(out, BEGIN, check["id"])
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            try:
                _check_child(check, namespace, out, budgets[group])
            finally:
                os._exit(0)
        status = _wait(pid, budgets[group])
        budgets[group] -= time.monotonic() - start
        if status is None:
            end = {"status": TIMEOUT}
        elif os.WIFSIGNALED(status):
            end = {"status": SIGNAL, "signal": os.WTERMSIG(status)}
        else:
            end = {"status": EXIT, "code": os.WEXITSTATUS(status)}
        _write(out, END, check["id"], **end)


def runner(out: int, job: dict) -> None:
    """Run one submission's statements and checks (steps 2-3 of the module docstring)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # PID 1 ignores what it does not handle: nothing can end it
    with open("/proc/self/status") as f:
        mapped = next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize")), 0)
    _limit(resource.RLIMIT_AS, mapped + int(job["memory"]))
    _limit(resource.RLIMIT_FSIZE, 64 * 2**20)
    _limit(resource.RLIMIT_CORE, 0)
    _limit(resource.RLIMIT_NOFILE, 256)
    if job.get("processes"):
        _limit(resource.RLIMIT_NPROC, int(job["processes"]))
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")  # if memory runs out, the kernel ends student code first
    except OSError:
        pass
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.chdir(job["workdir"] or tempfile.mkdtemp(dir=os.environ.get("HOME")))
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    budgets = {k: float(v) for k, v in job["budgets"].items()}
    _run_statements(job, namespace, out)
    _run_checks(job["checks"], budgets, namespace, out)


def _submission(fds: list[int], sandboxed: bool) -> None:
    """The forked process of one submission: isolate, then start the runner as PID 1 and wait for it.

    This process never runs submitted code, and the runner's PID namespace cannot see it. On SIGTERM
    (the zygote's "end") it kills the runner; the kernel then kills everything in the namespace.
    """
    out, job_fd = fds
    os.setsid()
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # die with the zygote
    runner_pid: list[int] = []

    def stop(*_) -> None:
        for pid in runner_pid:
            os.kill(pid, signal.SIGKILL)
        if not runner_pid:
            os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    job = json.load(os.fdopen(job_fd))
    if sandboxed:
        try:
            isolate()
        except OSError as err:
            _write(out, FATAL, f"the sandbox could not isolate the submission ({err})")
            return
    pid = os.fork()
    if pid == 0:
        try:
            _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            if sandboxed:
                _enter_user_namespace()
            runner(out, job)
        finally:
            os._exit(0)
    runner_pid.append(pid)
    os.close(out)
    os.waitpid(pid, 0)  # returns once the runner, and with it its whole PID namespace, is gone


def zygote(control_fd: int, preload: str, uid: int | None) -> None:
    """Serve submissions on the control socket: ``run`` (with two fds: the record pipe and the job) and ``end``."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    for name in filter(None, preload.split(",")):
        __import__(name)
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        torch.set_num_threads(1)
        with _operator_watch(frozenset({"aten.add"})):  # pay the first dispatch mode's set-up once, here
            torch.ones(1) + 1
    import numpy.random  # noqa: F401 - every check seeds it

    try:
        import pyseccomp  # noqa: F401 - finds libseccomp once, here
    except (ImportError, OSError, AttributeError, RuntimeError):
        pass
    control = socket.socket(fileno=control_fd)
    sandboxed = os.environ.get("VITCOURSE_SANDBOX") == "1"
    control.sendall(b"ready")
    current = None
    while True:
        message, fds, _, _ = socket.recv_fds(control, 16, 2)
        if message == b"run" and len(fds) == 2:
            current = os.fork()
            if current == 0:
                try:
                    control.close()
                    _submission(fds, sandboxed)
                finally:
                    os._exit(0)
            for fd in fds:
                os.close(fd)
        elif message == b"end":
            if current:
                try:
                    os.kill(current, signal.SIGTERM)  # it kills the runner, PID 1 of the submission's namespace
                except OSError:
                    pass
                os.waitpid(current, 0)
                try:  # without a sandbox there is no namespace: end the process group at least
                    os.killpg(current, signal.SIGKILL)
                except OSError:
                    pass
                current = None
            control.sendall(b"ok")
        else:
            return


if __name__ == "__main__":
    zygote(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None)
