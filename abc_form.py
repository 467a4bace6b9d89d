"""
abc_form: a tune's musical form and its IrishMAN control code, torch-free.

Holds:
- sections(tune) -> [Section]: the tune cut where it repeats or double-bars, each with its
  bars and its music as written;
- similarity_level(a, b): 0..10, how alike two sections are;
- control_code(tune) -> "S:2\\nB:8\\nE:6\\nB:8\\n": TunesFormer's code (arXiv 2301.02884) in
  IrishMAN's text form: S, the number of sections; B, the first section's bars; then for each
  later section one E line per earlier section (its similarity to that one, in order), then its B.

Where the paper leaves a detail open, these are the choices (tests/test_form.py checks each on
tunes whose form is known by hand):
- a section ends at :|, ::, || or |], and before a |: that follows bars of music (such a bar
  line with no bar since the last one ends nothing); a tune without any of these is one section;
- endings (|1 ... :|2 ..., or [1 ... [2 ...) belong to the section they end, which counts its
  bars as played the last time through: its common bars plus its last ending's;
- a bar shorter than the meter that opens a section is a pickup and not counted; a short bar
  that closes a section (it completes the pickup) is counted; without a numeric meter every bar
  counts;
- similarity = 1 - Levenshtein distance / the longer length, over the two sections' notes,
  rests and chords as written (chord symbols, decorations, grace notes and spaces left out),
  in tenths, rounded.
These are the counts as found: IrishMAN's ranges (1-8 sections, 1-32 bars) are for requests.

Also: parse_control_code and form_code (a requested form, in either spelling), next_code_field
(the order of a code's lines, which --constrained follows), strip_control_code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fractions import Fraction

from abc_music import bar_units, header_field, parse_meter, token_length, tune_body
from abc_tokens import PromptError, iter_token_kinds, music_only

SECTION_END = re.compile(r":\||::|\|\||\|\]")     # bar lines that end a section
ENDING_NUMBER = re.compile(r"(\d+)(?:[,-]\d+)*$")  # |1 :|2 [1 [2 |1,3
TUPLET_Q = {2: 3, 3: 2, 4: 3, 6: 2, 8: 3}  # (p: p notes in the time of q; (5 (7 (9: 2 in compound meters, else 3


@dataclass
class Section:
    common_bars: int = 0                          # bars before any ending
    ending_bars: int = 0                          # bars of the ending read last
    music: list[str] = field(default_factory=list)  # notes, rests and chords as written

    @property
    def bars(self) -> int:
        return self.common_bars + self.ending_bars


@dataclass
class _Reader:
    """Where the walk through a tune's body stands."""
    full: Fraction | None                         # a full bar in units of L (None: no numeric meter)
    meter: str | None                             # M: and L: as they stand (inline fields change them)
    unit: str | None
    sections: list[Section] = field(default_factory=lambda: [Section()])
    time: Fraction = Fraction(0)                  # this bar so far, in units of L
    opening: bool = True                          # this bar opens a section: if short, a pickup
    ending: int = 0                               # the number of the ending being read (0: none)
    tuplet: tuple[int, Fraction] = (0, Fraction(1))  # notes left in a tuplet, and their time factor
    chord: list | None = None                     # the notes of an open [chord]
    bar_times: list = field(default_factory=list)  # (time, full) of each bar closed, in units of L


def sections(tune: str) -> list[Section]:
    """The tune's sections in order, by the rules in the module's docstring."""
    return _read(tune).sections


def bar_times(tune: str) -> list[tuple[Fraction, Fraction | None]]:
    """(its time, a full bar's) of each bar in order, in units of L: what a judge checks its lengths by."""
    return _read(tune).bar_times


def _read(tune: str) -> _Reader:
    tune = music_only(tune)  # a prompt's comments and info lines, kept in the tune, are no bars
    meter, unit = header_field(tune, "M"), header_field(tune, "L")
    r = _Reader(bar_units(meter, unit), meter, unit)
    for token, kind in iter_token_kinds(tune_body(tune)):
        if kind in ("note", "rest", "chord_open", "chord_close", "tuplet"):
            _add_time(r, token, kind)
        elif kind in ("bar", "ending"):
            _bar_line(r, token)
        elif kind == "inline_field" and token[1] in "LM":
            _change_meter(r, token)
    _close_bar(r)
    if len(r.sections) > 1 and not r.sections[-1].bars:
        r.sections.pop()
    return r


def _add_time(r: _Reader, token: str, kind: str) -> None:
    if kind == "tuplet":
        r.tuplet = tuplet_timing(token, r.meter)
        return
    if kind == "chord_open":
        r.chord = []
        return
    r.sections[-1].music.append(token)
    if token.startswith("Z"):  # Z4: four bars of rest, each a full bar
        r.time += r.full or 1
        _count_bars(r, int(token[1:] or 1) - 1)
        return
    length = token_length(token)
    if r.chord is not None and kind == "note":
        r.chord.append(length)  # a chord lasts as long as its first note, times the length after ]
        return
    if kind == "chord_close":
        length *= r.chord[0] if r.chord else 1
        r.chord = None
    left, factor = r.tuplet
    r.time += length * (factor if left else 1)
    r.tuplet = (max(0, left - 1), factor)


def tuplet_timing(token: str, meter: str | None) -> tuple[int, Fraction]:
    """(r, q/p) of a tuplet "(p:q:r": its next r notes (p unless given) take q/p of their time, q by the
    standard's table where it is left out ("(3" and "(3::" alike)."""
    p, q, r = re.fullmatch(r"\((\d+)(?::(\d*))?(?::(\d*))?", token).groups()
    p = int(p)
    beats = parse_meter(meter) if meter else None
    compound = beats is not None and beats[0] % 3 == 0 and beats[0] > 3
    q = int(q) if q else TUPLET_Q.get(p, 2 if compound else 3)
    return (int(r) if r else p), Fraction(q, p) if p else Fraction(1)


def _close_bar(r: _Reader) -> None:
    """Count the bar that a bar line (or the tune's end) closes, unless it is a pickup."""
    if r.time > 0:
        r.bar_times.append((r.time, r.full))
        pickup = r.opening and r.full is not None and r.time < r.full
        _count_bars(r, 0 if pickup else 1)
        r.opening = False
    r.time = Fraction(0)


def _count_bars(r: _Reader, n: int) -> None:
    if r.ending:
        r.sections[-1].ending_bars += n
    else:
        r.sections[-1].common_bars += n


def _bar_line(r: _Reader, token: str) -> None:
    _close_bar(r)
    section, ending = r.sections[-1], ENDING_NUMBER.search(token)
    if ending:  # a new ending replaces the one before it: the section counts the last one played
        r.ending, section.ending_bars = int(ending.group(1)), 0
    elif r.ending == 1 and token.startswith(":|"):
        pass    # the repeat at the end of a first ending: the second ending follows ([1 ...:| [2 ...)
    elif section.bars and ends_section(token):
        _new_section(r)  # (a double bar right after another one ends nothing more)


def ends_section(bar: str) -> bool:
    """Whether a bar line that is no ending ends a section that has bars: :|, ::, ||, |], |:."""
    return bool(SECTION_END.search(bar) or bar.startswith("|:"))


def _new_section(r: _Reader) -> None:
    r.sections.append(Section())
    r.opening, r.ending = True, 0


def _change_meter(r: _Reader, token: str) -> None:
    letter, value = token[1], token[3:-1].strip()
    if letter == "M":
        r.meter = value
    else:
        r.unit = value
    r.full = bar_units(r.meter, r.unit)


def levenshtein(a: list[str], b: list[str]) -> int:
    """Edits (insert, delete, replace one item) that turn a into b."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        current = [i]
        for j, y in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def similarity_level(a: Section, b: Section) -> int:
    """0 (nothing alike) .. 10 (the same music)."""
    longest = max(len(a.music), len(b.music))
    if longest == 0:
        return 10
    return round(10 * (1 - levenshtein(a.music, b.music) / longest))


def control_code(tune: str) -> str:
    """IrishMAN's control code of a tune: S, then B (and the E lines before each later B)."""
    found = sections(tune)
    lines = [f"S:{len(found)}"]
    for i, section in enumerate(found):
        lines += [f"E:{similarity_level(section, earlier)}" for earlier in found[:i]]
        lines.append(f"B:{section.bars}")
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# requests: a form asked for, as an IrishMAN code or as sections and bars

MAX_SECTIONS, MAX_BARS, MAX_LEVEL = 8, 32, 10   # IrishMAN's ranges (TunesFormer)
CODE_LINES = {"S": [f"S:{n}" for n in range(1, MAX_SECTIONS + 1)], "B": [f"B:{n}" for n in range(1, MAX_BARS + 1)],
              "E": [f"E:{n}" for n in range(MAX_LEVEL + 1)]}
# A code names every similarity; a request by sections and bars names none, so it asks for
# the training corpus's most common level between two parts (2,014 of its 2,521 8+8 tunes
# have E:1 to E:5, the most E:3).
DEFAULT_SIMILARITY = 3
_CODE_LINE = re.compile(r"^[SBE]:[0-9]+$")  # ASCII digits: \d would take "B:\u0664" (Arabic-Indic four)


def next_code_field(lines: tuple[str, ...] | list[str]) -> str:
    """The letter the next line of a control code begins with: S, E or B, or X when it is complete."""
    if not lines:
        return "S"
    bars = sum(line[0] == "B" for line in lines)
    if bars == int(lines[0][2:]):
        return "X"
    since_bar = len(lines) - 1 - max((i for i, line in enumerate(lines) if line[0] == "B"), default=0)
    return "B" if since_bar == bars else "E"  # section i (from 0) is i E lines, then its B


def is_control_code(text: str) -> bool:
    """Whether text is a whole control code, its lines in IrishMAN's order (S:, B:, then E: lines and a
    B: for each later section), whatever their numbers: a corpus holds more sections and bars than a
    request may ask for (parse_control_code's limits)."""
    lines = text.split()
    for i, line in enumerate(lines):
        if not _CODE_LINE.match(line) or next_code_field(lines[:i]) != line[0]:
            return False
    return bool(lines) and next_code_field(lines) == "X"


def parse_control_code(text: str, flag: str = "--form") -> tuple[tuple[int, ...], str]:
    """A control code as a user may type it ("S:2 B:8 E:3 B:8", newlines, commas or a literal
    \\n between lines) -> (bars of each section, the code in IrishMAN's form)."""
    lines = [part for part in re.split(r"(?:\\n|[\s,;])+", text.strip()) if part]
    # B:08 is B:8, and a number of thousands of digits is only out of range (int() refuses past 4,300)
    lines = [line[:2] + (line[2:].lstrip("0") or "0") if _CODE_LINE.match(line) else line for line in lines]
    for i, line in enumerate(lines):
        want = next_code_field(lines[:i])
        if want == "X" or not _CODE_LINE.match(line) or line[0] != want:
            raise PromptError(f"{flag} {text!r}: expected {'no more lines' if want == 'X' else want + ':'} "
                              f"at {line!r}; a code is S:n, B:n, then E:n lines and a B:n per later section, "
                              f"e.g. \"S:2 B:8 E:3 B:8\"")
        if line not in CODE_LINES[want]:
            low, high = CODE_LINES[want][0][2:], CODE_LINES[want][-1][2:]
            what = {"S": "sections", "B": "bars in a section", "E": "similarity levels"}[want]
            raise PromptError(f"{flag} {text!r}: {line}: {what} must be {low} to {high}")
    if not lines or next_code_field(lines) != "X":
        raise PromptError(f"{flag} {text!r}: the code is incomplete; e.g. \"S:2 B:8 E:3 B:8\" is two sections "
                          f"of 8 bars")
    return tuple(int(line[2:]) for line in lines if line[0] == "B"), "\n".join(lines) + "\n"


def form_code(bars: list[int], similarity: int = DEFAULT_SIMILARITY) -> str:
    """The control code of a form given as bars per section, every similarity `similarity`."""
    lines = [f"S:{len(bars)}"]
    for i, n in enumerate(bars):
        lines += [f"E:{similarity}"] * i + [f"B:{n}"]
    return "\n".join(lines) + "\n"


def strip_control_code(text: str) -> str:
    """The tune after the control code that a --control model writes before it."""
    return re.sub(r"\A(?:[SBE]:\d+\n)*", "", text)
