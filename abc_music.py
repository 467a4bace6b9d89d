"""
abc_music: the music arithmetic of ABC text, torch-free and numpy-free.

Holds:
- the pieces of a note: NATURAL (pitch class of each letter), ACCIDENTALS, KEY_ACCIDENTALS,
  pitch_spelling, note_shape, pitch_class; all reading abc_tokens.PITCH, the one note pattern;
- meters and lengths: parse_meter, default_unit (the one default-L: rule), parse_length,
  format_length;
- tunebooks normalised into IrishMAN's form: split_tunebook, without_blank_lines, clean_body_line,
  normalize_tune, read_tunebook (a file header's L:, M: and R: for the tunes that lack them:
  file_header, with_defaults); and the parts of a tune: tune_body, note_tokens;
- keys: Key, parse_key, transpose_key;
- transposition: transpose_tune, RewriteError, parse_note_range;
- lengths and rhythm: scale_lengths, token_length, change_rhythm, set_unit_length.

Pitches are read as abc2midi plays them: key signature, then accidentals that hold to the end
of the bar for that letter in every octave (the standard says that octave only); a rewrite writes
an accidental wherever either reading would need one, so both hear the same notes. The tests
check every rewrite against abc2midi, an independent ABC parser.
"""

from __future__ import annotations

import functools
import itertools
import re
from dataclasses import dataclass, field
from fractions import Fraction

from abc_tokens import PITCH, PITCH_RE, iter_token_kinds, tokenize_abc_kinds

# -----------------------------------------------------------------------------
# the pieces of a note, meters and lengths

LETTERS = "CDEFGAB"
NATURAL = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}  # pitch class of each letter
ACCIDENTALS = {"^^": 2, "^": 1, "=": 0, "_": -1, "__": -2}        # a note's accidental -> semitones
ACCIDENTAL_FOR = {shift: text for text, shift in ACCIDENTALS.items()}
KEY_ACCIDENTALS = {"#": 1, "b": -1, "": 0}                          # in key and chord names: F#, Bb


def pitch_spelling(note: str) -> str:
    """A note token without its length: "^c'3/2" -> "^c'"."""
    return PITCH_RE.match(note).group()


@functools.lru_cache(maxsize=4096)  # called once per sampled token; the pending texts are few
def note_shape(pending: str) -> str:
    """A pending token with its note's letter replaced by its register: "^f2" -> "^c2".

    It keeps all that the constraint's rules read from the text: the length, the octave
    marks that may follow, and the accidental, since a bare letter at the start of a line
    ("c" before ":|") would read as a field ("c:").
    """
    m = PITCH_RE.match(pending)
    if not m:
        return pending
    return (m.group(1) or "") + ("C" if m.group(2).isupper() else "c") + pending[m.end(2):]


def pitch_class(note: str) -> int:
    """Written pitch class: letter and explicit accidental (the key signature is not applied)."""
    m = PITCH_RE.match(note)
    return (NATURAL[m.group(2).upper()] + ACCIDENTALS.get(m.group(1), 0)) % 12


def parse_meter(value: str) -> tuple[int, int] | None:
    """M: value -> (beats, beat unit), not reduced (6/8 stays 6, 8); M:C = 4/4, M:C| = 2/2.
    None for M:none and anything else without a numeric meter."""
    value = {"C": "4/4", "C|": "2/2"}.get(value.strip(), value.strip())
    m = re.fullmatch(r"(\d+)/(\d+)", value)
    return (int(m.group(1)), int(m.group(2))) if m and int(m.group(1)) and int(m.group(2)) else None


def power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def playable_unit(value: str) -> bool:
    """An L: value abc2midi plays as written: 1/N with N a power of two (L:1/7 it does not)."""
    unit = written_unit(value)
    return unit is not None and power_of_two(unit.denominator)


def playable_meter(value: str) -> bool:
    """A meter abc2midi plays as written: C, C|, or N/D with D a power of two (M:3/3 it refuses)."""
    parsed = parse_meter(value)
    return parsed is not None and power_of_two(parsed[1])


_LABEL = r'(?:"[^"\n]*"[ \t]*)?'
TEMPO = re.compile(rf"[ \t]*{_LABEL}(?:(?:(\d{{1,4}})/(\d{{1,4}})[ \t]*=[ \t]*)?(\d{{1,4}})[ \t]*)?{_LABEL}")  # Q:"Allegro" 1/4=120


def playable_tempo(value: str) -> bool:
    """A Q: line abc2midi reads: beats a minute, of a note 1/N with N a power of two (Q:1/3=90 and
    Q:1/4=0 it reports as errors), a label in quotes before or after it, or the label alone."""
    m = TEMPO.fullmatch(value)
    if m is None or not value.strip():
        return False
    return m[3] is None or (int(m[3]) > 0 and (m[1] is None or (int(m[1]) > 0 and power_of_two(int(m[2])))))


def default_unit(meter: str | None) -> Fraction:
    """The unit length L: of a tune that gives none, as ABC defines it: 1/16 below a meter
    of 3/4, else 1/8 (also without a numeric meter)."""
    parsed = parse_meter(meter) if meter is not None else None
    return Fraction(1, 16) if parsed is not None and Fraction(*parsed) < Fraction(3, 4) else Fraction(1, 8)


def written_unit(unit: str | None) -> Fraction | None:
    """An L: value that reads 1/N, as a length ("1/8" -> 1/8); None for anything else."""
    return Fraction(unit.strip()) if unit and re.fullmatch(r"1/\d+", unit.strip()) else None


def bar_units(meter: str | None, unit: str | None) -> Fraction | None:
    """A full bar in units of L: the meter over the unit length (L: as written when it reads
    1/N, else ABC's default); None without a numeric meter."""
    parsed = parse_meter(meter) if meter else None
    if parsed is None:
        return None
    return Fraction(*parsed) / (written_unit(unit) or default_unit(meter))


_UNIT_FIELD = re.compile(r"(?m)^L:(.*)$|\[L:([^\]]*)\]")


def readable_lengths(tune: str) -> bool:
    """Every L: a length like 1/8, and no note length over 0 (A/0): the arithmetic of lengths
    (bars, forms, augmentation) reads every other tune."""
    for m in _UNIT_FIELD.finditer(tune):
        value = (m.group(1) if m.group(1) is not None else m.group(2)).split("%", 1)[0].strip()
        if not re.fullmatch(r"[1-9]\d*(/[1-9]\d*)?", value):
            return False
    return not re.search(r"/0+(?!\d)", tune_body(tune))


def parse_length(text: str) -> Fraction:
    """ABC length suffix -> multiple of L: "" 1, "3" 3, "/" 1/2, "//" 1/4, "3/2" 3/2, "3/" 3/2."""
    m = re.fullmatch(r"(\d*)(/*)(\d*)", text)
    num = int(m.group(1)) if m.group(1) else 1
    slashes = len(m.group(2))
    if not slashes:
        return Fraction(num)
    den = int(m.group(3)) * 2 ** (slashes - 1) if m.group(3) else 2 ** slashes
    return Fraction(num, den)


def format_length(length: Fraction) -> str:
    """Multiple of L -> the shortest ABC suffix."""
    if length.denominator == 1:
        return "" if length == 1 else str(length.numerator)
    num = "" if length.numerator == 1 else str(length.numerator)
    return f"{num}/" if length.denominator == 2 else f"{num}/{length.denominator}"


_LENGTHED = re.compile(rf"(?P<what>{PITCH}|[zx]|\])(?P<length>[\d/]*)")  # a note, rest or chord close


def scale_lengths(token: str, factor: Fraction) -> str:
    """A note, rest or chord close with its length multiplied by factor."""
    return _LENGTHED.sub(lambda m: m["what"] + _scaled_length(m["length"], factor), token)


@functools.lru_cache(maxsize=4096)
def _scaled_length(suffix: str, factor: Fraction) -> str:
    """A length suffix times factor; cached, since a corpus writes few distinct lengths and
    augmentation rewrites every one of them each epoch."""
    return format_length(parse_length(suffix) * factor)


def token_length(token: str) -> Fraction:
    """A note's, rest's or chord close's length in units of L: "^c'3/2" -> 3/2, "]2" -> 2."""
    return parse_length(_LENGTHED.match(token)["length"])


def _rewrite_lengths(abc: str, factor_for) -> str:
    """Scale every length in the body; factor_for(field_token) may change the factor mid-tune.

    A chord with an outer length ([CEG]2) has that length scaled, one without ([C2E2]) its
    notes: that keeps its duration right whether a reader multiplies the two or not.
    """
    out, chord, factor, in_body = [], None, factor_for(None), False
    for token, kind in tokenize_abc_kinds(abc):
        if kind in ("field", "inline_field"):
            new = factor_for(token)
            if new is not None and not isinstance(new, Fraction):
                token, new = new  # the field rewritten, and the factor from here on
            factor = new if new is not None else factor
            in_body = in_body or token.lstrip("[").startswith("K:")
        elif in_body and kind == "chord_open":
            chord = [(token, kind)]
            continue
        elif chord is not None and kind == "chord_close":
            outer = token != "]"
            inner = [t if outer or k != "note" else scale_lengths(t, factor) for t, k in chord]
            token = "".join(inner) + (scale_lengths(token, factor) if outer else token)
            chord = None
        elif chord is not None:
            chord.append((token, kind))
            continue
        elif in_body and kind in ("note", "rest", "grace"):  # a grace group's notes are lengths of L too
            token = scale_lengths(token, factor)
        out.append(token)
    return "".join(out + [t for t, _ in chord or []])


# -----------------------------------------------------------------------------
# tunebooks, normalised into IrishMAN's record form

_FIELD_LINE = re.compile(r"^([A-Za-z]):(?![|:])(.*)$")     # "K: G", not the body line "G:|"
_QUOTED = re.compile(r'"[^"\n]*"')
# A chord symbol ("Am", "G/B", "D7", "Bbmaj7") is music; any other quoted string is an
# annotation ("^text", "_mf") or a fingering ("4") and is dropped.
CHORD_SYMBOL = re.compile(  # its group "type": what follows the root ("m7" of "F#m7/A")
    r'"\(?[A-G][#b]?(?P<type>(?:m(?!aj)|min|maj|M|dim|aug|sus|add|\+|o)?\d*(?:(?:sus|add|b|#)\d+)*)'
    r'(?:/[A-Ga-g][#b]?)?\)?"')
# The chord types abc2midi's table names (abcmidi 4.84, each checked by a test): it refuses any
# other ("Unrecognized chord name"), so a prompt's chord symbol under --constrained is one of these.
ABC2MIDI_CHORD_TYPES = frozenset(("", "m", "7", "m7", "m7b5", "maj7", "M7", "6", "m6", "aug", "+", "aug7", "dim",
                                  "dim7", "9", "m9", "maj9", "M9", "11", "dim9", "sus", "sus2", "sus4", "sus9",
                                  "7sus2", "7sus4", "7sus9", "5"))


# The tune types an R: line may name, normalised to one lowercase spelling each; other
# values (rare dances, free text) are dropped, never guessed from the meter.
TUNE_TYPES = ("reel", "jig", "slip jig", "hornpipe", "strathspey", "clog", "air", "fling", "waltz", "slide",
              "polka", "march", "mazurka", "barndance")
_TYPE_SPELLINGS = {name.replace(" ", ""): name for name in TUNE_TYPES} | {"doublejig": "jig", "highlandfling": "fling"}


def swung_as_hornpipe(r_value: str) -> bool:
    """Whether abc2midi reads an R: line's value as a hornpipe, by its own test (the value, spaces and
    tabs skipped, begins "hornpipe" or "Hornpipe": "hornpipes" and "hornpipe, reel" do, "HORNPIPE"
    and "horn pipe" do not). It then swings pairs of notes and refuses every meter but 2/4 and 4/4."""
    return r_value.lstrip(" \t").startswith(("hornpipe", "Hornpipe"))


def hornpipe_meter(value: str) -> bool:
    """Whether abc2midi plays R:hornpipe in this M: value: 2/4 and 4/4 (M:C) alone ("Hornpipe must be in
    2/4 or 4/4 time"; it then plays the tune unswung)."""
    return parse_meter(value) in ((2, 4), (4, 4))


def tune_type(value: str) -> str | None:
    """R: text -> one of TUNE_TYPES, or None: "Slip Jig", "slipjig", "slip-jig" -> "slip jig"."""
    return _TYPE_SPELLINGS.get(re.sub(r"[\s_-]+", "", value.lower()))


def tune_types(tunes: list[str]) -> tuple[str, ...]:
    """The types that the tunes' R: lines name, in TUNE_TYPES order."""
    named = {header_field(t, "R") for t in tunes}
    return tuple(name for name in TUNE_TYPES if name in named)


def split_tunebook(text: str) -> list[list[str]]:
    """A tunebook -> the lines of each tune, from its X: line to the next blank line."""
    tunes, current = [], None
    for line in text.splitlines():
        if line.startswith("X:"):
            current = [line]
            tunes.append(current)
        elif current is not None and line.strip() == "":
            current = None
        elif current is not None:
            current.append(line)
    return tunes


BLANK_LINE = re.compile(r"\n[ \t]*(?=\n)")  # a blank (or blank-looking) line, after the line before it


def without_blank_lines(tune: str) -> str:
    """One tune's text with its blank lines dropped: in a tunebook a blank line ends the tune
    (split_tunebook), so the music after one would belong to no tune."""
    return BLANK_LINE.sub("", tune.strip("\n"))


def clean_body_line(line: str) -> str:
    """Drop comments, annotations, fingerings, spacers and line continuations; keep the music."""
    line = line.split("%", 1)[0].replace("`", "")
    line = _QUOTED.sub(lambda m: m.group() if CHORD_SYMBOL.fullmatch(m.group()) else "", line)
    line = line.rstrip().removesuffix("\\")
    return re.sub(r"[ \t]+", " ", line).strip()


def normalize_tune(lines: list[str]) -> str | None:
    """One tune's lines -> IrishMAN form (X:1, R:, L:, M:, K:, body), or None to skip it.

    R: is kept only when it names one of TUNE_TYPES (as tune_type spells it).

    Skipped: tunes with several voices (V:), with no K: line, whose body is not music
    (looks_like_music), or with a length no arithmetic reads (readable_lengths: L:1/0, A/0).
    """
    header, body, in_body = {}, [], False
    for raw in lines:
        m = _FIELD_LINE.match(raw.strip())
        if m:
            letter, value = m.group(1), re.sub(r"\s+", " ", m.group(2).split("%", 1)[0].strip())
            if letter == "V":
                return None
            if not in_body:
                if letter in "LMK" and letter not in header:
                    header[letter] = value
                elif letter == "R" and letter not in header and tune_type(value):
                    header[letter] = tune_type(value)
                in_body = letter == "K"
            elif letter in "LMK":
                body.append(f"[{letter}:{value}]")  # a mid-tune change, kept as an inline field
            continue  # titles, notes, sources, lyrics (w:, W:), ... are dropped
        if in_body and not raw.lstrip().startswith("%"):
            if "[V:" in raw:
                return None
            line = clean_body_line(raw)
            if line:
                body.append(line)
    if "K" not in header or not looks_like_music("\n".join(body)):
        return None
    head = ["X:1"] + [f"{k}:{header[k]}" for k in "RLMK" if k in header]
    tune = "\n".join(head + body) + "\n"
    return tune if readable_lengths(tune) else None


MARKS = set("()~.-HLMOPSTuvy`&\\%*;")  # one-character ABC symbols the tokenizer leaves as plain characters:
#                                         slurs, decorations, ties, spacers, continuations


def looks_like_music(body: str) -> bool:
    """At least one note, and at most a third of the tokens characters that ABC gives no
    meaning (the default corpus: at most 10%; random text that holds X: and K: lines: far more)."""
    notes = junk = tokens = 0
    for tok, kind in iter_token_kinds(body):  # a stream: a tune may be megabytes long
        if not tok.isspace():
            tokens, notes, junk = tokens + 1, notes + (kind == "note"), junk + (kind == "char" and tok not in MARKS)
    return notes > 0 and junk <= tokens / 3


def read_tunebook(text: str) -> tuple[list[str], int]:
    """All usable tunes of an ABC tunebook, normalised, in order; and how many were skipped."""
    defaults = file_header(text)
    blocks = [with_defaults(lines, defaults) for lines in split_tunebook(text)]
    tunes = [t for t in (normalize_tune(lines) for lines in blocks) if t is not None]
    return tunes, len(blocks) - len(tunes)


def file_header(text: str) -> list[str]:
    """The L:, M: and R: lines of a tunebook's file header (its first block, when that is no tune),
    which ABC applies to every tune that does not set its own."""
    # the first block ends at a blank line, as split_tunebook ends a tune
    first = list(itertools.takewhile(lambda line: line.strip(), text.splitlines()))
    if any(line.startswith("X:") for line in first):
        return []
    lines = [line.strip() for line in first]
    return [line for line in lines if (m := _FIELD_LINE.match(line)) and m[1] in "LMR"]


def with_defaults(lines: list[str], defaults: list[str]) -> list[str]:
    """A tune's lines with the file header's lines just before its K: line, where normalize_tune reads
    them only for the fields the tune has not set (it keeps each field's first line)."""
    at = next((i for i, line in enumerate(lines) if line.strip().startswith("K:")), len(lines))
    return lines[:at] + defaults + lines[at:]


def header_field(tune: str, letter: str) -> str | None:
    """The value of the tune's first `letter:` line ("M" -> "6/8"), or None."""
    m = re.search(rf"(?m)^{letter}:(.*)$", tune)
    return m.group(1).strip() if m else None


def tune_body(tune: str) -> str:
    """The music after the K: line."""
    parts = re.split(r"(?m)^K:[^\n]*\n", tune, maxsplit=1)
    return parts[1] if len(parts) == 2 else tune


def note_tokens(tune: str) -> list[str]:
    return [t for t, kind in tokenize_abc_kinds(tune_body(tune)) if kind == "note"]


# -----------------------------------------------------------------------------
# keys

_LETTER_FIFTHS = [0, 2, 4, -1, 1, 3, 5]  # C D E F G A B as a major key: sharps (>0) or flats (<0)
_MODES = {"": 0, "maj": 0, "ion": 0, "mix": -1, "dor": -2, "m": -3, "min": -3, "aeo": -3, "phr": -4, "loc": -5,
          "lyd": 1}  # fifths from the major key of the same tonic
_KEY = re.compile(r"\s*([A-G])([#b]?)(\s*)([A-Za-z]*)(.*)", re.S)
_EXPLICIT = re.compile(r"(?:^|\s)(?:exp\b|(?:\^\^|\^|__|_|=)[A-Ga-g])")  # accidentals a K: line sets itself


class RewriteError(ValueError):
    """A tune that cannot be rewritten as asked: notes out of the playable range, a meter that cannot scale."""


@dataclass(frozen=True)
class Key:
    tonic: int        # letter index, C=0 .. B=6
    alter: int        # -1 flat, 0, +1 sharp tonic
    mode: str         # as written ("m", "dor", "Mixolydian"...)
    rest: str         # anything after the key (clef=..., spaces)
    fifths: int       # sharps (>0) or flats (<0) of the signature

    def signature(self) -> dict[int, int]:
        """letter index -> alteration from the key signature."""
        order = "FCGDAEB" if self.fifths > 0 else "BEADGCF"
        return {LETTERS.index(ch): (1 if self.fifths > 0 else -1) for ch in order[:abs(self.fifths)]}

    def text(self) -> str:
        return LETTERS[self.tonic] + {1: "#", -1: "b", 0: ""}[self.alter] + self.mode + self.rest


def parse_key(value: str) -> Key | None:
    """K: value -> Key, or None for K:none and other keys without a tonic.

    Read as abc2midi reads them: the bagpipe keys K:Hp and K:HP as A mixolydian (F# C#), and
    an unknown mode (K:Bn, a typo in two corpus tunes) as major.
    """
    if value.strip() in ("Hp", "HP"):
        value = "Amix"
    m = _KEY.fullmatch(value)
    if not m:
        return None
    space, mode, rest = m.group(3), m.group(4), m.group(5)
    name = mode.lower()[:3] if len(mode) > 1 else mode.lower()
    if space and name not in _MODES:  # "G clef=bass", "D exp _b": a word after a space that names no mode
        mode, rest = "", space + mode + rest
    else:
        mode = space + mode  # as written: "G minor" stays "A minor", transposed
    tonic, alter = LETTERS.index(m.group(1)), KEY_ACCIDENTALS[m.group(2)]
    fifths = _LETTER_FIFTHS[tonic] + 7 * alter + _MODES.get(name, 0)
    return Key(tonic, alter, mode, rest, fifths)


MODE_NAMES = ("major", "minor", "ionian", "dorian", "phrygian", "lydian", "mixolydian", "aeolian", "locrian")


def playable_key(value: str) -> bool:
    """A key as a user types one: a tonic, its sharp or flat, and a mode abc2midi knows (m, or a
    mode's name from its first three letters on: dor, Mix, minor), nothing after it, and at most 7
    sharps or flats (abc2midi warns "Unusual key representation" on K:A#, K:Fb). parse_key is
    lenient, as abc2midi is with a tune's K: line; a key asked for is held to what it names."""
    key = parse_key(value)
    mode = key.mode.strip().lower() if key else ""
    known = mode in ("", "m") or (len(mode) >= 3 and any(name.startswith(mode) for name in MODE_NAMES))
    return key is not None and known and not key.rest.strip() and "\n" not in value and abs(key.fifths) <= 7


def transpose_key(key: Key, semitones: int) -> tuple[Key, int]:
    """The key a number of semitones away, spelled with the fewest accidentals, and the
    number of letter steps between the two tonics (an octave more for each 12 semitones more)."""
    octaves, semitones = divmod(semitones + 6, 12)  # the key of a shift within -6..+5, then whole octaves
    semitones -= 6
    pitch = (NATURAL[LETTERS[key.tonic]] + key.alter + semitones) % 12
    best = None
    for steps in range(-7, 8):
        letter = (key.tonic + steps) % 7
        alter = (pitch - NATURAL[LETTERS[letter]] + 6) % 12 - 6
        if abs(alter) > 1:
            continue
        mode_offset = key.fifths - _LETTER_FIFTHS[key.tonic] - 7 * key.alter
        fifths = _LETTER_FIFTHS[letter] + 7 * alter + mode_offset
        # the interval from the old tonic to this one must be the shift (up to octaves)
        interval = _letter_semitones(key.tonic, steps) + alter - key.alter
        if (interval - semitones) % 12:
            continue
        cost = (abs(fifths), abs(interval - semitones))
        if best is None or cost < best[0]:
            best = (cost, Key(letter, alter, key.mode, key.rest, fifths), steps)
    return best[1], best[2] + 7 * octaves


def _letter_semitones(letter: int, steps: int) -> int:
    """Semitones between the natural notes `steps` letters apart, starting at `letter`."""
    start = NATURAL[LETTERS[letter]]
    total = letter + steps
    return NATURAL[LETTERS[total % 7]] + 12 * (total // 7) - start


# -----------------------------------------------------------------------------
# transposition: every note to the new key's letters, with the accidentals it needs

@dataclass
class _Pitch:
    letter: int    # diatonic index from C of octave 0: octave * 7 + letter
    midi: int


def _note_pitch(acc, letter, octave_marks, signature, bar_alter) -> _Pitch:
    octave = (5 if letter.islower() else 4) + octave_marks.count("'") - octave_marks.count(",")
    index = LETTERS.index(letter.upper())
    step = octave * 7 + index
    if acc:  # as abc2midi hears it: to the bar's end, for this letter in every octave
        bar_alter[index] = ACCIDENTALS[acc]
    alter = bar_alter.get(index, signature.get(index, 0))
    return _Pitch(step, 12 * (octave + 1) + NATURAL[letter.upper()] + alter)


def _spell(pitch: _Pitch, steps: int, semitones: int, signature, bar_alter) -> str:
    """The note `semitones` above pitch, on the letter `steps` above, with the accidental
    that this bar and key signature need (none where they already give it)."""
    step = pitch.letter + steps
    octave, index = divmod(step, 7)
    natural = 12 * (octave + 1) + NATURAL[LETTERS[index]]
    alter = pitch.midi + semitones - natural
    if abs(alter) > 2:  # only in keyless tunes: choose the nearest letter instead
        step += 1 if alter > 0 else -1
        octave, index = divmod(step, 7)
        natural = 12 * (octave + 1) + NATURAL[LETTERS[index]]
        alter = pitch.midi + semitones - natural
    accidental = ""
    heard = bar_alter.get(index, signature.get(index, 0))            # abc2midi: the letter, every octave
    read = bar_alter.get(("octave", step), signature.get(index, 0))  # the standard: this octave only
    if heard != alter or read != alter:  # written wherever either reading would need it
        accidental = ACCIDENTAL_FOR[alter]
        bar_alter[index] = bar_alter[("octave", step)] = alter
    letter = LETTERS[index] if octave <= 4 else LETTERS[index].lower()
    marks = "," * max(0, 4 - octave) + "'" * max(0, octave - 5)
    return accidental + letter + marks


_CHORD_ROOT = re.compile(r'("\(?)([A-G])([#b]?)([^"/)]*)(?:/([A-Ga-g])([#b]?))?(\)?")')  # as CHORD_SYMBOL reads it


def _transpose_chord_symbol(text: str, semitones: int, sharps: bool) -> str:
    def name(letter: str, acc: str) -> str:
        pc = (NATURAL[letter.upper()] + KEY_ACCIDENTALS[acc] + semitones) % 12  # a bass may be written "G/b"
        names = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"] if sharps else \
            ["C", "Db", "D", "Eb", "E", "F", "Gb", "G", "Ab", "A", "Bb", "B"]
        return names[pc]

    def repl(m: re.Match) -> str:
        bass = "/" + name(m.group(5), m.group(6)) if m.group(5) else ""
        return m.group(1) + name(m.group(2), m.group(3)) + m.group(4) + bass + m.group(7)

    return _CHORD_ROOT.sub(repl, text)


def _steps_without_key(semitones: int) -> int:
    """Letter steps for a keyless tune: the nearest diatonic interval."""
    return round(semitones * 7 / 12)


def _key_field(token: str, kind: str) -> str | None:
    """The value of a K: field, a header line or inline ([K:G]); None for any other token."""
    if kind not in ("field", "inline_field") or token.lstrip("[")[:2] != "K:":
        return None
    return token.lstrip("[")[2:].rstrip("]") if kind == "inline_field" else token[2:]


def _midi_range(abc: str) -> tuple[int, int] | None:
    """Lowest and highest sounding MIDI pitch of a tune, key signature and accidentals applied."""
    signature, bar, pitches = {}, {}, []
    for token, kind in tokenize_abc_kinds(abc):
        value = _key_field(token, kind)
        if value is not None:
            key, bar = parse_key(value), {}
            signature = key.signature() if key else {}
        elif kind == "bar":
            bar = {}
        elif kind in ("note", "grace"):
            pitches += [_note_pitch(*m.groups(), signature, bar).midi for m in PITCH_RE.finditer(token)]
    return (min(pitches), max(pitches)) if pitches else None


def _check_range(abc: str, semitones: int, low: int, high: int) -> None:
    midis = _midi_range(abc)
    if midis and (midis[0] < low or midis[1] > high):
        raise RewriteError(f"a shift of {semitones:+d} puts notes outside MIDI {low}..{high}")


def parse_note_range(text: str) -> tuple[int, int]:
    """The lowest and highest note a transposition may reach: "G,..c'''" -> MIDI (55, 108)."""
    ends = text.split("..")
    notes = [PITCH_RE.fullmatch(end.strip()) for end in ends]
    if len(ends) != 2 or not all(notes):
        raise ValueError(f"wants two ABC notes like G,..c''' (got {text!r})")
    low, high = (_note_pitch(*m.groups(), {}, {}).midi for m in notes)
    return low, high


NOTE_RANGE = "G,..c'''"  # what a transposition may reach by default: a fiddle's lowest G to a flute's top c
LOWEST, HIGHEST = parse_note_range(NOTE_RANGE)  # MIDI 55, 108


@dataclass
class _KeyChange:
    """Where a transposition stands: both keys' signatures, the letter steps between their
    tonics, and the accidentals each bar has set so far, as written and as rewritten."""

    semitones: int
    new_key: Key | None = None
    steps: int = 0
    signature_in: dict = field(default_factory=dict)
    signature_out: dict = field(default_factory=dict)
    bar_in: dict = field(default_factory=dict)
    bar_out: dict = field(default_factory=dict)

    def enter_key(self, value: str) -> str:
        """A K: field: from here on the tune is in this key. Returns the rewritten field."""
        key = parse_key(value)
        if key and _EXPLICIT.search(key.rest):  # its signature is what it lists, which the letters here ignore
            raise RewriteError(f"cannot transpose K:{value.strip()}: its accidentals are written out")
        self.new_key, self.steps = transpose_key(key, self.semitones) if key else (None, _steps_without_key(self.semitones))
        self.signature_in, self.signature_out = (key.signature(), self.new_key.signature()) if key else ({}, {})
        self.bar_in, self.bar_out = {}, {}
        return f"K:{self.new_key.text()}" if self.new_key else f"K:{value}"

    def move(self, token: str, kind: str) -> str:
        """One body token, transposed: notes (grace notes too) and chord symbols move."""
        if kind == "bar":
            self.bar_in, self.bar_out = {}, {}
        elif kind in ("note", "grace"):
            return PITCH_RE.sub(self._move_note, token)
        elif kind == "chord_symbol":
            sharps = (self.new_key.fifths >= 0) if self.new_key else self.semitones >= 0
            return _transpose_chord_symbol(token, self.semitones, sharps)
        return token

    def _move_note(self, m: re.Match) -> str:
        pitch = _note_pitch(*m.groups(), self.signature_in, self.bar_in)
        return _spell(pitch, self.steps, self.semitones, self.signature_out, self.bar_out)


def transpose_tune(abc: str, semitones: int, low: int = LOWEST, high: int = HIGHEST) -> str:
    """Transpose a whole tune chromatically: key, inline keys, notes, chords, chord symbols.

    Notes move to the letters of the new key (C -> D in a whole step), with only the
    accidentals the new key and bar need. Raises RewriteError when a note would leave
    [low, high] (MIDI; default NOTE_RANGE).
    """
    if semitones == 0:
        _check_range(abc, 0, low, high)
        return abc
    change, out, in_body = _KeyChange(semitones), [], False
    for token, kind in tokenize_abc_kinds(abc):
        value = _key_field(token, kind)
        if value is not None:
            text = change.enter_key(value)
            out.append(f"[{text}]" if kind == "inline_field" else text)
            in_body = True
        else:
            out.append(change.move(token, kind) if in_body else token)
    result = "".join(out)
    _check_range(result, semitones, low, high)
    return result


# -----------------------------------------------------------------------------
# lengths and rhythm: every length rewritten, the music kept or scaled as asked

def change_rhythm(abc: str, factor) -> str:
    """Every note and rest length times factor (2, 1/2); M: scales with them so bars stay full.

    M:6/8 becomes M:6/4 for a factor of 2 and M:6/16 for 1/2; M:C and M:C| count as 4/4, 2/2.
    L:, broken rhythm, tuplets, chord symbols and decorations are untouched; a tune without L: gets
    the one it had by default (_with_unit_written).
    Raises RewriteError where the meter cannot scale, or a hornpipe's would leave hornpipe_meter.
    """
    factor = Fraction(factor)
    hornpipe = swung_as_hornpipe(header_field(_header(abc), "R") or "")
    abc = _with_unit_written(abc)

    def fields(token):
        if token is None:
            return factor
        inline = token.startswith("[")
        body = token.strip("[]")
        if not body.startswith("M:"):
            return None
        meter = parse_meter(body[2:])
        if meter is None:
            raise RewriteError(f"cannot scale the meter {body}")
        num, den = meter  # not reduced: 6/8 stays six beats
        # keep the numerator (the beats) and move the denominator where possible
        if (Fraction(den) / factor).denominator == 1:
            den = int(den / factor)
        else:
            num = int(num * factor)
        text = f"M:{num}/{den}"
        if hornpipe and not hornpipe_meter(text[2:]):
            raise RewriteError(f"abc2midi plays R:hornpipe only in 2/4 and 4/4, not {text}")
        return (f"[{text}]" if inline else text), factor

    return _rewrite_lengths(abc, fields)


def _header(abc: str) -> str:
    """The lines before K: (an L: or M: line in the body changes them from there on)."""
    return re.split(r"(?m)^K:", abc, maxsplit=1)[0]


def _with_unit_written(abc: str) -> str:
    """The tune with an L: line: a header without one gets the unit it had by default, which a new
    meter would otherwise change (M:6/8's is 1/8, M:6/16's 1/16)."""
    head = _header(abc)
    if re.search(r"(?m)^L:", head):
        return abc
    return re.sub(r"(?m)^(K:)", f"L:{default_unit(header_field(head, 'M'))}\n\\1", abc, count=1)


def set_unit_length(abc: str, unit: str) -> str:
    """Rewrite L: and every length, grace notes' too, so that the music is identical: L:1/8 A2 ==
    L:1/16 A4 (abc2midi plays rolls and trills as runs in fractions of L, which no rewrite keeps)."""
    target = Fraction(unit)

    def fields(token):  # the header has an L: line (_with_unit_written), met before the body's lengths
        body = token.strip("[]") if token is not None else ""
        if not body.startswith("L:"):
            return None
        text = f"L:{unit}"
        return (f"[{text}]" if token.startswith("[") else text), Fraction(body[2:].strip()) / target

    return _rewrite_lengths(_with_unit_written(abc), fields)
