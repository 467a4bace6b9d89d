"""
abc_constraint: the automaton behind --constrained sampling, torch-free.

Holds:
- AbcConstraint: start(prompt) -> TuneState, mask(state, tokens_left) -> (V,) bool,
  penalty(...) -> (V,) 0/-inf, advance(state, token id); masks cached by state;
- TuneState: where the automaton stands in one tune, and the key its masks are cached by;
- the rules: which tokens a constrained body may hold (body_tokens), their lengths in
  ticks (TICKS, LENGTH_TICKS), the header it writes (HEADER_LINES), bar_ticks, SECTION_ENDS;
  what may come next is what the syntax allows AND what fits in time, two halves that each
  read their own fields (SYNTAX_FIELDS, TIME_FIELDS), the split compiled tables would key by.

An automaton follows the ABC being written and gives -inf to every token that would
make the tune invalid: a note that overflows the bar, a bar line before the bar is
full, an unclosed chord, an <eos> in mid-section; asked for a form (bars per section), a
section end anywhere but on the section's last bar. It reads characters, so it serves
both vocabularies: a character model writes a token over several steps (the token
not yet finished is `pending`), an ABC-token model in one.

A mask depends only on a small state, so masks are cached, in two levels: by the state
(its committed part numbered once per commit, and the token being written), and behind
that by the legal sets the mask is made of, which are far fewer than the states. Most
steps cost one dictionary look-up; a state seen for the first time mostly costs two.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from abc_form import CODE_LINES, ENDING_NUMBER, MAX_LEVEL, MAX_SECTIONS, ends_section, next_code_field
from abc_music import (ABC2MIDI_CHORD_TYPES, CHORD_SYMBOL, TUNE_TYPES, bar_units, hornpipe_meter, note_shape,
                       parse_meter, pitch_spelling, playable_key, playable_meter, playable_tempo, playable_unit,
                       swung_as_hornpipe, written_unit)
from abc_tokens import SPECIALS, PromptError, Vocabulary

TICKS = 48            # ticks per unit note length L: L/4 and triplets of it are whole numbers
GRANULE = TICKS // 4  # every duration is a multiple of L/4, so any bar can be filled exactly
MAX_BAR_NOTES = 3     # a full bar is at most this many of the longest notes (8 units of L): 12/8, 6/4, 3/2 in L:1/16
SHORTEST_UNIT = Fraction(1, 16)  # abcm2ps draws no 1/256 ("Invalid note duration"), L/8 under L:1/32
LENGTH_TICKS = {"": 48, "2": 96, "3": 144, "4": 192, "6": 288, "8": 384, "/": 24, "/2": 24,
                "//": 12, "/4": 12, "3/": 72, "3/2": 72}

(NOTE, REST, BAR, TUPLET, BROKEN, CHORD_OPEN, CHORD_CLOSE, GRACE_OPEN, GRACE_CLOSE,
 TIE, DECORATION, SPACE, NEWLINE) = range(13)

SECTION_ENDS = (":|", "||", "|]")
NOTE_STARTS = "^_=zABCDEFGabcdefg"  # the characters a note or a rest begins with
MIN_NOTES = 16  # a tune ends only after 4 full bars and this many notes, unless it must end sooner
BAR_LINES = ("|", "||", "|]", "|:", ":|", "::", "|1", ":|2")
# no fermata (H, !fermata!): abc2midi lengthens the note, which breaks the bar and broken rhythm;
DECORATIONS = ("~", "T", "u", "v", "!trill!", "!accent!")  # no staccato either: abc2midi shortens the note
HEADER_LINES = [  # the header the constraint writes: X, R (optional), L, M, K in this order
    ["X:1"],
    ["R:" + name for name in TUNE_TYPES],
    ["L:1/8", "L:1/16", "L:1/4"],
    ["M:" + m for m in ("2/4", "3/4", "4/4", "6/8", "9/8", "12/8", "3/8", "2/2", "C", "C|", "3/2", "6/4")],
    ["K:" + root + mode for root in ("C", "D", "E", "F", "G", "A", "B", "Bb", "Eb", "Ab", "F#", "C#")
     for mode in ("", "m", "min", "maj", "dor", "mix", "Dor", "Mix", "aeo", "phr", "lyd")
     if playable_key(root + mode)],  # not Abphr, C#lyd: more than 7 sharps or flats
]
HEADER_ORDER = "XRLMK"  # the order the model writes them in; a prompt may give R:, L:, M: in any order, once each
TEMPO_FIELD = "Q"  # a prompt's header may also give a tempo (its info lines, T: and the like, the model never reads)
HORNPIPE_METERS = tuple(line for line in HEADER_LINES[3] if hornpipe_meter(line[2:]))  # M:2/4, M:4/4, M:C
PLAYABLE = {  # a prompt's header lines, as abc2midi plays them (L:1/7, M:3/3, Q:1/3=90 it does not)
    "L": (playable_unit, "a unit length 1/N, N a power of two, like L:1/8"),
    "M": (playable_meter, "a meter like M:6/8, M:C or M:C|, its beat a power of two"),
    "K": (playable_key, "a key like K:D, K:Ador or K:Bbmix, with nothing after its mode"),
    "Q": (playable_tempo, "a tempo like Q:1/4=120 or Q:120")}
OPTIONAL_FIELDS = "R"
BODY = len(HEADER_ORDER)  # the phase after the header
HEADER_TOKENS = sum(max(map(len, lines)) + 1 for lines in HEADER_LINES)  # the longest header the constraint writes
MOST_CACHED = 200_000  # states numbered, or masks cached, before they are forgotten: memory stays bounded
TOKENS_PER_BAR = 24  # the token budget a requested bar needs at least (a 6/8 bar is ~10 characters, ornaments aside)


def form_tokens(bars: int, code_lines: int = 0) -> int:
    """The token budget a form of this many bars needs at least: its code's lines (5 tokens each, when
    the model writes them), the header and TOKENS_PER_BAR a bar."""
    return 5 * code_lines + HEADER_TOKENS + bars * TOKENS_PER_BAR


def most_bars(max_tokens: int, limit: int, code: bool = False) -> int:
    """The most bars (1 to limit) whose form fits max_tokens; with code, the longest code of that
    many bars too (S:, then each section's B: and an E: to every earlier section)."""
    def lines(bars):
        sections = min(bars, MAX_SECTIONS)
        return 1 + sections * (sections + 1) // 2 if code else 0

    return max([b for b in range(1, limit + 1) if form_tokens(b, lines(b)) <= max_tokens], default=1)
CODE = -1                 # the phase before it, in a tune that begins with its control code


def body_tokens() -> dict[str, tuple[int, int]]:
    """Every token a constrained body may contain: text -> (kind, ticks).

    No chord symbols ("Am"): with them abc2midi adds an accompaniment track that, measured
    on random tunes, can outlast the melody ("Sustained notes beyond end of track").
    """
    tokens = {}
    for acc in ("", "^", "_", "="):
        for letter in "CDEFGABcdefgab":
            for octave in ("", ",") if letter.isupper() else ("", "'"):
                for suffix, ticks in LENGTH_TICKS.items():
                    tokens[acc + letter + octave + suffix] = (NOTE, ticks)
    for suffix, ticks in LENGTH_TICKS.items():
        tokens["z" + suffix] = (REST, ticks)
        tokens["]" + suffix] = (CHORD_CLOSE, ticks)
    tokens.update({bar: (BAR, 0) for bar in BAR_LINES})
    tokens.update({d: (DECORATION, 0) for d in DECORATIONS})
    tokens.update({"(3": (TUPLET, 0), ">": (BROKEN, 0), "<": (BROKEN, 0), "[": (CHORD_OPEN, 0),
                   "{": (GRACE_OPEN, 0), "}": (GRACE_CLOSE, 0),
                   "-": (TIE, 0), " ": (SPACE, 0), "\n": (NEWLINE, 0)})
    return tokens


def bar_ticks(meter: str, unit: str | None) -> int:
    """Ticks in a full bar: the meter in units of L (abc_music.bar_units), L as written."""
    units = bar_units(meter, unit)
    if units is None:
        raise PromptError(f"--constrained needs a meter like M:6/8, M:C or M:C|, not M:{meter.strip()}")
    ticks, written = units * TICKS, written_unit(unit) if unit else None
    if (unit and written is None) or ticks.denominator != 1 or ticks % GRANULE:
        raise PromptError(f"--constrained cannot fill bars of M:{meter} with L:{unit}")
    if written is not None and written < SHORTEST_UNIT:  # L/4 dotted by > halves its partner: L/8, 1/256 under L:1/32
        raise PromptError(f"--constrained writes notes down to a quarter of L and halves one with broken rhythm, "
                          f"shorter than abcm2ps draws under L:{unit.strip()}: give L:1/16 or longer")
    longest = MAX_BAR_NOTES * max(LENGTH_TICKS.values())  # what END_RESERVE and OWED_BAR_TOKENS can finish
    if ticks > longest:
        raise PromptError(f"--constrained cannot finish a bar of M:{meter} with L:{unit or '1/8'} in the tokens it "
                          f"keeps to end a tune: a bar may hold {longest // TICKS} units of L at most (a shorter "
                          f"meter, or a longer L: in a --prompt header; --meter writes L:1/8)")
    return int(ticks)


class _PrefixTable:
    """Sorted strings; the strings under a prefix are one contiguous range, so "is any
    legal string under prefix+c" is one reduction over each character's range."""

    def __init__(self, strings, char_ids: dict[str, int]):
        self.strings = sorted(s for s in set(strings) if all(ch in char_ids for ch in s))
        self.index = {s: i for i, s in enumerate(self.strings)}
        self.prefixes = {s[:k] for s in self.strings for k in range(len(s) + 1)}
        self.char_ids = char_ids
        self._children: dict[str, tuple] = {}
        for prefix in self.prefixes:  # all at start-up (~15 ms for a body table), not on a tune's first steps
            self.children(prefix)

    def span(self, prefix: str) -> tuple[int, int]:
        """[lo, hi): the indices of the strings that begin with prefix."""
        return bisect.bisect_left(self.strings, prefix), bisect.bisect_left(self.strings, prefix + "\U0010ffff")

    def children(self, prefix: str) -> tuple[np.ndarray, np.ndarray]:
        """(vocabulary ids of the chars c that extend prefix, their ranges' bounds for any_under)."""
        if prefix not in self._children:
            lo, hi = self.span(prefix)
            chars = sorted({s[len(prefix)] for s in self.strings[lo:hi] if len(s) > len(prefix)})
            bounds = np.array([self.span(prefix + c) for c in chars], dtype=np.int64).ravel()  # lo, hi, lo, ...
            if len(bounds) and bounds[-1] == len(self.strings):
                bounds = bounds[:-1]  # reduceat's last range runs to the end
            self._children[prefix] = (np.array([self.char_ids[c] for c in chars], dtype=np.int64), bounds)
        return self._children[prefix]

    def any_under(self, prefix: str, flags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the ids of the chars c that extend prefix, whether any string under prefix + c is flagged)."""
        ids, bounds = self.children(prefix)
        return ids, np.logical_or.reduceat(flags, bounds)[::2]  # a reduction per [lo, hi); the [hi, lo) between drop


@dataclass
class TuneState:
    """Where the automaton stands in one tune."""

    phase: int = 0                 # CODE, then 0..4: the header line being written (X, R, L, M, K); BODY
    code: tuple = ()               # the control code's lines so far ("S:2", "B:8", ...), in phase CODE
    code_bars: int = 0             # in phase CODE: the most bars the code may name (max_bars, or what the tokens hold)
    given: frozenset = frozenset()  # the header's R:, L:, M: lines so far (a prompt's in any order, each once)
    hornpipe: bool = False         # abc2midi reads the header's R: line as a hornpipe, which limits its M: line
    swing: int = 0                 # and then swings pairs of notes of these ticks (an eighth in 4/4, a 16th in 2/4)
    swung_tuplet: bool = False     # under it, the last note was a tuplet's of that length: abc2midi pairs the next
    form: tuple = ()               # bars of each section, when a form is asked for (): any form)
    section: int = 0               # under a form: sections finished
    section_bars: int = 0          # under a form: this section's bars so far, as abc_form counts them
    common_bars: int = 0           # under a form, in an ending: the section's bars before it
    pending: str = ""              # the token being written, not yet committed
    pending_must_end: bool = False # must_end as it was when the pending token began
    meter: str | None = None       # M: and L: as written
    unit: str | None = None
    full: int = 0                  # ticks in a full bar
    bar: int = 0                   # ticks so far in this bar
    first_bar: bool = True         # no bar line yet: this bar may be a pickup
    pickup: int = 0                # ticks of the pickup bar (0: none)
    full_bars: int = 0
    notes: int = 0                 # notes and chords written (grace notes aside)
    section_ends: int = 0
    repeat_open: bool = False      # a |: waits for its :|
    ending: int = 0                # 1 inside a first ending |1, 2 inside :|2
    last: int = -1                 # kind of the last committed token (-1: none yet)
    last_bar: str = ""             # the last bar line
    last_note: int = 0             # ticks of the last plain note, for broken rhythm (0: none)
    last_graced: int = 0           # grace notes (a roll: one) that note took: halved by <, it must outlast them
    last_decorated: bool = False   # that note had a decoration or grace notes: no tie across a bar line from it
    tuplet_left: int = 0           # notes still to come in a (3
    tuplet_len: int = 0            # their length, set by the first
    broken_len: int = 0            # after > or <: the partner note has this length
    chord: int = 0                 # notes in an open [chord] (-1: just opened)
    chord_len: int = 0             # their length, set by the first
    grace: int = 0                 # notes in an open {grace group} (-1: just opened)
    last_pitch: int = -1           # pitch id of the last plain note
    tie_pitch: int = -1            # after a tie -: the next note must have this pitch (-1: no tie)
    short_next: int = 0            # after a short :|, the next bar is a pickup of this many ticks
    line_letter: bool = False      # the line so far is one bare letter, spaces aside: "A:|", "A :|" read as a field
    need_note: bool = False        # after a decoration or a grace group
    graced: int = 0                # grace notes (a roll: one) before the note to come: it must outlast them (L/4 each)
    accompanied: int = 0           # chord symbols in the prompt: ticks of an eighth note, which a pickup is made of
    slurs: int = 0                 # in a prompt: a slur opened and not yet closed (the model writes none)
    staccato_next: bool = False    # in a prompt: the note to come is staccato (.A), read as a decoration
    last_staccato: bool = False    # the last note was: abc2midi finds no note before its tie, and dots it for no > or <
    final: bool = False            # a short last bar was closed: only the end may follow
    ended: bool = False            # <eos> was written
    must_end: bool = False         # the last mask asked the tune to end (bar cap or token budget)
    memo: tuple | None = field(default=None, compare=False, repr=False)  # AbcConstraint._number's, until a commit

    def state_key(self, must_end: bool) -> tuple:
        """What the legal tokens of the committed state depend on, and no more, so that
        they can be cached and shared: the last pitch counts only by whether there is one,
        except in a tie, where it decides; bars and notes only as far as the end rule needs
        (4 and 16; one commit adds at most one); the control code only while it is written
        (after it, the form alone counts, as far as form_key says)."""
        tie = self.tie_pitch >= 0
        return (self.phase, self.full, self.bar, self.first_bar, self.pickup, self.section_ends > 0,
                self.repeat_open, self.ending, self.last, self.last_bar in SECTION_ENDS, self.last_note,
                (self.last_graced, self.last_decorated) if self.last_note else (), self.staccato_next,
                self.tuplet_left, self.tuplet_len, self.broken_len, self.chord, self.chord_len, self.grace, self.graced,
                (self.last_pitch, self.tie_pitch) if tie else self.last_pitch >= 0, self.short_next,
                self.line_letter, self.need_note, self.final, self.accompanied, min(max(self.full_bars, 2), 4),
                min(max(self.notes, MIN_NOTES - 2), MIN_NOTES), must_end,
                (self.code, self.code_bars) if self.phase == CODE else (), self.form_key(),
                self.hornpipe and self.phase < BODY, self.swing, self.swung_tuplet)

    def form_key(self) -> tuple:
        """What the rules read of a form: bars left in this section (and at its ending's start),
        whether it is the last section; not the sections already written."""
        if not self.form:
            return ()
        if self.section >= len(self.form):
            return (0,)
        target = self.form[self.section]
        return (target - self.section_bars, target - self.common_bars if self.ending else 0,
                self.section + 1 == len(self.form))

    def pending_key(self) -> tuple:
        """The token being written, a note by its shape ("^f2" as "c2"), except where its pitch
        counts: in a tie, or a tie's "-" itself (which takes the last note's pitch)."""
        exact = self.tie_pitch >= 0 or self.pending == "-" or self.phase < BODY
        pending = self.pending if exact else note_shape(self.pending)
        return pending, self.pending_must_end, self.last_pitch if self.pending == "-" else None

    def amend(self, **fields) -> None:
        """A prompt's reading changes fields of the key outside a commit: the number memoised goes too."""
        self.__dict__.update(fields, memo=None)

    def ties_across(self) -> bool:
        """The last note may start a tie across a bar line: a plain one, not a tuplet's or a partner (last_note),
        nor decorated or graced (abc2midi splits a trill or a roll and miscounts the bar, measured)."""
        return self.last_note > 0 and not self.last_decorated

    def mid_group(self) -> bool:
        """Something begun that the next notes must finish: what syntax_open says, or a broken rhythm's
        partner."""
        return self.syntax_open() or bool(self.broken_len)

    def syntax_open(self) -> bool:
        """A chord, grace notes, a tuplet, a tie or a decoration's note begun (the syntax's own fields)."""
        return bool(self.chord or self.grace or self.tuplet_left or self.tie_pitch >= 0 or self.need_note)

    def can_end(self, must_end: bool) -> bool:
        """At a section's end, nothing open; then either the form is complete, or (with no
        form asked for) the tune is long enough (may_end_tune)."""
        at_end = (self.phase == BODY and self.last_bar in SECTION_ENDS and self.last in (BAR, NEWLINE)
                  and self.bar == 0 and self.ending != 1 and not self.repeat_open and self.tie_pitch < 0)
        if self.form:
            return at_end and self.section == len(self.form)
        return at_end and self.may_end_tune(must_end)

    def may_end_tune(self, must_end: bool) -> bool:
        """Whether the section being written may be the tune's last: under a form, its last section;
        else after 4 full bars and MIN_NOTES notes, or sooner when the tune must end (a bar cap
        under 4, or a token budget nearly spent: without this, a tune with a pickup could only
        go on writing short sections, and be cut off unfinished)."""
        if self.form:
            return self.section + 1 == len(self.form)
        return must_end or (self.full_bars >= 4 and self.notes >= MIN_NOTES)


class AbcConstraint:
    """Masks a vocabulary's tokens so that a sampled tune is valid ABC whose bars are full.

    start(prompt, form) -> TuneState; mask(state, tokens_left) -> (V,) bool; advance(state, id).
    Masks are cached by the committed state's key (TuneState.state_key, numbered) and the
    token being written (TuneState.pending_key); use_cache=False builds every one afresh
    from the rules, which is how the tests check that the keys leave out nothing the rules read.

    A form (bars per section, abc_form's counting) is held exactly: every section ends on
    its last bar with a repeat or a double bar, and the tune ends after the last section.
    With coded=True (a model trained with control codes, train --control) each tune begins
    with its IrishMAN control code, written line by line in the code's order; the form it
    names is then held the same way.
    """

    END_RESERVE = 120  # tokens kept to finish the bar and close the tune
    OWED_BAR_TOKENS = 16  # and under a form, for each bar it still owes: once it must end, a bar is its
    # longest notes (at most MAX_BAR_NOTES, a space after each: bar_ticks refuses longer bars) and a bar line

    def __init__(self, vocab: Vocabulary, max_bars: int = 32, use_cache: bool = True, coded: bool = False):
        self.vocab, self.max_bars, self.use_cache, self.coded = vocab, max_bars, use_cache, coded
        char_ids = {t: i for i, t in enumerate(vocab.tokens) if len(t) == 1 and i >= len(SPECIALS)}
        missing = sorted(set("|\nXLMK:1/8CDEFGABcdefgab") - set(char_ids))
        if missing:
            raise PromptError("--constrained: the model's vocabulary lacks " + " ".join(map(repr, missing)))
        self.char_ids = char_ids
        info = body_tokens()
        self.body = _PrefixTable(info, char_ids)  # only what this vocabulary can spell
        self.lines = {letter: _PrefixTable(spelled, char_ids) for letter, spelled in zip(HEADER_ORDER, HEADER_LINES)}
        self.lines["hornpipe M"] = _PrefixTable(HORNPIPE_METERS, char_ids)
        if not all(table.strings for letter, table in self.lines.items() if letter not in OPTIONAL_FIELDS):
            raise PromptError("--constrained: the model's vocabulary cannot spell a header")
        self.kind = np.array([info[s][0] for s in self.body.strings], dtype=np.int8)    # (N,)
        self.ticks = np.array([info[s][1] for s in self.body.strings], dtype=np.int64)  # (N,)
        self.info = {s: info[s] for s in self.body.strings}
        self.is_note, self.is_rest = self.kind == NOTE, self.kind == REST
        # a note's pitch as written (accidental, letter, octave), for ties: "^c'3/2" -> "^c'"
        pitches = [pitch_spelling(s) if info[s][0] == NOTE else "" for s in self.body.strings]
        pitch_ids = {p: i for i, p in enumerate(sorted(set(pitches)))}
        self.pitch = np.array([pitch_ids[p] for p in pitches], dtype=np.int64)  # (N,)
        self.fits_granule = self.ticks % GRANULE == 0
        self.at = self.body.index
        # tokens longer than one character (ABC-token vocabularies) are judged whole
        self.whole_ids = np.array([i for i, t in enumerate(vocab.tokens) if len(t) > 1 and i >= len(SPECIALS)],
                                  dtype=np.int64)
        whole = [vocab.tokens[i] for i in self.whole_ids]
        self.whole_body = np.array([self.at.get(t, -1) for t in whole], dtype=np.int64)
        self.whole_first = np.array([self.char_ids.get(t[0], -1) for t in whole], dtype=np.int64)
        self.whole_lines = {letter: np.isin(whole, spelled) for letter, spelled in zip(HEADER_ORDER, HEADER_LINES)}
        self.whole_lines["hornpipe M"] = np.isin(whole, HORNPIPE_METERS)
        self.whole = whole
        self.cache: dict[tuple, np.ndarray] = {}
        self.legal_ids: dict[bytes, int] = {}  # a legal set (as bytes) -> its number
        self.state_numbers: dict[tuple, int] = {}  # a committed state's state_key -> its number
        self.numbering = 0                         # counts the times the numbers were forgotten
        self.extending = {p: self._extending(p) for p in self.body.prefixes}  # at start-up, with the table
        # a prompt's staccato (.A): no time in abc2midi; read as a decoration (staccato_next)
        self.staccato = next((d for d in ("v", "u", "T") if d in char_ids and d in self.at), None)

    # --- state ------------------------------------------------------------------

    def start(self, prompt: str, form: tuple[int, ...] = (), max_tokens: int | None = None) -> TuneState:
        """The state after the prompt; refuses a prompt that the constraints would not allow.
        form: the bars of each section to hold (with coded=True the prompt's code names it).
        max_tokens: the tune's budget after the prompt, which a code the model writes must fit.

        Chord symbols ("G", "Am7", "D/F#") in the prompt's body take no time, so the automaton
        steps over them. It never writes one: abc2midi's accompaniment for them can outlast the
        melody (measured on random tunes), so a generated tune would no longer be clean.
        """
        state, i = TuneState(phase=CODE if self.coded else 0, form=tuple(form)), 0
        if self.coded:  # only a code the model writes reads it
            state.code_bars = self.max_bars if max_tokens is None else most_bars(max_tokens, self.max_bars, code=True)
        shown = 0  # where the user's text begins: a refusal never quotes the code the model reads before it
        while i < len(prompt):
            shown = i + 1 if state.phase == CODE else shown
            if state.phase == BODY:
                i = self._read_body(state, prompt, i, shown)
                continue
            if prompt[i] not in self.char_ids:
                raise PromptError(f"--constrained: the prompt has {prompt[i]!r}, which the model cannot write")
            self._advance_header(state, prompt[i])
            i += 1
        if state.slurs:
            raise PromptError("--constrained: the prompt ends inside a slur: close it with ) (the model writes none)")
        tables = self._line_tables(state) if state.phase < BODY else []
        if state.pending and tables and not any(_as_written(state.pending) in table.prefixes for table, _ in tables):
            raise PromptError(_why_unfinished_header(state.pending))
        return state

    def _read_body(self, state: TuneState, prompt: str, i: int, shown: int) -> int:
        """Reads the prompt's body at prompt[i] (the user's text from prompt[shown]): a chord symbol, what
        changes nothing (_idle), or a character; returns where the next read begins."""
        if prompt[i] == '"':
            self._end_token_before(state, "a chord symbol", prompt[shown:i])
            end = self._skip_chord_symbol(prompt, i)
            _accompany(state, prompt[shown:end])
            return end  # a space after it that the rules take nowhere ("D" A2B at a line's start): _idle_space
        if prompt[i] == ")" or (prompt[i] == "(" and not prompt[i + 1:i + 2].isdigit()):  # (3 is a tuplet
            self._read_slur(state, prompt[i], prompt[shown:i])
            return i + 1
        idle = self._idle(state, prompt, i)
        if idle and prompt[i] in "[|" and state.bar == 0:  # abc2midi counts a bar after a bar line, a pickup's
            state.amend(first_bar=False)  # too ("Bar 0 has 5 time units ... in repeat"): the first bar is then full
        if idle:
            return i + idle  # the automaton reads the tune as if it were not there: the prompt stays as typed
        if prompt[i] == ":" and state.pending == "||":  # ||: is || then |: (abc2midi reads :|: as neither)
            self._read_char(state, "|", prompt[shown:i], prompt, i)
        staccato = next((mark for mark in (".", "!staccato!") if prompt.startswith(mark, i)), "")
        if staccato and re.match(r"[\^_=A-Ga-g]", prompt[i + len(staccato):]) and self.staccato:
            self._read_char(state, self.staccato, prompt[shown:i + len(staccato)], prompt, i)
            state.amend(staccato_next=True)  # read as a decoration the model writes: no time
            return i + len(staccato)
        ending = prompt[i:i + 2] if re.fullmatch(r"\[\d", prompt[i:i + 2]) else ""
        if ending and state.pending.endswith("|") and state.pending + ending[1] in self.body.prefixes:  # |[1: |1
            self._read_char(state, ending[1], prompt[shown:i + 2], prompt, i)
            return i + 2
        if prompt.startswith("[|", i) and prompt[i + 2:i + 3] != "]":  # [| is a bar line, [|] an invisible one
            self._read_char(state, "|", prompt[shown:i + 2], prompt, i)
            return i + 2
        self._read_char(state, prompt[i], prompt[shown:i + 1], prompt, i)
        return i + 1

    def _read_char(self, state: TuneState, ch: str, quoted: str, prompt: str, at: int) -> None:
        """One character of the body, refused unless the rules allow it (quoted: the prompt up to it)."""
        if ch not in self.char_ids:
            raise PromptError(f"--constrained: the prompt has {ch!r}, which the model cannot write"
                              + _unsupported(prompt, at))
        if not self.mask(state, 10**6)[self.char_ids[ch]]:
            raise PromptError(f"--constrained: the prompt breaks the constraints at {_quote(quoted)}"
                              + self._why_refused(state, ch, prompt, at))
        self.advance(state, self.char_ids[ch])

    def _idle(self, state: TuneState, prompt: str, i: int) -> int:
        """How many characters at prompt[i] change nothing: a space that _idle_space finds idle, or a bar
        line | or [| with nothing but spaces and line breaks since the last bar line or the body's start
        (a line that begins with the bar line the one before ends with: abc2midi reads no bar between)."""
        if prompt[i] == " ":
            return int(self._idle_space(state, prompt[i + 1:]))
        bar = "[|" if prompt.startswith("[|", i) else "|" if prompt[i] == "|" else ""
        if not bar or prompt[i + len(bar):i + len(bar) + 1] in tuple("|:]123456789"):  # a longer bar line
            return 0
        starts = state.pending + bar not in self.body.prefixes  # not the end of a :| being written
        before_repeat = re.match(r"\|[ \n]*(?=\|:)", prompt[i:])
        if bar == "|" and starts and state.bar and before_repeat:
            return before_repeat.end()  # a line ending in | before one that begins |: (the |: closes the bar)
        between_bars = state.pending in ("", " ", "\n") and state.bar == 0 and not state.mid_group() and not state.final
        return len(bar) if between_bars else 0

    def _idle_space(self, state: TuneState, after: str) -> bool:
        """A space in a prompt's body that changes nothing: one before a line break, after another space, or
        after a tie's - (pasted ABC has them; the rules write none, but abc2midi and abcm2ps read them as
        none: D4- D ties). Elsewhere a space at the prompt's end is not idle: it ends the token before it,
        which the model may not go on."""
        line, newline, _ = after.partition("\n")
        if (newline and not line.strip(" ")) or state.pending == "-":
            return True
        return state.pending.strip(" ") == "" and not self.mask(state, 10**6)[self.char_ids.get(" ", 0)]

    def _end_token_before(self, state: TuneState, what: str, before: str) -> None:
        """A chord symbol or a slur's mark (what) ends the token being written, which must then be
        complete (d"G"2 would split a note: abc2midi reads "2" alone), and it may not sit between a
        decoration and its note (~"G"d, ~(d: abc2midi finds no note after the ~)."""
        pending = state.pending
        if self._unfinished(state, self._legal_cached(state, state.pending_must_end)[1]):
            raise PromptError(f"--constrained: {what} cannot split {pending!r} at {before!r}")
        decorated = (state.need_note and state.last == DECORATION and not pending) \
            or self.info.get(pending, (None,))[0] == DECORATION  # (~d) is fine: its note is complete
        if decorated:
            raise PromptError(f"--constrained: {what} goes before the decoration, not after it, at {before!r}")
        if pending:
            self._commit(state, pending)
            state.pending, state.pending_must_end = "", False
        if state.chord or state.grace:  # abcm2ps: "Not a note", "Bad character in grace note sequence"
            raise PromptError(f"--constrained: {what} goes before a [chord] or {{grace notes}}, not inside "
                              f"a {'chord' if state.chord else 'grace group'}, at {before!r}")

    def _read_slur(self, state: TuneState, mark: str, before: str) -> None:
        """A slur's ( or ): phrasing, which takes no time (abc2midi plays the notes the same), so the
        automaton steps over it. One slur at a time ("Slur within slur"), and none between grace notes
        and their note; a slur the prompt opens, it closes (start): the model writes none."""
        self._end_token_before(state, "a slur", before)
        if state.need_note:
            raise PromptError(f"--constrained: a slur goes before the grace notes, not after them, at {before!r}")
        if mark == "(" and state.slurs:
            raise PromptError(f"--constrained: a slur within a slur (abc2midi warns of it), at {before + mark!r}")
        if mark == ")" and not state.slurs:
            raise PromptError(f"--constrained: a ) that closes no slur, at {before + mark!r}")
        state.slurs += 1 if mark == "(" else -1

    @staticmethod
    def _skip_chord_symbol(prompt: str, i: int) -> int:
        """The index after the chord symbol that starts at prompt[i]; refuses any other quoted text,
        and a chord type that abc2midi's table does not name."""
        end = prompt.find('"', i + 1)
        text = prompt[i:end + 1] if end > 0 else prompt[i:]
        symbol = CHORD_SYMBOL.fullmatch(text) if end > 0 else None
        if symbol is None:
            raise PromptError(f"--constrained: {text!r} in the prompt is not a chord symbol like \"G\", \"Am7\" "
                              f"or \"D/F#\"")
        if symbol["type"] not in ABC2MIDI_CHORD_TYPES:
            known = ", ".join(sorted(ABC2MIDI_CHORD_TYPES - {""}))
            raise PromptError(f"--constrained: abc2midi knows no chord {text} (after the root, it names: {known})")
        return end + 1

    def advance(self, state: TuneState, token_id: int) -> None:
        if token_id == self.vocab.eos_id:
            state.ended = True
            return
        token = self.vocab.tokens[token_id]
        if state.phase < BODY:
            self._advance_header(state, token)
        elif len(token) == 1 and state.pending + token in self.body.prefixes:
            state.pending += token
        else:
            if state.pending:
                self._commit(state, state.pending)
            state.pending, state.pending_must_end = token, state.must_end

    def _line_tables(self, s: TuneState) -> list[tuple[_PrefixTable, np.ndarray]]:
        """The header or code lines that may come next: (their table, the whole tokens among them)."""
        if s.phase == CODE:
            return [self._code_table(s.code, s.code_bars)]
        letter = HEADER_ORDER[s.phase]
        letters = letter + (HEADER_ORDER[s.phase + 1] if letter in OPTIONAL_FIELDS else "")  # or skip it
        names = ["hornpipe M" if letter == "M" and s.hornpipe else letter for letter in letters]
        return [(self.lines[name], self.whole_lines[name]) for name in names]

    def _code_table(self, code: tuple[str, ...], code_bars: int) -> tuple[_PrefixTable, np.ndarray]:
        """The code's next line, as the code's order allows; a code the model writes itself
        names at most code_bars bars in all, so the tune fits --max-bars and --max-tokens."""
        letter = next_code_field(code)
        bars = sum(int(line[2:]) for line in code if line[0] == "B")
        sections_after = int(code[0][2:]) - 1 - sum(line[0] == "B" for line in code) if code else 0
        limit = code_bars - bars - sections_after if letter in "SB" else MAX_LEVEL

        def build():
            lines = [line for line in CODE_LINES[letter] if int(line[2:]) <= limit]
            return _PrefixTable(lines, self.char_ids), np.isin(self.whole, lines)

        return self._cached(("code", letter, limit), build)

    def _advance_header(self, state: TuneState, text: str) -> None:
        for ch in text:
            if ch != "\n":
                state.pending += ch
                continue
            line, state.pending = state.pending, ""
            state.memo = None
            if state.phase == CODE:
                self._code_line(state, line)
            else:
                self._header_line(state, line)

    def _code_line(self, state: TuneState, line: str) -> None:
        want = next_code_field(state.code)
        if line[:1] != want or line not in CODE_LINES[want]:
            raise PromptError(f"--constrained: the tune's control code needs a {want}: line next, not {line!r}")
        state.code += (line,)
        if next_code_field(state.code) == "X":
            state.form = tuple(int(line[2:]) for line in state.code if line[0] == "B")
            state.phase = 0

    @staticmethod
    def _header_line(state: TuneState, line: str) -> None:
        """A header line joins the tune. The model writes X:, R:, L:, M:, K: in that order (the masks);
        a prompt, as tunebooks write headers, may give R:, L:, M: in any order, and Q:."""
        letter, value = line[:1], line[2:]
        _check_header_place(state, line)
        playable, what = PLAYABLE.get(letter, (lambda value: True, ""))  # X: and R: are any text
        if not playable(value):
            raise PromptError(f"--constrained reads {what}, not {line!r}")
        if letter == "L":
            state.unit = value
        elif letter == "M":
            state.meter = value
        state.given |= {letter} & set("RLM")
        state.hornpipe = state.hornpipe or (letter == "R" and swung_as_hornpipe(value))
        if state.hornpipe and state.meter is not None and not hornpipe_meter(state.meter):
            raise PromptError(f"--constrained: abc2midi plays R:hornpipe only in {', '.join(HORNPIPE_METERS)}, "
                              f"not 'M:{state.meter}'")
        after = HEADER_ORDER.index(letter) + 1 if letter in HEADER_ORDER else 1  # after Q:, the model's R: or L:
        state.phase = max(state.phase, after)  # the model writes on from the furthest line a prompt gave
        if letter == "K":
            if state.meter is None:
                raise PromptError("--constrained: the header needs an M: line before K:")
            state.full = bar_ticks(state.meter, state.unit)
            state.swing = state.full * parse_meter(state.meter)[1] // 32 if state.hornpipe else 0  # abc2midi's hornp()

    def _commit(self, s: TuneState, text: str) -> None:
        """A finished token joins the tune: the rules of what it does to the state."""
        s.memo = None
        kind, ticks = self.info[text]
        if kind in (NOTE, REST):
            self._commit_note(s, kind, ticks, text)
        elif kind == BAR:
            self._commit_bar(s, text)
        else:
            self._commit_mark(s, kind, ticks, text)
        s.line_letter = (s.line_letter and text == " ") or (s.last in (NEWLINE, -1) and len(text) == 1
                                                             and text.isalpha())  # "B :|" is as ambiguous
        s.last = kind

    def _commit_note(self, s: TuneState, kind: int, ticks: int, text: str) -> None:
        if s.grace:
            s.grace = max(s.grace, 0) + 1
        elif s.chord:
            s.chord_len = s.chord_len or ticks
            s.chord = max(s.chord, 0) + 1
        elif s.tuplet_left:
            if not s.tuplet_len:
                s.tuplet_len = ticks
                s.bar += 2 * ticks  # (3: three notes in the time of two
            s.tuplet_left -= 1
            s.swung_tuplet = ticks == s.swing if kind == NOTE else s.swung_tuplet  # swing 0: never
            s.tuplet_len = s.tuplet_len if s.tuplet_left else 0
            s.last_note = 0
        else:
            s.bar += ticks
            s.swung_tuplet = s.swung_tuplet and kind == REST  # abc2midi pairs notes across rests
            # no broken rhythm after a rest, a partner or a tied note (abc2midi miscounts A-A>B)
            tied = s.tie_pitch >= 0
            s.last_note = 0 if (s.broken_len or kind == REST or tied or s.staccato_next) else ticks
            s.last_graced, s.last_decorated = s.graced, s.need_note
            s.broken_len = 0
        # a note may start a tie unless it ends one (abc2midi miscounts A-A-A)
        outside = not (s.grace or s.chord)
        plain = kind == NOTE and outside and s.tie_pitch < 0 and not s.staccato_next
        s.last_pitch = int(self.pitch[self.at[text]]) if plain else -1
        s.tie_pitch = -1 if outside else s.tie_pitch
        s.notes += kind == NOTE and not (s.grace or s.chord)
        s.graced = s.graced if s.grace else 0  # the host note took them
        s.need_note, s.last_staccato, s.staccato_next = False, s.staccato_next, False

    @staticmethod
    def _commit_mark(s: TuneState, kind: int, ticks: int, text: str) -> None:
        """Chords, grace groups, tuplets, broken rhythm, ties and decorations."""
        if kind == CHORD_OPEN:
            s.chord, s.chord_len, s.need_note = -1, 0, False
        elif kind == CHORD_CLOSE:
            s.bar += s.chord_len * ticks // TICKS  # a chord lasts as long as its first note
            s.notes += 1
            s.chord, s.chord_len, s.last_note = 0, 0, 0
        elif kind == GRACE_OPEN:
            s.grace, s.need_note = -1, False
        elif kind == GRACE_CLOSE:
            s.grace, s.graced, s.need_note = 0, max(s.grace, 0), True
        elif kind == TUPLET:
            s.tuplet_left, s.tuplet_len = 3, 0
        elif kind == BROKEN:
            s.broken_len, s.last_note = s.last_note, 0  # A>B with equal lengths fills 2 x A
        elif kind == TIE:
            s.tie_pitch = s.last_pitch  # the tied note must sound the same pitch
        elif kind == DECORATION:
            s.need_note = True
            s.graced = 1 if text == "~" else s.graced  # abc2midi plays a roll as grace notes: ~A/4 is cut short

    def _commit_bar(self, s: TuneState, bar: str) -> None:
        if s.form:
            _count_form_bar(s, bar)
        if s.bar == 0:
            pass  # |: before any note
        elif s.short_next:
            s.short_next = 0
        elif s.bar == s.full:
            s.full_bars += 1
        elif s.first_bar:
            s.pickup = s.bar if bar == "|" else 0  # D|: leaves the pickup outside the repeat: the bars are full
        elif bar == ":|":
            s.short_next = s.pickup  # the short bar is completed by the next section's pickup
        else:
            s.final = True  # || or |] on the short bar: the end of the tune
        if bar in SECTION_ENDS:
            s.section_ends += 1
        if bar in ("|:", "::"):
            s.repeat_open = True
        if bar in (":|", ":|2"):
            s.repeat_open = False
        s.ending = {"|1": 1, ":|2": 2}.get(bar, 0 if bar in ("||", "|]") else s.ending)
        # a |: before any note leaves the first bar to come, which may still be a pickup (|:A|d2f2|...)
        s.bar, s.first_bar, s.last_bar, s.last_note = 0, s.first_bar and s.bar == 0, bar, 0

    # --- masks ------------------------------------------------------------------

    def mask(self, state: TuneState, tokens_left: int) -> np.ndarray:
        """(V,) bool: the tokens that keep this tune valid."""
        return self._masks(state, tokens_left)[0]

    def penalty(self, state: TuneState, tokens_left: int) -> np.ndarray:
        """(V,) float32: 0 for the legal tokens, -inf for the others; added to the logits,
        one vector add, cheaper per step than indexing them with the mask."""
        return self._masks(state, tokens_left)[1]

    def _masks(self, state: TuneState, tokens_left: int) -> tuple[np.ndarray, np.ndarray]:
        """(mask, penalty); and on the state, must_end as it holds for a token that starts now."""
        must_end = self._at_bar_cap(state) or tokens_left < self._reserve(state)
        key = (self._number(state, must_end),) + state.pending_key()
        mask, penalty, state.must_end = self._cached(key, lambda: self._build_masks(state, must_end))
        return mask, penalty

    def _reserve(self, s: TuneState) -> int:
        """Tokens kept to finish the tune: a form's owed bars too, so that max_tokens never cuts one off.
        A second ending writes its section's last bars again: in a first ending they are owed twice,
        and where a first ending may still begin, the bars it would repeat are kept for (once
        the tune must end, none begins)."""
        if not s.form:
            return self.END_RESERVE
        owed = sum(s.form[s.section:]) - s.section_bars
        if s.section < len(s.form):  # the bars a second ending would write again
            target = s.form[s.section]
            if s.ending == 1:
                owed += target - s.common_bars
            elif s.ending == 0 and (s.repeat_open or not s.section_ends):
                owed += target - s.section_bars
        return self.END_RESERVE + self.OWED_BAR_TOKENS * owed

    def _at_bar_cap(self, s: TuneState) -> bool:
        """Without a form, the tune has its max_bars full bars: it must end (a form ends by its own count)."""
        return not s.form and s.full_bars >= self.max_bars

    def _cap_reason(self, s: TuneState) -> str:
        """Why a prompt must end here, if the bar cap is the reason: " (it has 4 full bars; ...)"."""
        closing = self._closing_last_bar(s)
        if not (self._at_bar_cap(s) or closing):
            return ""
        return f" (it has {s.full_bars + closing} full bars; --max-bars is {self.max_bars})"

    def _why_refused(self, s: TuneState, ch: str, prompt: str, at: int) -> str:
        """Why the prompt's next character (prompt[at]) breaks the constraints: " (...)". First the bar's
        time or the form; then the pasted-ABC construct it belongs to (UNSUPPORTED); then what is open
        there; "" where the quote alone shows why (a token no rule knows)."""
        refused = self._refused_token(s, ch)
        if refused is None:
            return _unsupported(prompt, at)
        token, after = refused
        inside = _why_not_inside(after, token)
        if inside is not None:
            return _unsupported(prompt, at) or inside
        return (self._why_not_in_time(after, token, s.pending_must_end) or _unsupported(prompt, at)
                or self._why_not_this_bar_line(after, token, s.pending_must_end))

    def _refused_token(self, s: TuneState, ch: str) -> tuple[str, TuneState] | None:
        """(the token ch is refused in, the state it would begin in): ch grows the pending token, or the
        pending token ends and ch begins the next; None outside the body, or in a token no rule knows."""
        if s.phase != BODY:
            return None
        token, after = s.pending + ch, s
        if token not in self.body.prefixes and s.pending:
            if s.pending not in self.info:
                return None
            token = s.pending  # the token being written ends here, and may not ...
            if not self._unfinished(s, self._legal(s, s.pending_must_end)):
                after = _copy(s)  # ... or it may, and ch, which begins the next one, may not
                self._commit(after, s.pending)
                token, after.pending = ch, ""
        return token, after

    def _why_not_in_time(self, after: TuneState, token: str, must_end: bool) -> str:
        """_why_refused where the bar cap, the tune's end, a partner note's length, the bar or the form
        is the reason."""
        cap = self._cap_reason(after)
        if cap:
            return cap
        if after.final:
            return " (the tune's last bar is closed: only its end may follow)"
        if after.broken_len and token[0] in NOTE_STARTS:
            return f" (after > or <, the partner note is {_units(after.broken_len)} long, as the note before)"
        return self._why_not_in_bar(after, token, must_end)

    def _why_not_in_bar(self, s: TuneState, token: str, must_end: bool) -> str:
        """_why_refused for a token outside chords, grace groups, tuplets and ties: the bar's time,
        or the bar lines that the form or a pickup allow here."""
        target = self._bar_target(s, must_end, s.mid_group())
        kind = _bar_kind(s, target)
        left = target - s.bar
        if token[0] not in "|: \n-" and token in self.body.prefixes and left <= 0:
            unended = "; a line break does not end a bar: write | before it" if s.last == NEWLINE else ""
            return f" (the bar{kind} is full, at {_units(target)}{unended})"
        if token == "-" and left <= 0:  # _tie_fits
            return (" (a tie across a bar line starts from a plain note: no decoration, grace notes, tuplet or broken "
                    "rhythm; abc2midi miscounts the bar of a trilled one)" if not s.ties_across() else
                    f" (the bar{kind} is full, and a tie crosses only a plain | after which the tune goes on)")
        marks = _why_no_mark_here(s, token, left, kind)
        if marks:
            return marks
        if self.info.get(token, (None, 0))[1] > left and self.info[token][0] in (NOTE, REST):
            return f" (the bar{kind} has room for {_units(left)} more, of its {_units(target)})"
        if token[0] not in "|:":
            return ""
        if 0 < s.bar != target and not s.first_bar:
            led = not s.last_bar  # the body began with a bar line (_read_body): abc2midi counts the bar after it
            return f" (the bar{kind} has {_units(s.bar)} of its {_units(target)}" + (
                "; after a bar line at the body's start, abc2midi counts the first bar as a whole one, never a "
                "pickup)" if led else ")")
        legal = self._legal(s, must_end)
        bars = [bar for bar in BAR_LINES if bar in self.at and legal[self.at[bar]]]
        if s.form and bars:
            return (f" (section {s.section + 1} of the form has {s.form[s.section]} bars: "
                    f"the bar line here is {' or '.join(bars)})")
        if s.pickup and token in ("|1", ":|2"):
            return (" (a tune whose last bar completes its pickup has no first and second endings here; a pickup "
                    "before the first |:, as in D|:GAG, is played once, and its tune may have them)")
        if s.pickup and bars == ["|"]:
            return (f" (after a pickup of {_units(s.pickup)}, a section ends on a bar of "
                    f"{_units(s.full - s.pickup)}, which completes it)")
        return ""

    def _why_not_this_bar_line(self, s: TuneState, token: str, must_end: bool) -> str:
        """_why_refused for a bar line with no bar before it, or one that may not close a pickup."""
        if s.repeat_open and (token in ("|:", "::") or (token in ("||", "|]") and s.bar)):
            return " (a repeat is open: :| closes it first)"
        pickup = s.first_bar and s.bar < self._bar_target(s, must_end, s.mid_group())
        if token[0] not in "|:" or not (s.bar == 0 or pickup):
            return ""
        legal = self._legal(s, must_end)
        bars = " or ".join(bar for bar in BAR_LINES if bar in self.at and legal[self.at[bar]])
        if s.bar == 0:
            return f" (no bar comes before this bar line{': here only ' + bars if bars else ''})"
        return f" (a pickup of {_units(s.bar)} closes with {bars})" if bars else ""

    def _near_bar_cap(self, s: TuneState) -> bool:
        """The bar being written is the last that max_bars allows (a form ends by its own count)."""
        return not s.form and s.full_bars + 1 >= self.max_bars

    def _closing_last_bar(self, s: TuneState) -> bool:
        """The last bar that max_bars allows is full: its bar line must end the tune."""
        return s.bar == s.full and self._near_bar_cap(s)

    def _number(self, s: TuneState, must_end: bool) -> int:
        """The committed state's number: equal state_keys share one. Kept on the state until it
        commits a token, so the steps that only grow a token cost no key at all."""
        memo = s.memo
        if memo is None or memo[0] != must_end or memo[1] != self.numbering:
            key = s.state_key(must_end) + (self._near_bar_cap(s),)  # a token committed may reach the cap
            number = self.state_numbers.get(key)
            if number is None:
                if len(self.state_numbers) > MOST_CACHED:  # forget them all, and every mask cached by them
                    self.state_numbers.clear()
                    self.cache.clear()
                    self.numbering += 1
                number = self.state_numbers[key] = len(self.state_numbers)
            memo = s.memo = (must_end, self.numbering, number)
        return memo[2]

    def _build_masks(self, state: TuneState, must_end: bool) -> tuple[np.ndarray, np.ndarray, bool]:
        if state.phase == BODY:
            return self._body_masks(state, must_end)
        return *_with_penalty(self._header_mask(state)), must_end

    def _cached(self, key: tuple, build):
        """build(), once per key: what is cached depends on its key alone. With use_cache off
        every value is built afresh, which is how a test checks the keys."""
        if not self.use_cache:
            return build()
        value = self.cache.get(key)
        if value is None:
            if len(self.cache) > MOST_CACHED:
                self.cache.clear()
            value = self.cache[key] = build()
        return value

    def _header_mask(self, s: TuneState) -> np.ndarray:
        mask, pending = np.zeros(len(self.vocab), dtype=bool), _as_written(s.pending)
        for table, whole in self._line_tables(s):
            mask[table.children(pending)[0]] = True
            if pending in table.index:
                mask[self.char_ids["\n"]] = True
            if not pending:
                mask[self.whole_ids[whole]] = True
        return mask

    def _body_masks(self, s: TuneState, must_end: bool) -> tuple[np.ndarray, np.ndarray, bool]:
        """A body mask reads the state only through two legal sets: the tokens legal now, which the
        pending token must grow into, and (once it is complete) those legal after it, which the
        next token starts from. Legal sets are few (tens in a tune that visits hundreds of
        states), so masks are cached by the pair; a new state mostly costs the two look-ups.
        Also returns must_end for the token that starts after the pending one: the bar line being
        finished may be the one that reaches the bar cap."""
        legal_id, legal = self._legal_cached(s, s.pending_must_end)   # a token already begun finishes
        pending = s.pending_key()                                      # under the rules it began under
        if self._unfinished(s, legal):
            grows = self._cached(("grows", legal_id) + pending, lambda: _with_penalty(self._grows(s, legal)))
            return *grows, must_end
        after = s
        if s.pending:                                                  # it may be finished ...
            after = _copy(s)
            self._commit(after, s.pending)
            after.pending, after.pending_must_end = "", False
            must_end = must_end or self._at_bar_cap(after)
        after_legal = self._legal_cached(after, must_end)              # ... and a new one starts
        can_end = after.can_end(must_end)
        masks = self._cached(("body", legal_id, after_legal[0], can_end, must_end) + pending,
                             lambda: _with_penalty(self._body_mask(s, legal, after_legal, can_end, must_end)))
        return *masks, must_end

    def _unfinished(self, s: TuneState, legal: np.ndarray) -> bool:
        """The token being written cannot end here: it is no token, or not one that legal allows."""
        return bool(s.pending) and not (s.pending in self.at and legal[self.at[s.pending]])

    def _grows(self, s: TuneState, legal: np.ndarray) -> np.ndarray:
        """(V,) the characters that extend the pending token towards a legal one."""
        ids, grows = self.body.any_under(s.pending, legal)
        mask = np.zeros(len(self.vocab), dtype=bool)
        mask[ids] = grows
        return mask

    def _body_mask(self, s: TuneState, legal: np.ndarray, after_legal: tuple[int, np.ndarray], can_end: bool,
                   must_end: bool) -> np.ndarray:
        """(V,) the pending token grows, or it is finished and a new one starts, or the tune ends."""
        mask = self._grows(s, legal)
        if can_end and must_end:  # time to stop: nothing else
            mask[:] = False
        else:
            extending = self.extending.get(s.pending, self.extending[""])  # a token no prefix spells: none
            mask |= self._starts(*after_legal) & ~extending
        mask[self.vocab.eos_id] = can_end
        return mask

    def _legal_cached(self, s: TuneState, must_end: bool) -> tuple[int, np.ndarray]:
        """(the legal set's number, the set): equal sets share a number, whichever state they came from."""
        def build():
            legal = self._legal(s, must_end)
            number = self.legal_ids.setdefault(legal.tobytes(), len(self.legal_ids))
            return number, legal

        return self._cached(("legal", self._number(s, must_end)), build)

    def _starts(self, legal_id: int, legal: np.ndarray) -> np.ndarray:
        """(V,) the tokens that may begin where `legal` (numbered legal_id) is what may be committed."""
        def build():
            starts = np.zeros(len(self.vocab), dtype=bool)
            ids, begins = self.body.any_under("", legal)
            starts[ids] = begins
            whole = self.whole_body >= 0
            whole[whole] = legal[self.whole_body[whole]]
            starts[self.whole_ids[whole]] = True
            return starts

        return self._cached(("starts", legal_id), build)

    def _extending(self, pending: str) -> np.ndarray:
        """(V,) the tokens whose first character would extend the pending one: never a new start."""
        extends = np.zeros(len(self.vocab) + 1, dtype=bool)           # (V + 1,) index -1: no character
        if pending:
            extends[self.body.children(pending)[0]] = True
        tokens = extends[:-1].copy()
        tokens[self.whole_ids] = extends[self.whole_first]
        return tokens

    def _put(self, legal: np.ndarray, text: str, value: bool) -> None:
        """legal[text] = value; a token this vocabulary cannot spell stays illegal."""
        if text in self.at:
            legal[self.at[text]] = value

    def _legal(self, s: TuneState, must_end: bool) -> np.ndarray:
        """(N,) bool over the body tokens: which may be committed next. A token is legal when the syntax
        allows it (_syntax_legal: what is open, the kind of the last token, the repeats and endings) and
        it fits in time (_time_legal: the bar's ticks, the lengths a group fixes, the end of the tune).
        Each half reads its own fields of the state (SYNTAX_FIELDS, TIME_FIELDS) and a few facts of the
        other's (_time_facts, _syntax_facts), so that each can be known by a small key."""
        return self._syntax_legal(s, *_time_facts(s)) & self._time_legal(s, *_syntax_facts(s), must_end)

    def _syntax_legal(self, s: TuneState, broken: bool, place: str) -> np.ndarray:
        """(N,) the tokens the syntax allows; broken: a broken rhythm's partner is due; place: where the
        bar stands (_bar_place)."""
        branch = _branch(_group(s), broken, place == "after short", s.repeat_open)
        if branch in GROUP_BRANCHES:
            return self._syntax_in_group(s, branch)
        legal = self.is_note | self.is_rest
        for text in ("[", "{", "(3") + DECORATIONS:
            self._put(legal, text, True)
        for text in (">", "<"):
            self._put(legal, text, s.last == NOTE)
        self._put(legal, " ", s.last not in (-1, SPACE, NEWLINE))
        # after a line's lone letter and a space, a line break is the way on where only :| may close the bar
        self._put(legal, "\n", s.last not in (-1, SPACE, NEWLINE) or s.line_letter)
        for bar in BAR_LINES:  # "A:|" would read as a field line
            self._put(legal, bar, _repeats_allow(s, bar, place) and not (s.line_letter and bar.startswith(":")))
        self._put(legal, "-", s.last == NOTE and s.last_pitch >= 0)  # a plain note (not one that ends a tie)
        return legal

    def _syntax_in_group(self, s: TuneState, branch: str) -> np.ndarray:
        """_syntax_legal where something begun decides what comes next (branch: _branch)."""
        legal = np.zeros(len(self.kind), dtype=bool)
        if branch in ("final", "section opens"):  # the tune's end; or a short section's next, before its pickup
            self._put(legal, "|:", branch == "section opens")
            self._put(legal, "\n", s.last != NEWLINE)
        elif branch == "grace":
            legal = self.is_note & (s.grace < 4)
            self._put(legal, "}", s.grace > 0)
        elif branch == "chord":
            legal = (self.is_note & (max(s.chord, 0) < 4)) | ((self.kind == CHORD_CLOSE) & (s.chord > 0))
        elif branch == "tuplet":
            legal = self.is_note | self.is_rest
        elif branch == "tie":  # A2-A: the same pitch, in this bar or across a plain bar line (A2-|A2, A2-|\nA2)
            legal = self.is_note & (self.pitch == s.tie_pitch)
            self._put(legal, "|", True)
            self._put(legal, " ", s.last == BAR)
            self._put(legal, "\n", s.last == BAR)
        else:  # a partner note, or a decorated or graced one: abc2midi takes no roll or trill on a chord
            legal = self.is_note.copy()
            self._put(legal, "[", branch == "note due" and s.last != DECORATION)
        return legal

    def _time_legal(self, s: TuneState, group: str, graces: int, repeat_open: bool, open_group: bool,
                    must_end: bool) -> np.ndarray:
        """(N,) the tokens that fit in time (group, graces, repeat_open, open_group: _syntax_facts)."""
        rem = self._bar_target(s, must_end, open_group or s.broken_len > 0) - s.bar
        branch = _branch(group, s.broken_len > 0, bool(s.short_next) and s.bar == 0, repeat_open)
        if branch in ("final", "section opens"):
            return np.ones(len(self.kind), dtype=bool)
        if branch in ("grace", "chord", "broken", "tuplet"):
            return self._time_in_group(s, branch, rem, graces)
        # finishing the bar in few tokens (must_end): no ornaments, the longest notes that fit
        notes, sounds = self._fitting(rem, must_end and rem >= TICKS)
        if branch == "tie":
            legal = notes.copy()
            self._put(legal, "|", rem == 0)  # allowed when the - was (_tie_fits): a tie begun finishes
            self._put(legal, " ", True)
            self._put(legal, "\n", True)
            return legal
        if s.swung_tuplet and _swung_second(s, s.bar):  # abc2midi would swing it with the tuplet's last note
            notes, sounds = notes & (self.ticks != s.swing), sounds & ~(self.is_note & (self.ticks == s.swing))
        if branch == "note due":
            legal = notes & (self.ticks > s.graced * GRANULE)  # ("Grace sequence exceeds host note")
            self._put(legal, "[", rem >= GRANULE and not s.graced)  # a chord's length after grace notes is left alone
            return legal
        legal = sounds.copy()
        self._put_marks(legal, s, rem, must_end)
        closing = must_end or self._closing_last_bar(s)
        bars = [bar for bar in self._bar_lines(s, closing and not s.form)  # a form decides the bar lines itself
                if _form_allows(s, bar)]
        for bar in bars:
            self._put(legal, bar, True)
        self._put(legal, "-", self._tie_fits(s, rem, must_end, bars))
        return legal

    def _time_in_group(self, s: TuneState, branch: str, rem: int, graces: int) -> np.ndarray:
        """_time_legal in grace notes, a chord, a broken rhythm's partner or a tuplet."""
        if branch == "grace":  # abc2midi takes L/4 a grace note from the note after them, which must outlast them
            legal = (self.ticks == TICKS) & ((graces + 1) * GRANULE < self._longest_note(rem))
            self._put(legal, "}", True)
            return legal
        if branch == "broken":
            return self.ticks == s.broken_len
        if branch == "tuplet":
            return (self.ticks == s.tuplet_len) if s.tuplet_len else (2 * self.ticks <= rem) & self.fits_granule
        notes = (self.ticks == s.chord_len) if s.chord_len else (self.ticks <= rem) & self.fits_granule
        # abc2midi takes an outer length ([CE]2) instead of the inner one, the standard
        # multiplies them: allow an outer length only on plain inner notes, where both agree
        length = s.chord_len * self.ticks
        outer_ok = (self.ticks == TICKS) | (s.chord_len == TICKS and not s.swing)  # abc2midi's swing counts
        # a chord by its inner length: under a hornpipe, [CE]2 would move the pairs it swings ([C2E2] does not)
        closes = outer_ok & (length % (TICKS * GRANULE) == 0) & (length <= rem * TICKS)
        return np.where(self.kind == CHORD_CLOSE, closes, notes)

    def _tie_fits(self, s: TuneState, rem: int, must_end: bool, bars: list[str]) -> bool:
        """A tie after a note (_syntax_legal: a plain one): its second note in this bar, or (the bar full)
        after a plain | that the bar cap does not make the last (the tie would carry the tune a bar past
        it), from a note that TuneState.ties_across. Not when the tune must end: begun in the bar that must
        end it, a tie would carry it to a full bar."""
        if must_end:
            return False
        return rem > 0 or (s.ties_across() and "|" in bars and not self._near_bar_cap(s))

    def _fitting(self, rem: int, longest: bool) -> tuple[np.ndarray, np.ndarray]:
        """(N,) the notes, and the notes and rests, that fit in rem ticks (longest: only the longest
        length that fits, so that a bar ends in a token or two whatever L is; what it leaves is a
        multiple of L/4, filled the same way)."""
        def build():
            fits = (self.ticks <= rem) & self.fits_granule
            if longest:
                fits &= self.ticks == self.ticks[fits].max()
            return self.is_note & fits, (self.is_note | self.is_rest) & fits

        return self._cached(("fitting", rem, longest), build)

    def _longest_note(self, rem: int) -> int:
        """Ticks of the longest note that fits in rem (0: none)."""
        notes = self._fitting(rem, False)[0]
        return int(self.ticks[notes].max()) if notes.any() else 0

    def _put_marks(self, legal: np.ndarray, s: TuneState, rem: int, must_end: bool) -> None:
        """Where ornaments, chords, tuplets, broken rhythm, spaces and line breaks fit in time."""
        if rem >= GRANULE and not must_end:
            for text in ("[",) + DECORATIONS:
                self._put(legal, text, True)
        graces_fit, swung = GRANULE < self._longest_note(rem) and not must_end, _swung_second(s, s.bar)
        self._put(legal, "{", graces_fit and not swung)  # a grace note (a roll plays as such), then a note that
        self._put(legal, "~", graces_fit and not swung)  # outlasts it (a swung second would not: "Grace sequence
        self._put(legal, "(3", rem >= 2 * GRANULE and not must_end and not swung)  # exceeds host note")
        if _undotted(s.last_note) and not must_end:  # abcm2ps draws no A3/2>B3/2 (9/4 of L)
            paired = s.last_note == s.swing and _swung_second(s, s.bar - s.last_note)
            self._put(legal, ">", rem >= s.last_note and not paired)  # room for the partner note, of the same length
            halved_outlasts_graces = s.last_note // 2 > s.last_graced * GRANULE  # ("Grace sequence exceeds host note")
            self._put(legal, "<", rem >= s.last_note and not paired and halved_outlasts_graces)
        self._put(legal, " ", True)
        self._put(legal, "\n", True)

    @staticmethod
    def _bar_target(s: TuneState, must_end: bool, open_group: bool) -> int:
        """Ticks the current bar must reach: a full bar, a pickup, or (ending a tune that
        has a pickup) the short bar that completes it. open_group: TuneState.mid_group."""
        if s.short_next:
            return s.short_next
        if s.form and s.section < len(s.form):  # its last bar is known from its start: short after a pickup
            last = s.section_bars + 1 == s.form[s.section]
            return s.full - s.pickup if last and s.pickup else s.full
        if must_end and s.pickup and s.bar <= s.full - s.pickup and not open_group:
            return s.full - s.pickup  # (not in mid-chord: what was begun under the old target finishes)
        return s.full

    @staticmethod
    def _bar_lines(s: TuneState, must_end: bool) -> list[str]:
        """The bar lines the bar's time allows now, by where the bar stands (_bar_place, which
        _repeats_allow reads for those the repeats allow). abc2midi's reading decides the form, measured:
        a tune with a pickup is only clean if every section ends on the short bar that completes the
        pickup (with :| then |: and the pickup again, or |] at the very end)."""
        place = _bar_place(s)
        if place in ("opening", "empty", "after short"):  # a repeat may open the tune or follow a section's end
            return ["|:"] if not must_end or s.short_next else []
        if place == "completing":  # the pickup that completes the previous section's short bar
            return ["|"] if s.bar == s.short_next else []
        if place == "pickup":  # the tune's pickup; before |: it is played once, and no bar completes it
            opening = ["|:"] if not must_end else []
            return ["|"] + opening if s.bar % max(s.accompanied, 1) == 0 else opening
        if place == "short end":  # the end of the tune: after 16 notes, or when it must end
            return [":|"] + (["||", "|]"] if s.may_end_tune(must_end) else [])
        if place == "after pickup":
            return ["|"] if s.bar == s.full else []
        if place == "full":
            return [":|", ":|2", "||", "|]"] + ([] if must_end else ["|", "|:", "::", "|1"])
        return []


# the fields each half of the rules reads (_legal); the end rule's counts, which time reads, are apart
SYNTAX_FIELDS = frozenset({"final", "grace", "chord", "tuplet_left", "tie_pitch", "need_note", "repeat_open",
                           "last", "last_bar", "line_letter", "ending", "section_ends", "last_pitch"})
TIME_FIELDS = frozenset({"bar", "full", "first_bar", "pickup", "short_next", "last_note", "last_graced",
                         "last_decorated", "tuplet_len", "broken_len", "chord_len", "graced", "swing",
                         "swung_tuplet", "accompanied"})
END_FIELDS = frozenset({"form", "section", "section_bars", "common_bars", "full_bars", "notes"})
# the branches in which something begun decides what the syntax allows (_syntax_in_group)
GROUP_BRANCHES = ("final", "section opens", "grace", "chord", "tuplet", "tie", "note due", "broken")


def _group(s: TuneState) -> str:
    """What the syntax has open, in the order the rules look: the tune's end, grace notes, a chord, a
    tuplet, a tie, a decorated or graced note's note; "free" where nothing is."""
    for name, is_open in (("final", s.final), ("grace", s.grace), ("chord", s.chord), ("tuplet", s.tuplet_left),
                          ("tie", s.tie_pitch >= 0), ("note due", s.need_note)):
        if is_open:
            return name
    return "free"


def _branch(group: str, broken: bool, after_short: bool, repeat_open: bool) -> str:
    """Which rule decides the next token: the group open (_group), a broken rhythm's partner (after a
    chord, before a tuplet), or a short section's next before its pickup (after_short: its bar empty)."""
    if group in ("final", "grace", "chord"):
        return group
    if broken:
        return "broken"
    if group != "tuplet" and after_short and not repeat_open:
        return "section opens"
    return group


def _syntax_facts(s: TuneState) -> tuple[str, int, bool, bool]:
    """What _time_legal reads of the syntax: the group open, its grace notes, whether a repeat is open,
    and whether anything is open (TuneState.syntax_open)."""
    return _group(s), max(s.grace, 0), s.repeat_open, s.syntax_open()


def _time_facts(s: TuneState) -> tuple[bool, str]:
    """What _syntax_legal reads of time: whether a broken rhythm's partner is due, and _bar_place."""
    return s.broken_len > 0, _bar_place(s)


def _bar_place(s: TuneState) -> str:
    """Where the bar stands, as far as the bar lines the repeats allow depend on it."""
    if s.bar == 0:
        return "opening" if s.first_bar else "after short" if s.short_next else "empty"
    if s.short_next:
        return "completing"
    if s.first_bar and s.bar < s.full:
        return "pickup"
    if s.pickup:
        return "short end" if s.bar == s.full - s.pickup else "after pickup"
    return "full" if s.bar == s.full else "inside"


def _repeats_allow(s: TuneState, bar: str, place: str) -> bool:
    """Whether the repeats and endings let this bar line stand at this place (_bar_lines: where time lets
    one): a |: opens the tune or follows a section's end; one repeat at a time; :| closes the repeat
    open, or the first section; endings in order; the tune ends outside them."""
    if place in ("opening", "empty", "after short"):
        return bar == "|:" and (place == "opening" or s.last_bar in SECTION_ENDS) and not s.repeat_open
    if place == "pickup":
        return bar == "|" or (bar == "|:" and not s.repeat_open)
    if place == "short end":
        return bar in ("|", ":|") or (bar in ("||", "|]") and not s.repeat_open)
    if place != "full":
        return bar == "|"
    if bar == "|:":
        return not s.repeat_open and not s.ending
    if bar in (":|", "::", "|1"):
        return s.ending == 0 and (s.repeat_open or not s.section_ends)
    if bar == ":|2":
        return s.ending == 1
    return bar == "|" or (not s.repeat_open and s.ending != 1)  # || and |]


def _why_no_mark_here(s: TuneState, token: str, left: int, kind: str) -> str:
    """_why_not_in_bar for broken rhythm whose partner note would not fit, and for the marks abc2midi's
    hornpipe swing forbids on the second note of a pair."""
    if token in (">", "<") and s.last == NOTE and 0 < left < s.last_note:
        return (f" (after > or <, the partner note is as long as the note before, {_units(s.last_note)}: "
                f"the bar{kind} has room for {_units(left)})")
    paired = _swung_second(s, s.bar - s.last_note) if token in (">", "<") else _swung_second(s, s.bar)
    if token[:1] in ("(", "~", "{", ">", "<") and paired:
        return (" (under R:hornpipe abc2midi swings the note here as the second of a pair: it takes no "
                "tuplet, roll, grace notes or broken rhythm of the tune's own)")
    return ""


def _why_not_inside(s: TuneState, token: str) -> str | None:
    """_why_refused inside what is open (a tie, grace notes, a partner note, a tuplet, a decorated or
    graced note) or for a broken rhythm the note before does not take: " (...)"; "" in a chord (the
    quote shows why); None outside them all."""
    if s.tie_pitch >= 0:
        if token[0] in NOTE_STARTS:
            return " (a tie joins two notes of one pitch: in one bar, or across a plain | that closes a full one)"
        return (" (a tie crosses a plain | alone, one that closes a full bar)" if token[0] in "|:" else
                " (after a tie's -, its second note follows straight, or a plain | and then it)")
    if s.grace:
        return " (grace notes are plain notes of one unit of L, at most 4: {g}, {gfg})"
    if s.broken_len and token[0] not in NOTE_STARTS:  # a note: its length is the reason (_why_not_in_time)
        return " (> and < stand straight between their two notes)"
    if s.tuplet_left:
        return " ((3 is followed straight by three plain notes or rests of one length, in the bar)"
    if s.need_note:
        return (" (a decoration is followed straight by its note, never a chord)" if s.last == DECORATION
                else " (grace notes are followed straight by their note, which takes no decoration)")
    if s.chord:
        return ""
    if token in (">", "<") and s.last != NOTE:
        return " (> and < stand straight between their two notes)"
    if token in (" ", "\n") and s.last == -1:
        return " (the body begins with its music)"
    if token[0] in "-<>" and s.last == NOTE and s.last_staccato:
        return (" (a staccato note starts no tie or broken rhythm: abc2midi finds no note before its -, and "
                "cannot apply > or <)")
    if token in (">", "<") and not _undotted(s.last_note):
        return (" (broken rhythm follows an undotted note: not a tuplet's, a partner's or a tied one, which "
                "abc2midi and abcm2ps misread)")
    if token == "<" and s.last_note // 2 <= s.last_graced * GRANULE:
        return " (< halves a note, which must still outlast its grace notes or roll, a quarter of L each)"
    return None


def _check_header_place(s: TuneState, line: str) -> None:
    """Refuses a header line the automaton does not read, a second X:, R:, L: or M:, and an X: after
    another line (which starts another tune in ABC)."""
    letter = line[:1]
    if line[1:2] != ":" or letter not in HEADER_ORDER + TEMPO_FIELD:
        raise PromptError(f"--constrained reads a header of X:, then R:, L:, M:, Q: in any order, then K: (and info "
                          f"lines like T:, which the model does not read), not {line!r}")
    if letter == "X" and s.phase > 0:
        raise PromptError(f"--constrained: X: comes first in a header, not {line!r} after another line")
    if letter in s.given:
        raise PromptError(f"--constrained: the header gives {letter}: twice, the second {line!r}")


def _accompany(s: TuneState, prompt: str) -> None:
    """After a chord symbol: abc2midi's accompaniment plays in eighth notes, and one that begins in
    the last bar of a tune with a pickup outlasts it unless that bar is whole eighths ("Sustained
    notes beyond end of track", measured in every meter): so the pickup, which the last bar completes,
    is made of whole eighths."""
    s.amend(accompanied=s.full // int(bar_units(s.meter, "1/8")))
    if s.pickup % s.accompanied:
        raise PromptError(f"--constrained: with chord symbols, a pickup must be whole eighth notes (abc2midi's "
                          f"accompaniment outlasts a shorter last bar), at {prompt!r}")


UNSUPPORTED = [  # pasted ABC that --constrained neither writes nor reads, and what it reads instead
    (re.compile(r"\[[A-Za-z]:"), "an inline field like [K:G] or [M:3/4]: it keeps the header's key, meter and unit"),
    (re.compile(r"(?m)^[A-Za-z]:"), "a field line in the body (w:, V:, N:, ...): it reads header lines up to K:, "
                                    "then music"),
    (re.compile(r"\[\d"), "an ending written [1 apart from its bar line: it reads |1 and :|2, or |[1 and :|[2"),
    (re.compile(r"[xZ]"), "a rest written x or Z: it reads z"),
    (re.compile(r":\|:"), "a :|:, which abc2midi reads as neither a repeat's end nor a start: write :: or :||:"),
    (re.compile(r">>|<<"), "a doubled broken rhythm: it reads one > or <"),
    (re.compile(r"\((?!3)\d"), "a tuplet other than (3: it reads (3 alone"),
    (re.compile(r"\(\d:"), "a tuplet written (p:q:r: it reads (3 alone, three notes in the time of two"),
    (re.compile(r"H|!fermata!"), "a fermata: abc2midi plays the note longer, past its bar"),
    (re.compile(r"\.(?=[z\[])|!staccato!(?=[z\[])"), "a staccato on a rest or a chord: it reads one on a note"),
    (re.compile(r"\.(?![\^_=A-Ga-g])"), "a staccato not straight before its note: it reads .A"),
    (re.compile(r"![^!\n]*!|\+[^+\n]*\+|[LMOPS](?!:)"),
     "a decoration it does not write: it reads ~, T, u, v, !trill! and !accent!"),
    (re.compile(r"\{/"), "an acciaccatura {/g}: it reads grace notes as {g}"),
    (re.compile(r"\{[^}\n]*[\d/][^}\n]*\}"), "a grace note with a length: it reads grace notes of one unit, {g}"),
    (re.compile(r"(?:\^\^|__)[A-Ga-g]"), "a double sharp or flat: it reads one accidental a note"),
    (re.compile(r"[A-Ga-g](?:,,|'')"), "a note below C, or above b': it reads the three octaves between"),
    (re.compile(r"[A-Ga-gz][,']*(?!(?:3/2|3/|//|/4|/2|/|2|3|4|6|8)(?![\d/]))[\d/]+"),
     "a length it does not write: it reads 1/4, 1/2, 3/2, 1, 2, 3, 4, 6 and 8 units of L"),
    (re.compile(r"\\$", re.M), "a line continuation \\: it reads each line as written"),
    (re.compile(r"y"), "a spacer y: it reads none"),
    (re.compile(r"[h-tw]|[IJKNQRUVWY](?!:)"), "a letter that is no note, rest or decoration it reads"),
    (re.compile(r"\[\|\]"), "an invisible bar [|]: abc2midi reads it as a chord"),
    (re.compile(r"\(3 "), "a space after (3: it reads (3 straight before its first note"),
    (re.compile(r"\][<>]"), "broken rhythm after a chord: it reads > and < between notes"),
    (re.compile(r"-[\^_=]?[A-Ga-g][,']*[\d/]*-"), "a note that ends a tie and starts another: abc2midi miscounts "
                                                  "A-A-A, so it reads ties of two notes"),
]


def _why_unfinished_header(pending: str) -> str:
    """A prompt ends in a header line the model cannot finish: a field begun, or music before K:."""
    if re.match(r"[A-Za-z]:", pending):
        return (f"--constrained: the prompt ends inside a header line it cannot complete: {pending!r} "
                f"(end the line: the model writes only X:, R:, L:, M: and K: lines)")
    return (f"--constrained: the prompt's music {_quote(pending)} comes before a K: line, which ends the "
            f"header: put a header before it, such as 'X:1\\nM:6/8\\nK:D\\n'")


def _as_written(line: str) -> str:
    """A prompt's header line as the model writes it, for the model to go on from: "K: Edor" -> "K:Edor"
    (thesession.org writes a space after the colon; abc2midi reads both)."""
    return re.sub(r"^([A-Za-z]):[ \t]+", r"\1:", line)


def _unsupported(prompt: str, at: int) -> str:
    """ " (...)" naming the construct of UNSUPPORTED that the character at `at` belongs to, if any."""
    for pattern, what in UNSUPPORTED:
        if any(m.start() <= at < m.end() for m in pattern.finditer(prompt, max(0, at - 12), at + 12)):  # !fermata!
            return f" ({what})"
    return ""


def _quote(text: str, shown: int = 60) -> str:
    """The prompt up to where it broke, its last `shown` characters when it is long."""
    return repr(text) if len(text) <= shown + 20 else "..." + repr(text[-shown:])


def _units(ticks: int) -> str:
    """A length in units of L, as a reader counts them: "6 units of L", "3/2 units of L"."""
    units = Fraction(ticks, TICKS)
    return f"{units} unit{'s' if units != 1 else ''} of L"


def _bar_kind(s: TuneState, target: int) -> str:
    """Which bar a shorter target than the meter's makes this one: " that completes the pickup"."""
    if s.short_next:
        return " that completes the short bar before :|"
    if target == s.full:
        return ""
    return f" that ends the {'section' if s.form else 'tune'} and completes the pickup"


def _swung_second(s: TuneState, at: int) -> bool:
    """Under a hornpipe, whether a note at `at` ticks into the bar may be the second that abc2midi swings
    with the one before: anywhere but an even multiple of its swing length (abc2midi's count of a bar
    can differ from the tune's after a chord). abc2midi fails on a roll, a tuplet or a broken rhythm of
    the tune's own there ("Cannot apply broken rhythm", "Bar N has 17/9 time units", measured)."""
    return bool(s.swing) and at % (2 * s.swing) != 0


def _undotted(ticks: int) -> bool:
    """A length of L/4 times a power of two (0: no note): broken rhythm dots it once, which a score
    can draw; a dotted one (3/2, 3, 6) it would dot twice ("Note too much dotted", abcm2ps)."""
    return ticks > 0 and (ticks // GRANULE) & (ticks // GRANULE - 1) == 0


def _counted(s: TuneState) -> int:
    """1 if the bar that a bar line now closes counts in its section (abc_form's rule: a short
    bar that opens a section is a pickup and does not), else 0."""
    pickup = s.short_next or (s.first_bar and s.bar < s.full)
    return int(s.bar > 0 and not pickup)


def _ends_section(bar: str, bars: int) -> bool:
    """abc_form's rule, for a section with `bars` bars."""
    return bars > 0 and not ENDING_NUMBER.search(bar) and ends_section(bar)


def _form_allows(s: TuneState, bar: str) -> bool:
    """Under a form: a bar line that keeps this section on its count of bars."""
    if not s.form:
        return True
    bars, target = s.section_bars + _counted(s), s.form[s.section]
    if _ends_section(bar, bars):
        last = s.section + 1 == len(s.form)
        return bars == target and not (last and bar in ("|:", "::"))
    return bars == target if bar == ":|2" else bars < target  # |, |1: the section goes on


def _count_form_bar(s: TuneState, bar: str) -> None:
    """Under a form: count the bar this bar line closes; an ending's bars replace the one
    before it, as abc_form counts them; after the last section the tune ends."""
    bars = s.section_bars + _counted(s)
    if bar == "|1":
        s.common_bars = bars
    elif bar == ":|2":
        bars = s.common_bars
    s.section_bars = bars
    if _ends_section(bar, bars):
        s.section, s.section_bars, s.common_bars = s.section + 1, 0, 0
        s.final = s.section == len(s.form)


def _with_penalty(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mask, its penalty: 0 where legal, -inf elsewhere)."""
    return mask, np.where(mask, np.float32(0), np.float32(-np.inf))


def _copy(state: TuneState) -> TuneState:
    copy = object.__new__(TuneState)  # a field-for-field copy, without __init__'s cost per step
    copy.__dict__.update(state.__dict__)
    return copy
