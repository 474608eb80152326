"""Reading a user's files safely: only regular files are opened, and folder trees are walked without recursion.

A FIFO, socket or device named like an input would block a read forever (or read without end); a folder tree
thousands of levels deep would exhaust Python's recursion; a symlink loop would never end. Both helpers turn
these into one line (DigitsInputError) or leave them out.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Iterator

from schemas.errors import DigitsInputError


def check_regular_file(path: Path, missing: str = "no such file") -> None:
    """Refuse, in one line naming path, anything but a regular file (symlinks followed): `missing` when there
    is nothing there, else what it is (a folder, a FIFO, a socket, a device)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise DigitsInputError(f"{path}: {missing}") from None
    except OSError as exc:
        raise DigitsInputError(f"{path}: cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "not a regular file")
        raise DigitsInputError(f"{path}: {kind}, not a regular file (only regular files are read)")


def walk_files(root: Path) -> Iterator[Path]:
    """Every regular file under root, in sorted order of their relative paths, without recursion (any depth)
    and following symlinked folders once each (a loop is not walked twice); FIFOs, sockets and devices are
    left out."""
    seen: set[tuple[int, int]] = set()
    stack = [root]
    found = []
    while stack:
        folder = stack.pop()
        try:
            info = folder.stat()
        except OSError:
            continue
        if (info.st_dev, info.st_ino) in seen:
            continue
        seen.add((info.st_dev, info.st_ino))
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:
            raise DigitsInputError(f"{folder}: cannot be listed ({exc.strerror})") from None
        for entry in entries:
            path = Path(entry.path)
            try:
                if entry.is_dir():
                    stack.append(path)
                elif entry.is_file():
                    found.append(path)
            except OSError:
                continue  # a dangling symlink or a file gone meanwhile
    yield from sorted(found, key=lambda p: os.fsencode(p.relative_to(root)))
