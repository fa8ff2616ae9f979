"""Starting the sandbox (grader side) and reading what one submission's run writes.

With bubblewrap (``bwrap``) the zygote of :mod:`.inside` sees, read-only: ``/usr`` and the
``/lib`` links, ``/etc/ld.so.cache``, this Python's standard library, and in its
site-packages only the distributions grading needs (torch, NumPy, einops, JAX for the
JAX chapter, libseccomp's bindings) with what they require; no timm, no other package.
It also sees a *view* of ``vitcourse`` holding only ``runtime``, ``inside``, ``protocol`` and
``linux`` of the grading package and the core modules the chapter allows. Never: the repository, the
exercise specs, the hidden checks, the submissions or the output folder. It has no
network, its own PID and IPC namespaces, and runs as an unprivileged uid (:data:`UID_BASE` + worker
number when the grader runs as root). Each submission then gets fresh namespaces of its
own (see :mod:`.inside`).
"""

from __future__ import annotations

import functools
import importlib.metadata as md
import json
import os
import select
import shutil
import signal
import site
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .inside import SCRATCH
from .protocol import FATAL, Reader
from .protocol import decode as parse_record  # noqa: F401 - the name callers and tests use

PACKAGE = Path(__file__).resolve().parent.parent  # .../vitcourse
ALLOWED = ("torch", "numpy", "einops", "pyseccomp")
VIEW = ("runtime.py", "inside.py", "protocol.py", "linux.py")  # of the grading package: what the sandbox sees
UID_BASE = 60000  # a zygote started as root runs as UID_BASE + its worker number


def _closure(names) -> list:
    """The installed distributions ``names`` need at run time: their requirements, transitively, no extras."""
    found, todo = {}, [Requirement(n) for n in names]
    while todo:
        req = todo.pop()
        if canonicalize_name(req.name) in found or req.marker and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            found[canonicalize_name(req.name)] = dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            continue
        todo += [Requirement(r) for r in dist.requires or []]
    return list(found.values())


def package_binds(names=ALLOWED) -> list[str]:
    """bwrap arguments: an empty tmpfs over every site-packages folder, then only ``names`` and their needs."""
    args, entries = [], set()
    for folder in {*site.getsitepackages(), site.getusersitepackages()}:
        if Path(folder).is_dir():
            args += ["--tmpfs", folder]
    for dist in _closure(names):
        for file in dist.files or []:
            if file.parts and file.parts[0] != "..":
                entries.add(Path(dist.locate_file(file.parts[0])))
    for path in sorted(entries):
        if path.exists():
            args += ["--ro-bind", str(path), str(path)]
    return args


def _parents(path: str) -> list[str]:
    """``--dir`` with mode 0755 for every folder above ``path`` (bwrap would make them 0700)."""
    parts = Path(path).parts[1:-1]
    folders = ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]
    return [a for folder in folders if folder != "/tmp" for a in ("--perms", "0755", "--dir", folder)]  # /tmp: 1777


def bwrap_command(view: Path, chapter_preload: str) -> list[str]:
    """The bwrap command line of a zygote (see the module docstring)."""
    base, prefix = sys.base_prefix, sys.prefix
    root = os.geteuid() == 0
    args = ["bwrap", "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
            *([] if root else ["--unshare-user"]), "--die-with-parent", "--new-session",
            "--ro-bind", "/usr", "/usr",
            # /tmp first: the binds below may lie under it (a checkout or virtualenv in /tmp) and must stay visible.
            "--perms", "1777", "--tmpfs", "/tmp"]
    for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        if os.path.islink("/" + top):
            args += ["--symlink", os.readlink("/" + top), "/" + top]
        elif os.path.isdir("/" + top):
            args += ["--ro-bind", "/" + top, "/" + top]
    for path in sorted({base, prefix}):
        if not path.startswith("/usr/"):
            args += [*_parents(path), "--ro-bind", path, path]
    if os.path.exists("/etc/ld.so.cache"):
        args += [*_parents("/etc/ld.so.cache"), "--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    args += [*package_binds(ALLOWED + (("jax",) if "jax" in chapter_preload else ())),
             # The zygote's own scratch (imports may need a temporary folder); each submission mounts a fresh one over it.
             "--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev", "--remount-ro", "/tmp",
             "--perms", "1777", "--tmpfs", SCRATCH, "--ro-bind", str(view), "/grader", "--chdir", "/"]
    return args


def environment(sandboxed: bool, home: str) -> dict:
    """The zygote's environment variables."""
    return {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "USER": "student", "LANG": "C.UTF-8",
            "PYTHONPATH": "/grader" if sandboxed else home + "/grader", "PYTHONDONTWRITEBYTECODE": "1",
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg", "MPLCONFIGDIR": home,
            "VITCOURSE_SANDBOX": "1" if sandboxed else "0", "JAX_PLATFORMS": "cpu"}


def build_view(dest: Path, core_modules: tuple[str, ...]) -> Path:
    """Write the sandbox's ``vitcourse`` into ``dest``: the :data:`VIEW` modules, a no-op ``check``, ``core_modules``."""
    (dest / "vitcourse" / "grading").mkdir(parents=True)
    (dest / "vitcourse" / "__init__.py").write_text('"""vitcourse as seen while grading."""\n')
    (dest / "vitcourse" / "grading" / "__init__.py").write_text(
        'def check(exercise_id, namespace=None):\n    """No-op while grading: the grader runs its own checks."""\n')
    for name in VIEW:
        shutil.copy(PACKAGE / "grading" / name, dest / "vitcourse" / "grading" / name)
    for module in core_modules:
        shutil.copy(PACKAGE / f"{module}.py", dest / "vitcourse" / f"{module}.py")
    for path in [dest, *dest.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return dest


@functools.lru_cache(maxsize=1)
def bwrap_status() -> tuple[bool, str]:
    """``(usable, description)``: whether a zygote and one submission can be sealed here."""
    if shutil.which("bwrap") is None:
        return False, "bubblewrap (bwrap) is not installed"
    with tempfile.TemporaryDirectory() as tmp:
        zygote = Zygote(build_view(Path(tmp) / "view", ()), "", slot=0, sandboxed=True)
        try:
            zygote.start(timeout=60)
            records, ended = zygote.run({"statements": [], "setup_seconds": 1, "checks": [], "budgets": {},
                                         "memory": 2**30, "workdir": SCRATCH}, time.monotonic() + 60)
        except (OSError, RuntimeError) as err:
            return False, f"bubblewrap cannot create a sandbox on this machine ({err})"
        finally:
            zygote.close()
    fatal = [r.id for r, _ in records if r.kind == FATAL]
    if fatal or ended != "eof":
        return False, fatal[0] if fatal else f"the sandbox did not run a test submission ({ended})"
    return True, "bubblewrap, with fresh namespaces for each submission"


class Zygote:
    """One worker's zygote process (see :mod:`.inside`); runs one submission at a time."""

    def __init__(self, view: Path, preload: str, slot: int, sandboxed: bool) -> None:
        self.view, self.preload, self.slot, self.sandboxed = view, preload, slot, sandboxed
        self.proc: subprocess.Popen | None = None
        self.home = None

    def start(self, timeout: float = 120.0) -> None:
        """Start the zygote and wait until it has imported its modules."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        root = os.geteuid() == 0
        uid = [str(UID_BASE + self.slot)] if root and self.sandboxed else []
        self.home = SCRATCH if self.sandboxed else tempfile.mkdtemp(prefix="vitcourse-grading-")
        if not self.sandboxed:
            shutil.copytree(self.view, Path(self.home) / "grader")
        command = [sys.executable, "-s", "-m", "vitcourse.grading.inside", str(theirs.fileno()), self.preload, *uid]
        if self.sandboxed:
            command = bwrap_command(self.view, self.preload) + command
        log = None if os.environ.get("VITCOURSE_GRADING_DEBUG") else subprocess.DEVNULL
        self.proc = subprocess.Popen(command, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=log, env=environment(self.sandboxed, self.home),
                                     cwd="/" if self.sandboxed else self.home, start_new_session=True)
        theirs.close()
        self.control = ours
        if not select.select([ours], [], [], timeout)[0] or ours.recv(16) != b"ready":
            self.close()
            raise RuntimeError("the grading zygote did not start")

    def run(self, job: dict, deadline: float, watch=None):
        """Run one submission; return ``(records, ended)``.

        ``records`` are ``(record, seconds since start)`` for every :class:`.protocol.Record` read; ``ended``
        is ``"eof"`` (the run finished or died), ``"deadline"`` or ``"output"`` (it wrote more than
        :data:`.protocol.MAX_OUTPUT`). ``watch``, if given, is told every record (``watch.see(record, t)``)
        and says how many seconds after the start the run may go on (``watch.limit``): the grader's own
        clock for the statement or check in progress, enforced here from outside, whatever the code inside
        does with its signals. The run is then killed.
        """
        r, w = os.pipe()
        with tempfile.TemporaryFile() as job_file:
            job_file.write(json.dumps(job).encode())
            job_file.seek(0)
            socket.send_fds(self.control, [b"run"], [w, job_file.fileno()])
        os.close(w)
        records, reader, start, ended = [], Reader(), time.monotonic(), "eof"
        try:
            while True:
                until = deadline if watch is None else min(deadline, start + watch.limit)
                left = until - time.monotonic()
                if left <= 0:
                    ended = "deadline"
                    break
                if not select.select([r], [], [], left)[0]:
                    continue
                chunk = os.read(r, 1 << 20)
                if not chunk:
                    break
                read = reader.feed(chunk)
                if read is None:
                    ended = "output"
                    break
                for record in read:
                    t = time.monotonic() - start
                    records.append((record, t))
                    if watch is not None:
                        watch.see(record, t)
        finally:
            os.close(r)
            self.end()
        return records, ended

    def end(self) -> None:
        """Kill whatever is left of the current submission and wait until the zygote is ready again."""
        try:
            self.control.send(b"end")
            if not select.select([self.control], [], [], 30)[0] or self.control.recv(16) != b"ok":
                raise OSError("no answer")
        except OSError:
            self.close()

    def alive(self) -> bool:
        """Whether the zygote is running."""
        return self.proc is not None and self.proc.poll() is None

    def close(self) -> None:
        """Stop the zygote (and with it every process of the sandbox)."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            self.proc.wait()
            self.proc = None
            self.control.close()
        if self.home and not self.sandboxed:
            shutil.rmtree(self.home, ignore_errors=True)
