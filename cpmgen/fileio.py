"""Atomic outputs: everything is written to a temporary path beside the target and renamed
into place, so an error or Ctrl-C never leaves a half-written file or folder."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from cpmgen.errors import UserError


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    if not path.parent.exists():
        raise UserError(f"{path}: folder {path.parent} does not exist; create it or choose another --output")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike, force: bool = False, option: str = "--output") -> Iterator[Path]:
    """Yield an empty temporary folder beside `target`; on success it replaces `target`.

    An existing target is refused unless `force`; with `force` it is removed only after the
    new folder is complete."""
    target = Path(target)
    if target.exists() and not force:
        raise UserError(f"{target}: output folder already exists; pass --force to replace it or choose another {option}")
    if not target.parent.exists():
        raise UserError(f"{target}: folder {target.parent} does not exist; create it or choose another {option}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the folder the usual mode
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_text_utf8(path: str | os.PathLike, what: str = "input file") -> str:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path}: {what} is not valid UTF-8 (byte {e.start}); convert it, e.g. iconv -f GBK -t UTF-8"
        ) from None
