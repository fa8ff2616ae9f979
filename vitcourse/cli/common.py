"""What every subcommand shares: one-line errors, and the checks of input and output folders."""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from pathlib import Path

__all__ = ["UsageError", "Parser", "check_input_dir", "check_out_dir", "one_line", "flag_words", "quiet_closed_stdout"]


class UsageError(ValueError):
    """Bad input to a subcommand: printed as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors (unknown option, missing value, ``--epochs abc``) are one
    line on stderr, exit code 2, pointing to ``--help`` instead of printing the whole usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: {message}; see '{self.prog} --help'.\n")


def check_input_dir(path: str | os.PathLike, flag: str, what: str) -> Path:
    """``path`` must be an existing folder: :class:`UsageError` (one sentence) otherwise.

    ``flag`` names the option (``"--data"``), ``what`` the folder the user should pass.
    """
    path = Path(path).expanduser()
    if path.is_file():
        raise UsageError(f"{flag} {path} is a file, not a folder; pass {what}.")
    if not path.is_dir():
        raise UsageError(f"{flag} {path} does not exist; pass {what}.")
    return path


def check_out_dir(path: str | os.PathLike, *, flag: str = "--out", data: str | os.PathLike | None = None,
                  data_flag: str = "--data") -> Path:
    """``path`` must be usable as an output folder; :class:`UsageError` (one sentence) otherwise.

    Refused: an existing file; a path below a file; a place where nothing can be written (a
    read-only folder or file system: checked by creating and deleting a temporary file in the
    nearest existing folder); a folder inside (or equal to) the input folder ``data``, whose
    contents the command reads. Nothing is created.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is an existing file, not a folder; choose a folder path (it is created if needed).")
    if data is not None:
        source, target = Path(data).expanduser().resolve(), path.resolve()
        if target == source or source in target.parents:
            raise UsageError(f"{flag} {path} is inside {data_flag} {data}, whose files are read as input; "
                             f"choose an output folder outside it.")
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} {path} cannot be created because {existing} is a file; choose another folder.")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError:
        raise UsageError(f"{flag} {path} is in a place that cannot be written to ({existing} is read-only or not "
                         f"yours); choose a folder you can write to.") from None
    return path


def one_line(err: BaseException) -> str:
    """An exception's message on one line (the command line prints exactly one)."""
    if isinstance(err, BrokenPipeError):
        return "the output was closed before everything was written (the reading end of a pipe stopped)."
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, OSError) and err.strerror:
        text = f"{err.strerror}: {err.filename}" if err.filename else err.strerror
        text = f"could not use a file ({text}); check the path, its permissions and the free disk space."
    return text.encode("utf-8", "backslashreplace").decode("utf-8")  # names that are not UTF-8 print too


def quiet_closed_stdout() -> None:
    """After a ``BrokenPipeError`` on stdout (``vitcourse ... | head``): send what is left to ``/dev/null``,
    so Python's final flush adds no second message."""
    import sys

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def flag_words(message: str, renames: dict[str, str] | None = None) -> str:
    """A config's message in the command line's words: the field it starts with becomes its flag
    (``"max_steps must be ..."`` -> ``"--max-steps must be ..."``; ``renames`` maps fields whose flag
    has another name)."""
    renames = renames or {}

    def flag(match: re.Match) -> str:
        name = match.group(2)
        return renames.get(name, "--" + name.replace("_", "-"))

    return re.sub(r"^(ViTConfig\.)?([a-z][a-z0-9_]*)(?= must| differs|=)", flag, message)
