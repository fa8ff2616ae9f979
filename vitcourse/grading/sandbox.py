"""Starting and talking to the sandboxed fork server (grader side).

What the student process can see, with bubblewrap (``bwrap``):

* read-only: the system (``/usr``, ``/etc``, the ``/lib`` links), the Python
  installation and the virtual environment the grader runs in (not the rest of
  ``/opt`` or ``/root``, even when they live there);
* read-only at the package's own path: a *view* of ``vitcourse`` holding only the
  sandbox half of :mod:`vitcourse.grading` (``wire``, ``runtime``, ``worker``) and
  the core modules the chapter lets students use; never the hidden checks, the
  exercise specs, the reference modules the exercises ask students to write, the
  notebooks, the repository or the other submissions;
* its own empty ``/tmp`` (256 MiB at most), a read-only ``/dev``; no network, no
  other processes (new PID namespace), no capabilities even when the grader runs as root.

Without bubblewrap the same fork server runs as a plain process, with the same
resource limits, in a private scratch directory; the grader says so on the first
line of its report.
"""

from __future__ import annotations

import functools
import os
import secrets
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import wire

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # .../vitcourse
SANDBOX_FILES = ("__init__.py", "wire.py", "runtime.py", "worker.py")
"""The files of :mod:`vitcourse.grading` that the student process may see."""
TMP_SIZE = 256 * 2**20
"""Size of the sandbox's ``/tmp`` (where bubblewrap can limit it)."""


@functools.lru_cache(maxsize=1)
def bwrap_status() -> tuple[bool, str]:
    """``(usable, description)``: whether bubblewrap is installed and can create a sandbox here."""
    exe = shutil.which("bwrap")
    if exe is None:
        return False, "bubblewrap (bwrap) is not installed"
    probe = [exe, "--unshare-all", "--cap-drop", "ALL", "--die-with-parent", "--ro-bind", "/", "/",
             "--proc", "/proc", "--dev", "/dev", "true"]
    try:
        result = subprocess.run(probe, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as err:
        return False, f"bubblewrap could not start ({err})"
    if result.returncode != 0:
        reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "unknown error"
        return False, f"bubblewrap cannot create a sandbox on this machine ({reason})"
    return True, f"bubblewrap ({exe})"


def build_view(dest: Path, core_modules: tuple[str, ...]) -> Path:
    """Write the sandbox's view of the package into ``dest/vitcourse``; return that directory.

    Args:
        dest: an empty directory.
        core_modules: names of ``vitcourse`` modules the chapter's students may import
            (for example ``("attention",)`` in chapter 3, where students reuse chapter 1).
    """
    view = dest / "vitcourse"
    (view / "grading").mkdir(parents=True)
    (view / "__init__.py").write_text(
        '"""vitcourse as seen while grading: only the modules this chapter may use."""\n'
    )
    for name in SANDBOX_FILES:
        shutil.copy2(PACKAGE_DIR / "grading" / name, view / "grading" / name)
    (view / "grading" / "public.py").write_text(
        '"""check() does nothing while grading: the grader runs its own checks."""\n\n\n'
        'def check(exercise_id, namespace=None):\n    """No-op stand-in for vitcourse.grading.check."""\n'
    )
    for module in core_modules:
        shutil.copy2(PACKAGE_DIR / f"{module}.py", view / f"{module}.py")
    return view


def _count_processes(uid: int) -> int:
    """How many processes ``uid`` runs now (RLIMIT_NPROC counts them all, not just ours)."""
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                count += os.stat(f"/proc/{entry}").st_uid == uid
            except OSError:
                continue
    return count


def process_limit(extra: int = 128) -> int:
    """An RLIMIT_NPROC value leaving the student ``extra`` processes (threads count too).

    A second line of defence behind the seccomp filter of the worker (the kernel does not
    apply RLIMIT_NPROC to root at all).
    """
    return _count_processes(os.geteuid()) + extra


@functools.lru_cache(maxsize=1)
def _tmpfs_size() -> tuple[str, ...]:
    """``--size`` for the sandbox's ``/tmp`` if this bubblewrap supports it (0.7 and newer)."""
    try:
        help_text = subprocess.run(["bwrap", "--help"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return ("--size", str(TMP_SIZE)) if "--size" in help_text else ()


def _system_binds() -> list[str]:
    """Read-only binds of the system and of this Python (its installation and virtual environment only)."""
    args: list[str] = []
    for top in ("usr", "etc"):
        if Path("/" + top).is_dir():
            args += ["--ro-bind", "/" + top, "/" + top]
    for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = Path("/" + top)
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), "/" + top]
        elif path.is_dir():
            args += ["--ro-bind", "/" + top, "/" + top]
    for prefix in sorted({sys.prefix, sys.base_prefix, sys.exec_prefix,
                          str(Path(sys.executable).resolve().parent.parent)}):
        if not prefix.startswith(("/usr/", "/etc/")) and Path(prefix).is_dir():
            args += ["--ro-bind", prefix, prefix]
    return args


class WorkerDied(RuntimeError):
    """The fork server ended or stopped answering; the grader starts a new one."""


class Worker:
    """One warm fork server (sandboxed if possible) that runs jobs one at a time.

    Args:
        view_root: directory holding the package view made by :func:`build_view`.
        preload: modules the server imports once (``"torch"``, ``"torch,jax"``).
        sandbox: use bubblewrap (``None``: whenever it works).
    """

    def __init__(self, view_root: Path, preload: str = "torch", sandbox: bool | None = None) -> None:
        self.view_root = Path(view_root)
        self.preload = preload
        self.sandbox = bwrap_status()[0] if sandbox is None else sandbox
        self.proc: subprocess.Popen | None = None
        self.vm_size = 0
        self.scratch: str | None = None

    def command(self) -> list[str]:
        """The command line that starts the server."""
        entry = ["-c", "from vitcourse.grading.worker import serve; serve()"]
        python = sys.executable
        if not self.sandbox:
            return [python, "-s", *entry, "--scratch", self.scratch, "--preload", self.preload]
        view = self.view_root / "vitcourse"
        return [
            # New PID, network, IPC... namespaces; no capabilities (not even as root), so the
            # student process cannot reach the server through /proc; killed with the grader.
            "bwrap", "--unshare-all", "--as-pid-1", "--cap-drop", "ALL", "--die-with-parent", "--new-session",
            # The empty /tmp comes first: binds listed after it may sit inside it (a course
            # cloned under /tmp keeps its venv and package visible). /dev is read-only, so
            # nothing outlives a run in /dev/shm.
            "--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev", *_tmpfs_size(), "--tmpfs", "/tmp",
            *_system_binds(),
            "--ro-bind", str(view), str(PACKAGE_DIR),
            "--chdir", "/tmp",
            # PYTHONPATH: the view is found however the package was installed (an editable
            # install may point at another checkout, which the sandbox does not show)
            "--clearenv", "--setenv", "PYTHONPATH", str(PACKAGE_DIR.parent),
            "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp",
            "--setenv", "LANG", "C.UTF-8", "--setenv", "OMP_NUM_THREADS", "1",
            "--setenv", "MKL_NUM_THREADS", "1", "--setenv", "PYTHONDONTWRITEBYTECODE", "1",
            python, "-s", *entry, "--scratch", "/tmp", "--preload", self.preload,
        ]

    def start(self, timeout: float = 120.0) -> None:
        """Start the server and wait until it has imported its modules."""
        self.scratch = tempfile.mkdtemp(prefix="vitcourse-grade-")
        os.chmod(self.scratch, 0o755)
        env = None
        if not self.sandbox:
            # the view comes first on sys.path, ahead of the editable install's finder
            env = {"PATH": "/usr/bin:/bin", "HOME": self.scratch, "LANG": "C.UTF-8",
                   "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1",
                   "PYTHONPATH": str(self.view_root)}
        self.log = open(os.path.join(self.scratch, "..", os.path.basename(self.scratch) + ".log"), "wb")
        self.proc = subprocess.Popen(
            self.command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
            cwd=self.scratch, env=env, start_new_session=True,
        )
        header, _ = self._read(time.monotonic() + timeout)
        if header.get("kind") != "ready":
            raise WorkerDied("the grading worker did not start")
        self.vm_size = int(header.get("vm_size", 0))

    def ready(self) -> bool:
        """True if the server runs and has sent nothing unread: a clean start for the next run.

        Unread bytes can only be left by a run that ended early or by something other than
        the server writing to its pipe; the grader then starts a new server.
        """
        if self.proc is None or self.proc.poll() is not None:
            return False
        return not select.select([self.proc.stdout.fileno()], [], [], 0)[0]

    def _read(self, deadline: float) -> tuple[dict, list[bytes]]:
        fd = self.proc.stdout.fileno()
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise WorkerDied("the grading worker stopped answering")
        try:
            payload = wire.read_frame(fd, limit=wire.MAX_FRAME + 2**20)
        except wire.WireError as err:
            raise WorkerDied(f"the grading worker sent a broken message ({err})") from None
        if payload is None:
            raise WorkerDied(self._death_reason())
        return wire.unpack(payload)

    def _death_reason(self) -> str:
        try:
            self.log.flush()
            with open(self.log.name, "rb") as f:
                tail = f.read()[-400:].decode(errors="replace").strip().splitlines()
        except OSError:
            tail = []
        return "the grading worker exited" + (f": {tail[-1]}" if tail else "")

    def run(self, job: dict, blobs: list[bytes], overall_timeout: float):
        """Send one run; yield ``(header, blobs)`` for each child message, then the end message.

        Child messages always have ``kind`` ``"child"``; only the server's end message has
        ``kind`` ``"end"``. Each server message must carry this run's random id: anything
        else (bytes left over from an earlier run, or written by something other than the
        server) means the stream cannot be trusted, and the worker is declared dead.

        Raises:
            WorkerDied: if the server dies, goes silent for ``overall_timeout`` seconds, or
                sends a message that is not of this run.
        """
        run_id = secrets.token_hex(16)
        try:
            wire.write_frame(self.proc.stdin.fileno(), wire.pack(dict(job, op="run", run=run_id), blobs))
        except OSError:
            raise WorkerDied(self._death_reason()) from None
        deadline = time.monotonic() + overall_timeout
        while True:
            header, data = self._read(deadline)
            if header.get("run") != run_id:
                raise WorkerDied("the grading worker sent a message that was not part of this run")
            if header.get("kind") == "end":
                yield header, []
                return
            if header.get("kind") == "child" and len(data) == 1:
                try:
                    message, message_blobs = wire.unpack(data[0])
                except wire.WireError:
                    continue
                yield dict(message, kind="child"), message_blobs

    def close(self) -> None:
        """Stop the server (and with it any sandboxed process) and remove its scratch space."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, 9)
            except OSError:
                pass
            self.proc.wait()
            for stream in (self.proc.stdin, self.proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
            self.proc = None
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.log.close()
            try:
                os.unlink(self.log.name)
            except OSError:
                pass
            self.scratch = None
