"""
cli: command-line plumbing shared by every command (musicrnn.py, infer_onnx.py, export.py, serve.py,
bench.py, the data builders). Torch-free.

Holds:
- UserError, run_command, first_line: every command's errors as one `error:` line and exit code 2,
  never a traceback; Parser: argparse whose own errors are one such line too; ReaderSafeStdout:
  a reader that stops early (`| head`) ends the printing, not the work;
- int_in, float_in, positive_int, positive_float: argparse types that check a range and
  say what is wrong in words (nan and inf refused); check_dataclass applies them to a
  config that did not come from flags (a checkpoint's, an API caller's);
- dataclass_flags: one flag per field of a config dataclass, its help taken from the
  field's own comment and its group from the comment line above, so each setting is
  documented once, in the dataclass;
- dataclass_from_args: the dataclass back from the parsed flags;
- abc_text: an ABC prompt as typed on a command line, its \\n as line breaks;
- check_model_file: what a model file named on the command line must be before it is opened.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import io
import math
import os
import re
import signal
import sys
import time
import tokenize
from pathlib import Path


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`): raised where the command is, so that it cleans up as after Ctrl-C."""


class UserError(Exception):
    """Bad input or an impossible request: one `error:` line, exit code 2, no traceback."""

    every_rank = False  # under torchrun every rank meets the same error: rank 0 alone says it


def quiet_interrupt_while_loading(module_name: str) -> None:
    """In a script run as a command (module_name "__main__"), before its heavy imports: Ctrl-C or `kill`
    while torch loads (2-3 s) ends as it does once run_command runs, in one line ("interrupted", 130;
    "terminated", 143), not in a traceback from inside the import, or silently. A signal the shell has
    told the command to ignore stays ignored; a torchrun rank's SIGTERM is its launcher's to handle."""
    if module_name != "__main__":
        return
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted_now)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and torchrun_worker() is None:
        signal.signal(signal.SIGTERM, _terminated_while_loading)


def _interrupted_now(signum, frame) -> None:
    """Ctrl-C while torch loads: one line, then out at once (_exit_interrupted)."""
    _interrupted()
    _exit_interrupted(signum, frame)


def _terminated_while_loading(signum, frame) -> None:
    os._exit(_terminated())


def _exit_interrupted(signum, frame) -> None:
    """Leaves now, skipping the clean-up and exit handlers left (a KeyboardInterrupt raised inside them would
    end in a traceback), once what the command printed is out."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):  # closed, or None (`>&-`)
            stream.flush()
    os._exit(130)


TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def torchrun_worker() -> dict[str, int] | None:
    """This process's place among torchrun's workers ({"RANK": 0, "WORLD_SIZE": 2, ...}), or None where
    torchrun did not start it. A RANK left in the shell, or set by a cluster for another launcher, is
    not torchrun's: torchrun also sets TORCHELASTIC_RUN_ID, and every one of the four as a number."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" not in env or not all(env.get(name, "").isdigit() for name in TORCHRUN_VARIABLES):
        return None
    return {name: int(env[name]) for name in TORCHRUN_VARIABLES}


class CtrlC:
    """Ctrl-C in a command's process, once it has loaded. While the command works, the first raises
    KeyboardInterrupt where it is, so that it cleans up and says "interrupted" (130). A second within
    SAME_PRESS seconds is the same request, which is being honoured: ignored, since a KeyboardInterrupt
    raised inside the clean-up would end in a traceback and leave it half done. One later than that (the
    clean-up stuck, or the first swallowed by a library), or one outside the work (Python exiting after
    it): out at once, with "interrupted" said once (_exit_interrupted)."""

    SAME_PRESS = 1.0  # seconds: a double press by hand is 0.1-0.3 s apart

    def __init__(self):
        self.working, self.first, self.said = False, None, False

    def __call__(self, signum, frame) -> None:
        if self.working and self.first is None:
            self.first = time.monotonic()
            raise KeyboardInterrupt
        if self.first is not None and time.monotonic() - self.first < self.SAME_PRESS:
            return
        self.say()
        _exit_interrupted(signum, frame)

    def run(self, command, args) -> None:
        """command(args): the work during which Ctrl-C raises KeyboardInterrupt."""
        self.working = True
        try:
            command(args)
        finally:
            self.working = False

    def say(self) -> int:
        if not self.said:
            self.said = True
            _interrupted()
        return 130


def run_command(command, args) -> int:
    """command(args), with what a user can cause shown as one `error:` line (exit 2); its stdout
    a ReaderSafeStdout, so that `| head` ends the printing, never the work. In a command's process
    (quiet_interrupt_while_loading) Ctrl-C is CtrlC's from here to the process's end."""
    ctrl_c = CtrlC()
    if signal.getsignal(signal.SIGINT) is _interrupted_now:
        signal.signal(signal.SIGINT, ctrl_c)
    if signal.getsignal(signal.SIGTERM) is _terminated_while_loading:  # and kill ends through the clean-up below
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # `kill` ends the command as Ctrl-C does, through its clean-up (the default would leave half-written
    # files); not a torchrun rank's, whose launcher stops it and may find it inside a collective
    terminate = torchrun_worker() is None and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    if terminate:
        signal.signal(signal.SIGTERM, _terminate)
    stdout, sys.stdout = sys.stdout, ReaderSafeStdout(sys.stdout)
    stderr, sys.stderr = sys.stderr, sys.stderr or _devnull_on(2)
    try:
        return _errors_as_lines(command, args, ctrl_c)
    finally:
        sys.stdout, sys.stderr = stdout, stderr
        if terminate:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _devnull_on(descriptor: int):
    """A closed stdout or stderr (`>&-`, `2>&-`: Python has none) made devnull on its own descriptor:
    what is printed, progress bars and warnings then go nowhere instead of failing, and no file the
    command opens (a checkpoint, say) takes the descriptor, where torch's own output would land in it."""
    fd = os.open(os.devnull, os.O_WRONLY)
    if fd != descriptor:
        os.dup2(fd, descriptor)
        os.close(fd)
    return open(descriptor, "w", closefd=False)


class ReaderSafeStdout:
    """stdout whose reader may go (`| head -1`): from then on what is printed goes nowhere instead
    of raising, so a training, a sweep and the files they write go on to the end. `gone` says so.
    A stdout that fails otherwise (a full disk behind `> file`) is said once on stderr, then dropped."""

    def __init__(self, stream):
        self.stream, self.gone = stream, stream is None
        if stream is None:  # a closed stdout (`>&-`): Python has none
            self.stream = _devnull_on(1)

    def write(self, text: str) -> int:
        self._try(self.stream.write, text)
        return len(text)

    def flush(self) -> None:
        self._try(self.stream.flush)

    def _try(self, method, *args) -> None:
        if self.gone:
            return
        try:
            method(*args)
        except OSError as e:
            self.gone = True
            if not isinstance(e, BrokenPipeError):
                with contextlib.suppress(OSError):  # stderr on the same full disk: nothing left to tell
                    print(f"warning: standard output: {e.strerror or e}; the command goes on without it",
                          file=sys.stderr)
            with contextlib.suppress(OSError, ValueError):  # Python's own flush at exit must not fail either
                os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _errors_as_lines(command, args, ctrl_c: CtrlC) -> int:
    try:
        ctrl_c.run(command, args)
    except UserError as e:
        return error_line(str(e), every_rank=e.every_rank)
    except OSError as e:  # a file the user named: full disk, no permission, ...
        return error_line(f"{e.filename}: {e.strerror}" if e.filename else str(e))
    except MemoryError:
        return error_line("out of memory: ask for less (fewer or shorter tunes, a smaller model)")
    except Terminated:
        return _terminated()
    except KeyboardInterrupt:
        return ctrl_c.say()
    except Exception as e:  # a library that turned Ctrl-C into its own error (torch.export, while it imports)
        if _caused_by_interrupt(e):
            return ctrl_c.say()
        raise
    return 0


def _terminate(signum, frame) -> None:
    raise Terminated


def _interrupted() -> int:
    if torchrun_worker() is None:  # under torchrun the launcher says it, once
        _say("interrupted")
    return 130


def _terminated() -> int:
    _say("terminated")
    return 143


def _say(line: str) -> None:
    """line on stderr; nowhere when stderr is closed (2>&-: print would write to stdout) or full."""
    if sys.stderr is not None:
        with contextlib.suppress(OSError):
            print(line, file=sys.stderr, flush=True)


def _caused_by_interrupt(e: BaseException | None) -> bool:
    """Whether a KeyboardInterrupt is among the exceptions that led to e."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def first_line(e: Exception, limit: int = 160) -> str:
    """An exception's first line, cut to limit characters (its type's name if it says nothing)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]


def error_line(message: str, every_rank: bool = False) -> int:
    """Print `error: message` as one line (a newline the user typed into a path is shown as \\n).
    Under torchrun only rank 0 prints it, unless every_rank: each rank meets the same flags and files."""
    if every_rank or _rank_0():
        _say("error: " + not_utf8_as_bytes(message).replace("\r", "\\r").replace("\n", "\\n"))
    return 2


def note_line(message: str) -> None:
    """Print `note: message` on stderr; under torchrun rank 0 alone, as error_line: each rank reads
    the same data, and two ranks' notes would run into one line."""
    if _rank_0():
        _say("note: " + message)


def _rank_0() -> bool:
    """Not under torchrun, or its rank 0."""
    return (torchrun_worker() or {"RANK": 0})["RANK"] == 0


def not_utf8_as_bytes(text: str) -> str:
    """A byte a command line held that is not UTF-8 as \\xff, the byte it is: Python reads it as the
    stand-in \\udcff (surrogateescape), which is what a quoted value would otherwise show."""
    text = re.sub("[\udc80-\udcff]", lambda m: f"\\x{ord(m.group()) - 0xdc00:02x}", text)
    return re.sub(r"\\udc([89a-f][0-9a-f])", r"\\x\1", text)


def abc_text(value: str) -> str:
    """ABC typed on a command line, where a shell passes \\n through as two characters: each \\n
    becomes the line break it stands for (in a prompt it stands for nothing else); a file's
    Windows line breaks (\\r\\n), pasted in, become plain ones."""
    return value.replace("\\n", "\n").replace("\r\n", "\n")


def check_model_file(path: str, what: str, name: str, missing: str = "", error=UserError) -> None:
    """A file, named, that is there: not an empty name (Path("") is the current folder), not a
    folder (its `name` inside is suggested). what: "checkpoint", say; missing: how to make it."""
    if not str(path).strip():
        raise error(f"{str(path)!r} names no {what}: give one (runs/{name}, say)")
    if Path(path).is_dir():
        raise error(f"{path} is a folder: give the {what} in it ({Path(path) / name}, say)")
    if Path(path).exists() and not Path(path).is_file():  # a pipe or a device: torch and onnxruntime read files
        raise error(f"{path} is not a regular file (a pipe or a device): give the {what} file itself")
    if not Path(path).is_file():
        raise error(f"{path}: no such {what}{missing}")


class Parser(argparse.ArgumentParser):
    """argparse, with its own errors (an unknown flag, a value out of range) as one line."""

    def error(self, message: str):
        sys.exit(error_line(f"{message} (see {self.prog} --help)"))

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but a flag no command knows sends the user to its command's help (musicrnn.py
        train --help), where the flags are, not to the list of commands."""
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            command = getattr(namespace, "command", None)
            prog = f"{self.prog} {command}" if command else self.prog
            sys.exit(error_line(f"unrecognized arguments: {' '.join(extras)} (see {prog} --help)"))
        return namespace


def shown(text: str, limit: int = 40) -> str:
    """A value as a message shows it: quoted, control characters escaped, cut after limit characters."""
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def _number(text: str, kind):
    what = f"{shown(text)} is not a {'whole ' if kind is int else ''}number"
    if not text.isascii() or "_" in text:  # a number as people write it ("1_000" and "١٢" are Python's)
        raise argparse.ArgumentTypeError(what)
    try:
        value = kind(text)
    except (TypeError, ValueError):
        digits = re.fullmatch(r"\s*[+-]?(\d+)\s*", text)  # a whole number past the 4,300 digits int() reads
        raise (too_many_digits(text, len(digits[1])) if digits else argparse.ArgumentTypeError(what)) from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{shown(text)} is not a finite number")
    return value


def too_many_digits(text: str, digits: int) -> argparse.ArgumentTypeError:
    """The refusal of a whole number too long to write out or read."""
    return argparse.ArgumentTypeError(f"{shown(text)} has {digits:,} digits, far past what it may be")


def int_in(low: int, high: int | None = None):
    """An argparse type: a whole number from low to high (no bound above when high is None)."""
    def check(text: str) -> int:
        value = _number(text, int)
        if value < low or (high is not None and value > high):
            bound = f"from {low:,} to {high:,}" if high is not None else f"at least {low:,}"
            raise argparse.ArgumentTypeError(f"must be a whole number {bound}, got {shown(text)}")
        return value

    check.__name__ = "whole number"
    return check


def float_in(low: float, high: float, low_open: bool = False, high_open: bool = False):
    """An argparse type: a finite number between low and high, each end included unless open."""
    def check(text: str) -> float:
        value = _number(text, float)
        if value < low or value > high or (low_open and value == low) or (high_open and value == high):
            words = f"{'above' if low_open else 'at least'} {low:g} and {'below' if high_open else 'at most'} {high:g}"
            raise argparse.ArgumentTypeError(f"must be a number {words}, got {shown(text)}")
        return value

    check.__name__ = "number"
    return check


positive_int = int_in(1)
positive_float = float_in(0, 1e6, low_open=True)


def check_dataclass(obj, types: dict, source: str) -> None:
    """The same range checks as the flags, for settings that came from elsewhere (source)."""
    for name, check in types.items():
        value = getattr(obj, name)
        if value is None:
            continue
        try:
            if isinstance(value, bool) or check(str(value)) != value:
                raise argparse.ArgumentTypeError(f"has the wrong type ({type(value).__name__})")
        except argparse.ArgumentTypeError as e:
            raise UserError(f"{source}: --{name.replace('_', '-')} {e}") from None


def field_comments(cls) -> tuple[dict[str, str], dict[str, str]]:
    """({field: its trailing comment}, {field: the group comment above it}) of a dataclass."""
    comments, groups, group, name, last = {}, {}, "options", None, None
    for tok in tokenize.generate_tokens(io.StringIO(inspect.getsource(cls)).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and name is None:
            name = last = tok.string  # the first name on a line inside the class body
        elif tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("# ").strip()
            if name is not None:
                comments[name], groups[name] = text, group
            elif tok.start[1] == 4:
                group, last = text, None
            elif last in comments:  # a field's comment, continued on the lines below it
                comments[last] += " " + text
        if tok.type in (tokenize.NEWLINE, tokenize.NL):
            name = None
    return comments, groups


def dataclass_flags(parser: argparse.ArgumentParser, cls, choices: dict | None = None,
                    types: dict | None = None, flag_names: dict | None = None) -> None:
    """One --flag per field of cls, in argument groups as the dataclass's comments group them.

    The type comes from types (an argparse type that checks the range) or the annotation;
    every flag defaults to None, so dataclass_from_args keeps only what the user gave.
    """
    comments, groups = field_comments(cls)
    defaults, choices, types, flag_names = cls(), choices or {}, types or {}, flag_names or {}
    sections = {}
    for f in dataclasses.fields(cls):
        title = groups.get(f.name, "options")
        if title not in sections:
            sections[title] = parser.add_argument_group(title)
        flag = "--" + flag_names.get(f.name, f.name.replace("_", "-"))
        default = getattr(defaults, f.name)
        shown = {True: "on", False: "off"}[default] if f.type == "bool" else default  # not 1 as "on"
        about = comments.get(f.name, "") + ("" if default is None else f" (default: {shown})")  # None: the comment says
        if f.type == "bool":  # a switch: given, it is on
            sections[title].add_argument(flag, dest=f.name, action="store_const", const=True, default=None, help=about)
            continue
        kind = types.get(f.name) or {"int": int, "float": float, "str": str}[f.type.split(" ")[0]]
        sections[title].add_argument(flag, dest=f.name, type=kind, choices=choices.get(f.name), default=None,
                                     help=about)


def dataclass_from_args(cls, args: argparse.Namespace):
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}
    return cls(**given)
