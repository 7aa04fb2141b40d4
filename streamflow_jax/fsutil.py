"""Writing directories and files so that readers never see half of one.

Every output of the library (converted checkpoints, exports, the export and engine caches) is
written into a hidden partial sibling named after the writer's pid,
``.NAME.partial-PID-RANDOM``, and renamed into place when complete (same filesystem, so the
rename is atomic). A failure or Ctrl-C removes the partial; a killed process leaves it, and the
next writer to the same destination removes it once its pid is no longer alive. A partial
whose writer is alive is never touched. After a success nothing but the destination remains.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from streamflow_jax.errors import ConversionError

PARTIAL = ".partial-"
_INTERRUPTS: list[int] | None = None  # SIGINTs/SIGTERMs seen inside ``interrupts_recorded``; None outside it
_LAST_SIGNAL: int | None = None  # the last of them, for the exit status (128 + it)
STOPPING_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C, and what `kill`, docker and Kubernetes send


def take_last_signal() -> int:
    """The signal that stopped the last ``interrupts_recorded`` block, forgotten once taken
    (SIGINT when none was seen: a KeyboardInterrupt raised otherwise)."""
    global _LAST_SIGNAL
    sig, _LAST_SIGNAL = _LAST_SIGNAL, None
    return sig or signal.SIGINT


@contextlib.contextmanager
def interrupts_recorded() -> Iterator[None]:
    """Ctrl-C (and SIGTERM, as ``kill``, docker and Kubernetes stop a process) inside the block
    raises ``KeyboardInterrupt`` as Python's own handler does for Ctrl-C, and is also recorded:
    an exception raised inside a callback that native code or the interpreter
    runs (JAX's garbage-collection hook, seen with ``export`` and ``bench``) is dropped with an
    "Exception ignored" message and the work goes on, so ``atomic_dir`` and ``check_interrupted``
    ask the record before anything is committed. The CLI runs its commands inside it. Main
    thread only; the previous handler comes back after, and outside the block nothing is
    recorded (a caller of the library who catches a Ctrl-C and goes on is not interrupted
    again). Inside it, the interpreter's "Exception ignored" report of such a dropped Ctrl-C is
    not printed (``sys.unraisablehook``): the command ends with its own one line instead."""
    global _INTERRUPTS, _LAST_SIGNAL
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        global _LAST_SIGNAL
        _LAST_SIGNAL = signum
        if _INTERRUPTS is not None:
            _INTERRUPTS.append(signum)
        raise KeyboardInterrupt

    previous_hook = sys.unraisablehook

    def quiet(unraisable):
        # a recorded Ctrl-C dropped inside a callback (a ``__del__``, a GC hook) is raised again
        # before anything is committed: its "Exception ignored in ..." traceback is noise that
        # came before the one line "interrupted" (seen with zipfile's __del__ during convert)
        if _INTERRUPTS and isinstance(unraisable.exc_value, KeyboardInterrupt):
            return
        previous_hook(unraisable)

    outer, _INTERRUPTS, _LAST_SIGNAL = _INTERRUPTS, [], None
    previous = {sig: signal.signal(sig, handler) for sig in STOPPING_SIGNALS}
    sys.unraisablehook = quiet
    try:
        yield
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before if before is not None else signal.SIG_DFL)
        sys.unraisablehook = previous_hook
        _INTERRUPTS = outer


def interrupted() -> bool:
    """Whether a Ctrl-C was recorded inside the current ``interrupts_recorded``, raised or not."""
    return bool(_INTERRUPTS)


def check_interrupted() -> None:
    """Raises ``KeyboardInterrupt`` if a Ctrl-C was recorded inside the current
    ``interrupts_recorded``: before an output is committed, in case the first one was dropped
    on the way."""
    if _INTERRUPTS:
        raise KeyboardInterrupt


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Ctrl-C (SIGINT) or SIGTERM inside the block is held until the block ends, then raised as
    ``KeyboardInterrupt``: for writes that run on background threads (orbax's), which must finish
    before their directory can be removed, and for native code that swallows exceptions raised
    in its Python callbacks (TensorRT's builder). The block gets the list of signals received
    so far (empty: none), which such a callback may poll to stop early. Only the main thread
    receives signals; elsewhere the block runs as is."""
    pending: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield pending
        return
    def hold(signum, frame):
        global _LAST_SIGNAL
        pending.append(signum)
        _LAST_SIGNAL = signum
        if _INTERRUPTS is not None:
            _INTERRUPTS.append(signum)

    previous = {sig: signal.signal(sig, hold) for sig in STOPPING_SIGNALS}
    try:
        yield pending
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before if before is not None else signal.SIG_DFL)
    if pending:
        raise KeyboardInterrupt


def free_path(dst: Path) -> None:
    """Refuses to overwrite: the caller must pick a new path or remove the old one."""
    if os.path.lexists(dst):
        what = ("already exists (a link: only an empty directory is written into)" if dst.is_symlink() else
                "already exists and is not empty" if dst.is_dir() else "already exists")
        raise ConversionError(f"{dst}: {what} (remove it or choose another output path)")


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _partials(dst: Path) -> Iterator[tuple[Path, int | None]]:
    """Partial siblings of ``dst`` and their writers' pids (None when unreadable)."""
    prefix = f".{dst.name}{PARTIAL}"
    if not dst.parent.is_dir():
        return
    for p in dst.parent.iterdir():
        if p.name.startswith(prefix):
            pid = p.name[len(prefix):].split("-", 1)[0]
            yield p, int(pid) if pid.isdigit() else None


def remove_stale_partials(dst: Path, *, shared: bool = False) -> None:
    """Removes partial siblings of ``dst`` left by dead writers.

    A live writer's partial is left alone; unless ``shared`` (a cache entry that concurrent
    processes may both make), finding one is an error.
    """
    for path, pid in _partials(dst):
        if pid is not None and pid_alive(pid):
            if pid != os.getpid() and not shared:
                raise ConversionError(f"{dst}: process {pid} is writing it now ({path.name}); wait for it or "
                                      "choose another output path")
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def discard_dir(path: Path, *, inode: int | None = None) -> None:
    """Removes a cache entry judged stale or corrupt without ever removing a newer one: the entry
    is renamed to a partial sibling (atomic) and removed from there, so that a concurrent writer
    can commit a fresh entry at ``path`` meanwhile, and ``inode`` (the entry's ``st_ino`` when it
    was judged; None: no check) leaves alone an entry another process has replaced since."""
    try:
        if inode is not None and os.stat(path).st_ino != inode:
            return  # replaced since it was judged: another process's fresh entry
    except OSError:
        return  # gone already
    doomed = Path(tempfile.mkdtemp(prefix=_partial_name(path), dir=path.parent))
    try:
        os.rename(path, doomed / "entry")
    except OSError:  # gone meanwhile, or not ours to move
        doomed.rmdir()
        return
    shutil.rmtree(doomed, ignore_errors=True)


def _partial_name(dst: Path) -> str:
    return f".{dst.name}{PARTIAL}{os.getpid()}-"


@contextlib.contextmanager
def atomic_dir(dst, *, shared: bool = False) -> Iterator[Path]:
    """A partial sibling of ``dst`` that becomes ``dst`` on success and vanishes on failure.

    Args:
        dst: the destination; must not exist, or be an empty directory (one made beforehand,
            not a mount point or a link), which the result replaces.
        shared: a cache entry: another live writer of the same entry is not an error, and if
            it finishes first its result is kept and ours dropped.

    Raises:
        ConversionError: ``dst`` exists, or (unless ``shared``) a live process is writing it.
    """
    dst = check_destination(dst, shared=shared)
    made = _make_parents(dst)
    remove_stale_partials(dst, shared=shared)
    tmp = Path(tempfile.mkdtemp(prefix=_partial_name(dst), dir=dst.parent))
    try:
        yield tmp
        check_interrupted()  # a Ctrl-C that native code swallowed on the way: commit nothing
        tmp.chmod(0o755)  # mkdtemp makes it private
        try:
            os.rename(tmp, dst)
        except OSError:
            if not (shared and dst.is_dir()):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # a concurrent writer made the same entry first
    except BaseException as e:  # KeyboardInterrupt too: nothing half-written stays
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in made:  # the directories made for it, innermost first, if still empty
            with contextlib.suppress(OSError):
                parent.rmdir()
        if isinstance(e, OSError) and not e.filename:  # "[Errno 28] No space left on device": where?
            raise ConversionError(f"{dst}: could not be written ({e.strerror or e}); nothing was left") from None
        raise


def check_destination(dst, *, shared: bool = False) -> Path:
    """Refuses, before any work, a destination ``atomic_dir`` would refuse once the work is done:
    one that exists (other than an empty directory), a mount point, a parent that is a file, a
    live writer's (unless ``shared``). Writes nothing; returns the absolute path."""
    dst = Path(dst).absolute()
    if os.path.ismount(dst):  # the result is made beside it and renamed: a mount point cannot be replaced
        raise ConversionError(f"{dst}: a mount point, which cannot be replaced by a rename (the output is written "
                              f"beside it, then renamed into place): give a path inside it, e.g. {dst / 'out'}")
    if not _empty_dir(dst):
        free_path(dst)
    blocking = next((p for p in dst.parents if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise ConversionError(f"{dst}: cannot be created: {blocking} is a file, not a directory")
    for path, pid in [] if shared else _partials(dst):
        if pid is not None and pid != os.getpid() and pid_alive(pid):
            raise ConversionError(f"{dst}: process {pid} is writing it now ({path.name}); wait for it or "
                                  "choose another output path")
    return dst


def _empty_dir(path: Path) -> bool:
    """An empty directory, not a link to one (``rename`` replaces it in one step)."""
    try:
        return path.is_dir() and not path.is_symlink() and not any(path.iterdir())
    except OSError:
        return False


def _make_parents(dst: Path) -> list[Path]:
    """Makes ``dst``'s missing parent directories (``check_destination`` has refused a parent
    that is a file); returns them, innermost first."""
    missing = [p for p in dst.parents if not p.exists()]
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConversionError(f"{dst}: cannot create its directory ({e.strerror or e})") from None
    return missing


def write_atomic(path, data: bytes, *, mode: int | None = None) -> Path:
    """Writes ``data`` to ``path`` through a partial sibling and a rename (replacing ``path``);
    nothing when a Ctrl-C was recorded on the way (``check_interrupted``). The file is private
    (``mkstemp``'s 0600) unless ``mode`` is given."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path, shared=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_partial_name(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        check_interrupted()
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
