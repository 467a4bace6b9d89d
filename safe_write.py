"""
safe_write: no output replaces an input or an existing file unless the user asks. Torch-free.

Holds:
- OutputError: what goes wrong with an output, as one line that names the user's path;
- check_output: refuse, before any work starts, an --out that is an input of the same
  command, an existing file (without --overwrite), a folder, or a place that cannot be written;
  it creates nothing, so a command refused later leaves no folder behind;
- check_run_files: the same for every file a training writes in its folder;
- folder_files: the files a folder of tunes is read for, an unreadable subfolder an error;
- same_file: whether two paths (links followed, a file:// URL read) name one file;
- atomic_file, write_atomic: write beside the target, then rename (or, without --overwrite,
  hard-link) it into place, its bytes on disk first, so a crash never leaves half a file and a file that appeared
  meanwhile is never replaced; a new file gets the usual mode (umask), a replaced one keeps its own;
- folder_lock: an advisory lock that one training holds on its run folder;
- removed_if_failed: a folder a command creates is removed again if the command fails before
  writing anything into it.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import signal
import stat
import tempfile
import threading
import urllib.parse
from pathlib import Path

from cli import UserError, shown


class OutputError(UserError):
    """An output that would destroy something, or cannot be written."""


NAME_LIMIT = 255 - 16  # bytes of a file name (Linux's 255, less what the temporary name adds, "..12345678.tmp", and 2 spare)


READ_IN_FOLDERS = (".abc", ".json")  # the files a folder of tunes is read for (corpus.load_records), any case


def folder_files(folder: Path) -> list[Path]:
    """The tunebooks and JSON files in a folder and its subfolders (B.ABC and X.JSON too, as when named
    alone); a subfolder that cannot be read is an error, not a silent gap in the data."""
    def unreadable(e: OSError):
        raise UserError(f"{e.filename}: cannot read this folder ({e.strerror})")

    found = (Path(root, name) for root, _, names in os.walk(folder, onerror=unreadable) for name in names)
    return sorted(f for f in found if f.suffix.lower() in READ_IN_FOLDERS and f.is_file())


def same_file(a: Path, b: str | Path) -> bool:
    """Whether a is the input b, or one of the files an input folder b is read for; b may be a file:// URL
    (in any case, as the readers take it), which names a local file too (a remote URL names none)."""
    if str(b).lower().startswith("file://"):
        b = urllib.parse.unquote(urllib.parse.urlparse(str(b)).path)
    elif "://" in str(b):
        return False
    b = Path(b)
    if b.is_dir() and not a.is_dir():
        return any(_one_file(a, f) for f in folder_files(b))
    return _one_file(a, b)


def _one_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python 3.11's resolve); the checks after say so
        return False


def check_output(path: str | Path, flag: str = "--out", overwrite: bool = False, inputs=(),
                 folder: bool = False, suffix: str = "", named_by: str = "name") -> Path:
    """path, once it is sure that writing it destroys nothing the user did not ask to replace.
    suffix: the ending its format's files have (".abc"), so that a slip of the name cannot replace
    a file of another kind, such as a checkpoint, even with --overwrite. named_by: what the user
    chooses of path ("folder" where the file's own name is fixed)."""
    ending = f" ending in {suffix}" if suffix else ""
    if not folder and (not str(path).strip() or str(path).endswith(("/", os.sep))):  # Path() would drop the "/"
        raise OutputError(f"{flag} {str(path)!r} names no file; give a file name{ending}")
    if folder and not str(path).strip():  # Path("") is the current folder
        raise OutputError(f"{flag} '' names no folder; give one (runs, say)")
    p = Path(path)
    if len(os.fsencode(p.name)) > NAME_LIMIT:  # found now, not once the work is done
        raise OutputError(f"{flag} {shown(p.name)}: a name of more than {NAME_LIMIT} bytes cannot be written "
                          f"here; give a shorter one")
    for source in inputs:
        if source and same_file(p, source):
            raise OutputError(f"{flag} {path} is also what this command reads ({source}); choose another name")
    if suffix and p.suffix.lower() != suffix:
        raise OutputError(f"{flag} {path}: give a file name{ending}")
    if folder and p.exists() and not p.is_dir():
        raise OutputError(f"{flag} {path} is not a folder; a training writes a folder of checkpoints")
    if not folder and _not_a_file(p):
        raise OutputError(f"{flag} {path} {_not_a_file(p)}; give a file name")
    if p.is_symlink() and not p.exists():  # the rename that writes it would fail only after the work
        raise OutputError(f"{flag} {path} is a link to a missing {os.readlink(p)}; give another name")
    why = _not_a_file(_target(p), system=True) if not folder and p.is_symlink() else ""  # /dev/stdout: /proc/...
    if why:
        raise OutputError(f"{flag} {path} is a link to {_target(p)}, which {why}; give a file name")
    if not folder and p.exists() and not overwrite:
        raise OutputError(f"{flag} {path} exists: pass --overwrite to replace it, or choose another {named_by}")
    probe_writable(p if folder else p.parent, flag, path)
    return p


def probe_writable(folder: Path, flag: str, path) -> None:
    """Can folder be written, or, where it is missing, created? Probed in its nearest existing folder."""
    for nearest in (folder, *folder.parents):
        if nearest.exists():
            break
        if nearest.is_symlink():  # nothing could be created under it
            raise OutputError(f"{flag} {path}: {nearest} is a link to a missing {os.readlink(nearest)}")
    try:
        fd, probe = tempfile.mkstemp(dir=nearest, prefix=".write-probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{flag} {path}: cannot write in {nearest} ({e.strerror})") from None


def _not_a_file(path: Path, system: bool = False) -> str:
    """Why no file is to be written at path ("" where it holds a regular file or nothing): a folder, or
    a device or a pipe, which the atomic rename would replace by a plain file (/dev/null, say); with
    system, a link's target in /proc or /dev (a process's open file, a terminal)."""
    if path.is_dir():
        return "is a folder"
    if system and path.parts[1:2] in (("proc",), ("dev",)):
        return "is the system's, not a regular file"
    return "is not a regular file (a device or a pipe)" if path.exists() and not path.is_file() else ""


def _target(path: Path) -> Path:
    """Where a link leads, through every link on the way: what writing the link writes."""
    return Path(os.path.realpath(path))


def check_run_files(folder: Path, names: tuple[str, ...], replace: bool, inputs=()) -> None:
    """Before a training's first epoch: every file it will write in folder can be written there,
    none of them is one of its inputs (its data), and, unless replace (--resume, --overwrite),
    none of them exists yet."""
    for name in names:
        for source in inputs:
            if same_file(folder / name, source):
                raise OutputError(f"{folder / name}, which this training writes, is also what it reads ({source}): "
                                  f"choose another --out")
        if _not_a_file(folder / name):
            raise OutputError(f"{folder / name} {_not_a_file(folder / name)}, where this training writes a file: "
                              f"move it away, or choose another --out")
    existing = [name for name in names if (folder / name).exists()]
    if existing and not replace:
        raise OutputError(f"{folder}/ already holds {', '.join(existing)}: pass --resume to continue the run, "
                          f"--overwrite to replace it, or --out DIR for a new run")
    probe_writable(folder, "--out", folder)


def _mode_for(path: Path) -> int:
    """The mode a file written at path should get: its own if it exists, else 0666 less the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


@contextlib.contextmanager
def _naming(path: Path):
    """A failure of our own file operations, as one line that names the user's path."""
    try:
        yield
    except FileExistsError:
        raise OutputError(f"{path} was written by another command while this one ran; left as it was") from None
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({e.strerror})") from None


class _Writer:
    """The temporary file, as the caller sees it: a failed write (a full disk) names path."""

    def __init__(self, f, path: Path):
        self.f, self.path = f, path

    def write(self, data: bytes) -> None:
        with _naming(self.path):
            self.f.write(data)


@contextlib.contextmanager
def atomic_file(path: str | Path, overwrite: bool = True):
    """A binary file to write; it becomes path only when the block ends without an error.
    Errors of the caller's own code in the block pass through untouched."""
    path = _target(path) if Path(path).is_symlink() else Path(path)  # the link stays, its file is replaced
    made = [folder for folder in (path.parent, *path.parent.parents) if not folder.exists()]  # innermost first
    try:
        with _naming(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        f = os.fdopen(fd, "wb")
        try:
            yield _Writer(f, path)
            with _naming(path):
                f.flush()  # the last buffered bytes: a full disk can show here too
                os.fsync(f.fileno())  # on disk before the rename: a power cut leaves the old file or the new one
                f.close()
                os.chmod(tmp, _mode_for(path))
                if overwrite:
                    os.replace(tmp, path)
                else:
                    os.link(tmp, path)  # fails if path exists, even if it appeared while this command ran
        finally:
            with contextlib.suppress(OSError):
                f.close()
            Path(tmp).unlink(missing_ok=True)
    except BaseException:  # a write that failed leaves no folder it made behind (one holding anything else stays)
        for folder in made:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def write_atomic(path: str | Path, data: bytes, overwrite: bool = True) -> None:
    """Write data to path through atomic_file."""
    with atomic_file(path, overwrite) as f:
        f.write(data)


@contextlib.contextmanager
def folder_lock(folder: Path, leftovers: tuple[str, ...] = ()):
    """Hold an advisory lock on a run folder; a second holder gets an OutputError with our PID. Once held,
    the temporary files that a killed holder left of the files named in leftovers are removed."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise OutputError(f"{folder}/ is in use by another training (PID {f.read().strip() or '?'}): "
                              f"wait for it to end, or choose another --out") from None
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        _remove_leftovers(folder, leftovers)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_leftovers(folder: Path, names: tuple[str, ...]) -> None:
    """The temporary files atomic_file left of these names when its process was killed mid-write (kill -9
    skips its clean-up); with the folder's lock held, no writer of them is at work."""
    for name in names:
        for tmp in folder.glob(f".{glob.escape(name)}.*.tmp"):
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def deferred_interrupt():
    """Ctrl-C (and a `kill` that run_command turns into Terminated) waits for the block to end, then
    interrupts: files written as a pair (best.pt, last.pt) are both of one run, never one new and one
    old. Outside the main thread it is a plain block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    deferred = [sig for sig in (signal.SIGINT, signal.SIGTERM) if callable(signal.getsignal(sig))]
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in deferred}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:  # now, through the handler it was kept from (cli.CtrlC, or what raises Terminated)
        previous[received[0]](received[0], None)


@contextlib.contextmanager
def removed_if_failed(folder: Path):
    """Run the block; if it fails, remove the folders it created on the way to folder, as long as
    they hold nothing but a training's .lock, or in a folder that was there, the .lock it made:
    a refused command leaves no trace."""
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # the deepest first
    lock_was_there = (folder / ".lock").exists()
    try:
        yield
    except BaseException:
        if not (created or lock_was_there or _held(folder / ".lock")):  # a folder that was there: our lock alone
            with contextlib.suppress(OSError):
                (folder / ".lock").unlink(missing_ok=True)
        for p in created:
            with contextlib.suppress(OSError):
                if {c.name for c in p.iterdir()} <= {".lock"} and not _held(p / ".lock"):
                    (p / ".lock").unlink(missing_ok=True)
                p.rmdir()  # fails, and is left, if anything else is in it
        raise


def _held(lock: Path) -> bool:
    """Whether a training holds this lock now: one that took the folder this command made, and
    refused it, owns the folder (its lock and its checkpoints to come)."""
    try:
        with open(lock) as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(f, fcntl.LOCK_UN)
    except BlockingIOError:
        return True
    except FileNotFoundError:
        return False
    return False
