"""The sandbox sees the Python environment wherever the checkout lives: under /tmp, or in a path with spaces."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from vitcourse.grading import sandbox


def _mounts(args: list[str]) -> list[tuple[str, str]]:
    """(option, target) for every mount-like bwrap option, in order."""
    out = []
    for i, arg in enumerate(args):
        if arg in ("--tmpfs", "--dir", "--proc", "--dev"):
            out.append((arg, args[i + 1]))
        elif arg in ("--ro-bind", "--bind", "--symlink"):
            out.append((arg, args[i + 2]))
    return out


@pytest.mark.parametrize("prefix", ["/tmp/tmp.Ab12/clone/.venv", "/tmp/a path with spaces/.venv", "/home/u/c/.venv"])
def test_the_environment_is_bound_after_the_sandbox_tmp(monkeypatch, tmp_path, prefix):
    monkeypatch.setattr(sys, "prefix", prefix)
    args = sandbox.bwrap_command(tmp_path, "")
    mounts = _mounts(args)
    tmp_at = mounts.index(("--tmpfs", "/tmp"))
    prefix_at = mounts.index(("--ro-bind", prefix))
    assert tmp_at < prefix_at, "a later tmpfs on /tmp would hide an environment that lives under /tmp"
    assert ("--dir", "/tmp") not in mounts  # /tmp keeps its sticky, world-writable mode
    assert args[args.index("--tmpfs") - 1] == "1777"
    # The environment's /tmp is read-only inside: submissions write only to their own fresh scratch folder.
    remounts = [args[i + 1] for i, a in enumerate(args) if a == "--remount-ro"]
    assert "/tmp" in remounts


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")
def test_a_sandbox_starts_from_this_checkout_whatever_its_path():
    """The real check: the sandbox can start and run nothing, from wherever this test suite is."""
    usable, why = sandbox.bwrap_status()
    if not usable and "not installed" not in why:
        pytest.fail(f"{why}; checkout at {Path(__file__).resolve().parents[1]}, Python at {sys.prefix}")
    assert usable, why

