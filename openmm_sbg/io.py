"""Atomic file writes (a crash or Ctrl-C never leaves a half-written output behind) and reading them back."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one rename.

    Write the file to the yielded path with any library (h5py, mdtraj, torch.save, ...).
    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # Keep the extension last: mdtraj and others choose the format from it.
    extension = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".partial" + extension, dir=directory)
    os.close(fd)
    os.remove(tmp)  # some writers (PyTables) refuse to open an existing empty file
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)


def read_json(path: str | os.PathLike):
    """The JSON document in ``path`` (settings and progress files written by :func:`atomic_write_text`)."""
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)
