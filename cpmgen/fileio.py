"""Files cpmgen writes: checked before the work, written beside the target, renamed into place.

Nothing the user did not name is deleted or overwritten: an output folder is replaced only
with --force and only when it holds nothing but a checkpoint (or nothing); a folder that holds
the source, or lies inside it, is never replaced. Writers to one target take a lock, so of
two at once one fails at the start; leftovers of a killed run are removed by the next one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import resource
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Optional

from cpmgen.errors import UserError
from cpmgen.libc import LIBC

# What a checkpoint folder written by cpmgen, Megatron or HF transformers holds at its top level.
CHECKPOINT_FILES = {
    "latest_checkpointed_iteration.txt", "config.json", "generation_config.json", "model.safetensors",
    "pytorch_model.bin", "spiece.model", "chinese_vocab.model", "vocab.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.json", "added_tokens.json", "quantized.json",
}
RANK_FILE = re.compile(r"^mp_rank_\d+_model_states\.pt$")
# Plain folder names only: an iteration name read from a file must not lead out of the folder.
PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_WRITE_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                 errno.EFBIG: "file larger than the size limit (ulimit -f)", errno.EROFS: "read-only file system",
                 errno.EACCES: "permission denied", errno.EPERM: "permission denied"}


def check_plain_name(name: str, where: str) -> str:
    if not PLAIN_NAME.match(name) or name in (".", ".."):
        raise UserError(f"{where}: {name!r} is not a plain folder name (no '/', no '..'); "
                        "fix the file to name the iteration folder")
    return name


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} KB"


def _is_checkpoint_entry(path: Path, names: Iterable[str] = ()) -> bool:
    if path.is_symlink():
        return False
    if path.is_file():
        return path.name in CHECKPOINT_FILES or path.name in names or path.suffix == ".safetensors"
    if path.is_dir() and PLAIN_NAME.match(path.name):  # an iteration folder: rank files only
        return all(p.is_file() and not p.is_symlink() and RANK_FILE.match(p.name) for p in path.iterdir())
    return False


def _replaceable(target: Path, option: str, names: Iterable[str] = ()) -> None:
    """Refuse to replace a folder that holds more than a checkpoint (and `names`)."""
    if not target.is_dir():
        raise UserError(f"{target}: exists and is not a folder; choose another {option}")
    others = sorted(p.name for p in target.iterdir() if not _is_checkpoint_entry(p, names))
    if others:
        raise UserError(f"{target}: --force replaces only a checkpoint folder, and this one also holds "
                        f"{others[0]}{f' and {len(others) - 1} more' if len(others) > 1 else ''}; "
                        f"choose another {option}")


def _refuse_overlap(target: Path, protected: Iterable[Path], option: str) -> None:
    resolved = target.resolve()
    sources = [(Path(path), Path(path).resolve()) for path in protected]
    for path, source in sources:
        if source == resolved or resolved in source.parents:
            raise UserError(f"{target}: holds the source checkpoint {sources[0][0]}; choose another {option}")
    for path, source in sources:
        if source in resolved.parents:
            raise UserError(f"{target}: is inside the source checkpoint {sources[0][0]}; choose another {option}")


def _writable_parent(target: Path, option: str) -> Path:
    parent = target.parent
    if not parent.is_dir():
        raise UserError(f"{target}: folder {parent} does not exist; create it or choose another {option}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{target}: cannot write in {parent} (permission denied or read-only); "
                        f"choose another {option}")
    return parent


def check_space(target: Path, total_bytes: int, largest_file: int, option: str = "--output") -> None:
    """Refuse work whose output cannot fit: free space beside the target, and `ulimit -f`.
    (A missing folder is left to the output's own check, which names it.)"""
    if not target.parent.is_dir():
        return
    free = shutil.disk_usage(target.parent).free
    if total_bytes > free:
        raise UserError(f"{target}: needs about {_mb(total_bytes)} but {target.parent} has {_mb(free)} free; "
                        f"free some space or choose another {option}")
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and largest_file > limit:
        raise UserError(f"{target}: a file of about {_mb(largest_file)} exceeds the file size limit "
                        f"({_mb(limit)}, ulimit -f); raise the limit")


def write_failure(error: BaseException, target: Path) -> Optional[UserError]:
    """A one-line UserError for a write that failed on the file system, else None."""
    if isinstance(error, OSError) and error.errno in _WRITE_ERRORS:
        return UserError(f"{target}: writing failed: {_WRITE_ERRORS[error.errno]}; nothing was written")
    # torch's zip writer reports a short write as "unexpected pos ..." or "failed writing file"
    if isinstance(error, RuntimeError) and re.search(r"unexpected pos|failed writing|file write failed", str(error)):
        return UserError(f"{target}: writing failed (disk full or file size limit, ulimit -f); nothing was written")
    return None


@contextlib.contextmanager
def _target_lock(target: Path, option: str) -> Iterator[None]:
    """Exclusive lock on a target for the whole write: a second writer fails at once."""
    lock_path = target.with_name(f".{target.name}.lock")
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"{target}: another cpmgen is writing this output now; wait for it or choose "
                            f"another {option}") from None
        if os.path.exists(lock_path) and os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
            break  # still the lock file: not one that its last holder removed meanwhile
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)
        os.close(fd)


def _remove_leftovers(target: Path) -> None:
    """Under the target's lock: temporary folders of killed runs go; a replaced output whose
    replacement was cut off between the two renames comes back."""
    from cpmgen import console

    old = target.with_name(f".{target.name}.old")
    if old.exists() and not target.exists() and not target.is_symlink():
        os.replace(old, target)
        console.warn(f"restored {target}, which a killed run was replacing")
    for leftover in [old, *target.parent.glob(f".{glob_escape(target.name)}.*.partial")]:
        if leftover.exists():
            size = _size(leftover)
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink()
            console.warn(f"removed {leftover.name} ({_mb(size)}), left by an interrupted run")


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


_RENAME_NOREPLACE = 1


def rename_no_replace(source: Path, target: Path) -> None:
    """Rename, failing with FileExistsError if the target exists (atomically where the kernel can)."""
    renameat2 = getattr(LIBC, "renameat2", None)
    if renameat2 is not None:
        at_fdcwd = -100
        if renameat2(at_fdcwd, os.fsencode(source), at_fdcwd, os.fsencode(target), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL):  # not supported by this kernel or file system
            raise OSError(code, os.strerror(code), str(target))
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, "File exists", str(target))
    os.rename(source, target)


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike, force: bool = False, option: str = "--output",
                  protect: Iterable[Path] = (), names: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield an empty temporary folder beside `target`; on success it becomes `target`.

    Checked before the work: the parent exists and is writable; `target` is not a symlink,
    holds none of `protect` (the source) and is not inside it; an existing `target` needs
    `force` and may hold only a checkpoint (and files named in `names`, which this kind of
    output also writes). The old folder is removed only once the new one
    is complete, and a `target` that appeared meanwhile is replaced only with `force`."""
    target = Path(target)
    if target.is_symlink():
        raise UserError(f"{target}: is a symbolic link; give the folder it should be, or another {option}")
    _refuse_overlap(target, protect, option)
    _writable_parent(target, option)
    with _target_lock(target, option):
        _remove_leftovers(target)
        if target.exists():
            if not force:
                raise UserError(f"{target}: output folder already exists; pass --force to replace it "
                                f"or choose another {option}")
            _replaceable(target, option, names)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
        except OSError as e:
            raise write_failure(e, target) or e from None
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the folder the usual mode
        try:
            yield tmp
            _finish_folder(tmp, target, force, option, names)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            failure = write_failure(e, target)
            if failure is not None:
                raise failure from None
            raise


def _finish_folder(tmp: Path, target: Path, force: bool, option: str, names: tuple[str, ...]) -> None:
    try:
        rename_no_replace(tmp, target)
        return
    except FileExistsError:
        if not force:
            raise UserError(f"{target}: appeared while this output was written; nothing was replaced "
                            f"(pass --force to replace it, or choose another {option})") from None
    _replaceable(target, option, names)
    old = target.with_name(f".{target.name}.old")
    os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class TextOutput:
    """--output of generation: checked before any work, streamed into a temporary file beside
    the target, renamed into place at the end, and at an interruption or a failure too, so the
    file always holds everything generated so far. A context manager: it holds the target's
    lock until closed."""

    def __init__(self, path: str | os.PathLike, force: bool = False, inputs: Iterable[str | os.PathLike] = (),
                 option: str = "--output"):
        self.path, self.option = Path(path), option
        if self.path.is_dir():
            raise UserError(f"{self.path}: is a folder; {option} takes a file name")
        parent = self.path.parent
        if parent.exists() and not parent.is_dir():
            raise UserError(f"{self.path}: {parent} is a file, not a folder; choose another {option}")
        _writable_parent(self.path, option)
        for source in inputs:
            if self.path.exists() and Path(source).exists() and os.path.samefile(self.path, source):
                raise UserError(f"{self.path}: is the input file; write the text to another {option}")
        if self.path.exists() and not force:
            raise UserError(f"{self.path}: exists; pass --force to replace it, or choose another {option}")
        self.tmp: Optional[Path] = None
        self.file = None
        self._lock = contextlib.ExitStack()

    def __enter__(self) -> "TextOutput":
        self._lock.enter_context(_target_lock(self.path, self.option))
        _remove_leftovers(self.path)
        return self

    def __exit__(self, *exc) -> None:
        self.discard()
        self._lock.close()

    def begin(self) -> None:
        """A fresh temporary file for the next text."""
        self.discard()
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".partial", dir=self.path.parent)
        except OSError as e:
            raise write_failure(e, self.path) or e from None
        self.tmp, self.file = Path(tmp), os.fdopen(fd, "w", encoding="utf-8")

    def stream(self, text: str) -> None:
        """Append text as it comes (flushed: a killed process leaves it on disk)."""
        if text:
            self._guard(lambda: (self.file.write(text), self.file.flush()))

    def commit(self, text: Optional[str] = None) -> None:
        """Put `text` (default: what was streamed) at the path."""
        def write():
            if text is not None:
                self.file.seek(0)
                self.file.truncate()
                self.file.write(text)
            self.file.close()
            os.chmod(self.tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
            os.replace(self.tmp, self.path)
        self._guard(write)
        self.file = self.tmp = None

    def discard(self) -> None:
        if self.file is not None:
            self.file.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp)
            self.file = self.tmp = None

    def _guard(self, action) -> None:
        try:
            action()
        except OSError as e:
            self.discard()
            raise write_failure(e, self.path) or UserError(f"{self.path}: writing failed: {e.strerror}") from None


def read_text_utf8(path: str | os.PathLike, what: str = "input file") -> str:
    path = Path(path)
    try:
        if not path.is_file():
            raise UserError(f"{path}: {what} not found")
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read the {what} ({e.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path}: {what} is not valid UTF-8 (byte {e.start}); convert it, e.g. iconv -f GBK -t UTF-8"
        ) from None
