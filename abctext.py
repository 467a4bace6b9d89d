"""
abctext: the torch-free half of musicrnn.

Everything that turns ABC text into token ids and back, and everything that picks
the next token, lives here: the lossless ABC tokenizer, the vocabulary, and the
sampler. It imports only numpy and the standard library, so that

    musicrnn.py   (training, evaluation, generation with torch) and
    infer_onnx.py (generation with onnxruntime, no torch)

share one implementation of each idea instead of two copies that drift apart.
"""

from __future__ import annotations

import argparse
import bisect
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

# -----------------------------------------------------------------------------
# the lossless ABC tokenizer

# Note lengths: "2", "3/2", "/", "//", "/2", "3/". Always optional.
_LENGTH = r"\d*(?:/+\d*)?"
_NOTE = r"(?:\^\^|\^|__|_|=)?[A-Ga-g][,']*" + _LENGTH   # ^c'3/2
_REST = r"[zx]" + _LENGTH + r"|Z\d*"                      # z2, x/2, Z4 (whole bars)

# One alternative per kind of token, most specific first. The last one, a single
# character, makes the tokenizer total: every string splits into tokens that join
# back to it exactly ("".join(tokenize_abc(t)) == t).
_TOKEN_PATTERNS = [
    ("field", r"(?m:^[H-Zh-w]:[^\n]*)"),                 # a whole header line: K:Dmix (not A-G: notes)
    ("inline_field", r"\[[A-Za-z]:[^\]\n]*\]"),          # [K:G] [M:3/4]
    ("ending", r"\[\d+(?:[,-]\d+)*"),                     # [1 [2
    ("bar", r"(?::*\[?\|[\]|]?:*|::+)(?:\d+(?:[,-]\d+)*)?"),  # | || |: :| :: |] [| :|2 |1
    ("note", _NOTE),
    ("rest", _REST),
    ("tuplet", r"\(\d+(?::\d*){0,2}"),                    # (3 (3:2:3
    ("broken", r">+|<+"),                                 # A>B  A<<B
    ("chord_open", r"\[(?=[\^_=A-Ga-g])"),                # [CEG]
    ("chord_close", r"\]" + _LENGTH),                     # ]2
    ("chord_symbol", r'"[^"\n]*"'),                       # "Am" "G/B"
    ("decoration", r"![^!\n]*!|\+[^+\n]*\+"),             # !trill! +fermata+
    ("grace", r"\{[^}\n]*\}"),                             # {ag}
    ("char", r"[\s\S]"),                                  # anything else, one character
]
_TOKEN_RE = re.compile("|".join(f"(?P<{name}>{pattern})" for name, pattern in _TOKEN_PATTERNS))


def tokenize_abc(text: str) -> list[str]:
    """Split ABC text into musical tokens; "".join(tokenize_abc(t)) == t always."""
    return [m.group() for m in _TOKEN_RE.finditer(text)]


def tokenize_abc_kinds(text: str) -> list[tuple[str, str]]:
    """(token, kind) pairs; the kind comes from context ("[" opens a chord only before a note)."""
    return [(m.group(), m.lastgroup) for m in _TOKEN_RE.finditer(text)]


def tokenize_chars(text: str) -> list[str]:
    """The report's tokenizer: one token per character."""
    return list(text)


TOKENIZERS = {"abc": tokenize_abc, "char": tokenize_chars}

# -----------------------------------------------------------------------------
# the vocabulary

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
SPECIALS = [PAD, EOS, UNK]  # ids 0, 1, 2. <eos> also starts a tune, as in GPT-2.


@dataclass
class Vocabulary:
    """Token strings <-> ids.

    With the "abc" tokenizer the vocabulary holds the frequent whole tokens AND every
    single character seen in training. A token that is not in it (a key "K:F#dor" or a
    chord symbol "Em7" that training never saw whole) is encoded as its characters, so
    the model still reads it from its parts instead of seeing <unk>. Only a character
    that never appeared in training becomes <unk>.
    """

    kind: str                                   # "abc" or "char": which tokenizer
    tokens: list[str]                           # id -> token; the first three are SPECIALS
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self):
        if self.kind not in TOKENIZERS:
            raise ValueError(f"unknown tokenizer kind {self.kind!r}")
        if self.tokens[: len(SPECIALS)] != SPECIALS:
            raise ValueError("vocabulary must start with " + ", ".join(SPECIALS))
        self.index = {t: i for i, t in enumerate(self.tokens)}

    @classmethod
    def build(cls, texts: list[str], kind: str, min_count: int = 3) -> "Vocabulary":
        """Sorted specials + single characters + (abc) whole tokens seen >= min_count times."""
        counts = Counter(tok for text in texts for tok in TOKENIZERS[kind](text))
        chars = {ch for text in texts for ch in text}
        whole = {tok for tok, n in counts.items() if n >= min_count and len(tok) > 1}
        return cls(kind, SPECIALS + sorted(chars | whole))

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def pad_id(self) -> int:
        return self.index[PAD]

    @property
    def eos_id(self) -> int:
        return self.index[EOS]

    @property
    def unk_id(self) -> int:
        return self.index[UNK]

    def encode(self, text: str) -> list[int]:
        """Text -> ids. Unseen whole tokens fall back to their characters; unseen characters to <unk>."""
        ids = []
        for tok in TOKENIZERS[self.kind](text):
            if tok in self.index:
                ids.append(self.index[tok])
            else:
                ids.extend(self.index.get(ch, self.unk_id) for ch in tok)
        return ids

    def decode(self, ids) -> str:
        """Ids -> text, without the special tokens."""
        return "".join(self.tokens[i] for i in ids if i >= len(SPECIALS))

    def unknown_chars(self, text: str) -> list[str]:
        """The characters of text that this vocabulary cannot represent, sorted."""
        return sorted({ch for ch in text if ch not in self.index})

    def to_dict(self) -> dict:
        return {"kind": self.kind, "tokens": list(self.tokens)}

    @classmethod
    def from_dict(cls, d: dict) -> "Vocabulary":
        return cls(d["kind"], list(d["tokens"]))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "Vocabulary":
        return cls.from_dict(json.loads(text))


class PromptError(ValueError):
    """A prompt that the model cannot read."""


def header_prompt(meter: str | None = None, key: str | None = None, prompt: str | None = None) -> str:
    """The text a tune starts from: a free prompt, or a header primed with meter and key."""
    if prompt is not None:
        return prompt
    if meter is None and key is None:
        return ""
    lines = ["X:1", "L:1/8"]
    if meter is not None:
        lines.append(f"M:{meter}")
    lines.append(f"K:{key if key is not None else 'D'}")
    return "\n".join(lines) + "\n"


def encode_prompt(vocab: Vocabulary, text: str) -> list[int]:
    """<eos> (the start symbol) + the prompt's ids; refuses symbols the model never saw."""
    unknown = vocab.unknown_chars(text)
    if unknown:
        raise PromptError("the prompt has symbols the model never saw: " + " ".join(repr(c) for c in unknown))
    return [vocab.eos_id] + vocab.encode(text)


# -----------------------------------------------------------------------------
# sampling


def sample_next(logits: np.ndarray, rng: np.random.Generator, temperature: float = 1.0,
                top_k: int | None = None) -> np.ndarray:
    """Draw one token id per row from logits (B, V) -> (B,).

    Inverse-CDF sampling with one uniform draw per row, so the same seed gives the
    same tokens from torch and from onnxruntime whenever their logits agree.
    """
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    z = logits.astype(np.float64) / temperature                       # (B, V)
    if top_k is not None and 0 < top_k < z.shape[1]:
        kth = np.partition(z, -top_k, axis=1)[:, -top_k][:, None]     # (B, 1)
        z = np.where(z < kth, -np.inf, z)
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)                                                     # (B, V)
    cdf = np.cumsum(p, axis=1)                                        # (B, V)
    u = rng.random(len(z))[:, None] * cdf[:, -1:]                     # (B, 1)
    return np.minimum((cdf <= u).sum(axis=1), z.shape[1] - 1)         # (B,)


def generate_ids(step, vocab: Vocabulary, prompt_ids: list[int], num: int, max_tokens: int,
                 rng: np.random.Generator, temperature: float = 1.0, top_k: int | None = None,
                 constraint: "AbcConstraint | None" = None) -> list[list[int]]:
    """Autoregressive generation of `num` tunes as one batch, carrying the LSTM state.

    step(tokens (B, 1) int64, state) -> (logits (B, V) float32 numpy, state) is the model:
    torch in musicrnn.py, onnxruntime in infer_onnx.py. state=None means zeros. The
    prompt is fed one token at a time too, so both back ends run the same code path.
    Rows stop independently at <eos>. With a constraint, illegal tokens get -inf first.
    """
    state = None
    for tok in prompt_ids[:-1]:
        _, state = step(np.full((num, 1), tok, dtype=np.int64), state)
    tunes = [constraint.start(vocab.decode(prompt_ids)) for _ in range(num)] if constraint else []
    tokens = np.full(num, prompt_ids[-1], dtype=np.int64)             # (B,)
    out = [[] for _ in range(num)]
    done = np.zeros(num, dtype=bool)
    for t in range(max_tokens):
        logits, state = step(tokens[:, None], state)                  # (B, V)
        if constraint:
            for row, tune in zip(logits, tunes):                      # (V,) each, masked in place
                if not tune.ended:
                    row += constraint.penalty(tune, max_tokens - t)  # -inf where illegal
        tokens = sample_next(logits, rng, temperature, top_k)         # (B,)
        for b in np.flatnonzero(~done):
            if tokens[b] == vocab.eos_id:
                done[b] = True
            else:
                out[b].append(int(tokens[b]))
            if constraint:
                constraint.advance(tunes[b], int(tokens[b]))
        if done.all():
            break
    return out


def generate_tunes(step, vocab: Vocabulary, num: int = 1, prompt: str = "", max_tokens: int = 1000,
                   temperature: float = 1.0, top_k: int | None = None, seed: int = 0,
                   constrained: bool = False, max_bars: int = 32) -> list[str]:
    """num tunes, each the prompt followed by what the model writes until <eos>: the one
    generation function behind musicrnn.generate (torch) and infer_onnx.generate (onnxruntime)."""
    prompt_ids = encode_prompt(vocab, prompt)
    constraint = AbcConstraint(vocab, max_bars) if constrained else None
    ids = generate_ids(step, vocab, prompt_ids, num, max_tokens, np.random.default_rng(seed), temperature, top_k,
                       constraint)
    return [prompt + vocab.decode(row) for row in ids]


def tunebook(bodies: list[str]) -> str:
    """Number the tunes X:1..X:N, one blank line between them."""
    tunes = []
    for n, text in enumerate(bodies, start=1):
        text = re.sub(r"\AX:[^\n]*\n?", "", text)  # the model writes its own X:1
        tunes.append(f"X:{n}\n{text.rstrip()}\n")
    return "\n".join(tunes)


# -----------------------------------------------------------------------------
# constrained sampling: mask every token that would break the tune
#
# An automaton follows the ABC being written and gives -inf to every token that would
# make the tune invalid: a note that overflows the bar, a bar line before the bar is
# full, an unclosed chord, an <eos> in mid-section. It reads characters, so it serves
# both vocabularies: a character model writes a token over several steps (the token
# not yet finished is `pending`), an ABC-token model in one. A mask depends only on a
# small state, so masks are cached and most steps cost a dictionary look-up.

TICKS = 48            # ticks per unit note length L: L/4 and triplets of it are whole numbers
GRANULE = TICKS // 4  # every duration is a multiple of L/4, so any bar can be filled exactly
LENGTH_TICKS = {"": 48, "2": 96, "3": 144, "4": 192, "6": 288, "8": 384, "/": 24, "/2": 24,
                "//": 12, "/4": 12, "3/": 72, "3/2": 72}

(NOTE, REST, BAR, TUPLET, BROKEN, CHORD_OPEN, CHORD_CLOSE, GRACE_OPEN, GRACE_CLOSE,
 TIE, DECORATION, SPACE, NEWLINE) = range(13)

SECTION_ENDS = (":|", "||", "|]")
MIN_NOTES = 16  # a tune ends only after 4 full bars and this many notes
BAR_LINES = ("|", "||", "|]", "|:", ":|", "::", "|1", ":|2")
# no fermata (H, !fermata!): abc2midi lengthens the note, which breaks the bar and broken rhythm;
DECORATIONS = ("~", "T", "u", "v", "!trill!", "!accent!")  # no staccato either: abc2midi shortens the note
HEADER_LINES = [  # the header the constraint writes: X, L, M, K in this order
    ["X:1"],
    ["L:1/8", "L:1/16", "L:1/4"],
    ["M:" + m for m in ("2/4", "3/4", "4/4", "6/8", "9/8", "12/8", "3/8", "2/2", "C", "C|", "3/2", "6/4")],
    ["K:" + root + mode for root in ("C", "D", "E", "F", "G", "A", "B", "Bb", "Eb", "Ab", "F#", "C#")
     for mode in ("", "m", "min", "maj", "dor", "mix", "Dor", "Mix", "aeo", "phr", "lyd")],
]
HEADER_ORDER = "XLMK"


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


def parse_meter(value: str) -> tuple[int, int] | None:
    """M: value -> (beats, beat unit), not reduced (6/8 stays 6, 8); M:C = 4/4, M:C| = 2/2.
    None for M:none and anything else without a numeric meter."""
    value = {"C": "4/4", "C|": "2/2"}.get(value.strip(), value.strip())
    m = re.fullmatch(r"(\d+)/(\d+)", value)
    return (int(m.group(1)), int(m.group(2))) if m and int(m.group(1)) and int(m.group(2)) else None


def bar_ticks(meter: str, unit: str | None) -> int:
    """Ticks in a full bar: the meter in units of L (L defaults as ABC says)."""
    parsed = parse_meter(meter)
    if parsed is None:
        raise PromptError(f"--constrained needs a meter like M:6/8, M:C or M:C|, not M:{meter.strip()}")
    bar = Fraction(*parsed)
    unit = unit.strip() if unit else ("1/16" if bar < Fraction(3, 4) else "1/8")
    u = re.fullmatch(r"1/(\d+)", unit)
    ticks = bar * int(u.group(1)) * TICKS if u else Fraction(1, 3)
    if ticks.denominator != 1 or ticks % GRANULE:
        raise PromptError(f"--constrained cannot fill bars of M:{meter} with L:{unit}")
    return int(ticks)


class _PrefixTable:
    """Sorted strings; the strings under a prefix are one contiguous range, so "is any
    legal string under prefix+c" is a difference of prefix sums."""

    def __init__(self, strings, char_ids: dict[str, int]):
        self.strings = sorted(s for s in set(strings) if all(ch in char_ids for ch in s))
        self.index = {s: i for i, s in enumerate(self.strings)}
        self.prefixes = {s[:k] for s in self.strings for k in range(len(s) + 1)}
        self.char_ids = char_ids
        self._children: dict[str, tuple] = {}

    def children(self, prefix: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(vocabulary ids of the chars c that extend prefix, range starts, range ends)."""
        if prefix not in self._children:
            chars = sorted({s[len(prefix)] for s in self.strings if len(s) > len(prefix) and s.startswith(prefix)})
            lo = [bisect.bisect_left(self.strings, prefix + c) for c in chars]
            hi = [bisect.bisect_left(self.strings, prefix + c + "\U0010ffff") for c in chars]
            self._children[prefix] = (np.array([self.char_ids[c] for c in chars], dtype=np.int64),
                                      np.array(lo, dtype=np.int64), np.array(hi, dtype=np.int64))
        return self._children[prefix]


_NOTE_PITCH = re.compile(r"\A(?:\^\^|\^|__|_|=)?([A-Ga-g])")
_NOTE_LENGTH = re.compile(r"[\d/]+\Z")


def pitch_spelling(note: str) -> str:
    """A note token without its length: "^c'3/2" -> "^c'"."""
    return _NOTE_LENGTH.sub("", note)


def _pitch_shape(m: re.Match) -> str:
    return "C" if m.group(1).isupper() else "c"  # octave marks and lengths follow alike


@functools.lru_cache(maxsize=4096)  # called once per sampled token; the pending texts are few
def note_shape(pending: str) -> str:
    """A pending token with its note's pitch replaced by its register: "^f2" -> "c2"."""
    return _NOTE_PITCH.sub(_pitch_shape, pending)


@dataclass
class TuneState:
    """Where the automaton stands in one tune."""

    phase: int = 0                 # 0..3: the header line being written (X, L, M, K); 4: the body
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
    tuplet_left: int = 0           # notes still to come in a (3
    tuplet_len: int = 0            # their length, set by the first
    broken_len: int = 0            # after > or <: the partner note has this length
    chord: int = 0                 # notes in an open [chord] (-1: just opened)
    chord_len: int = 0             # their length, set by the first
    grace: int = 0                 # notes in an open {grace group} (-1: just opened)
    last_pitch: int = -1           # pitch id of the last plain note
    tie_pitch: int = -1            # after a tie -: the next note must have this pitch (-1: no tie)
    short_next: int = 0            # after a short :|, the next bar is a pickup of this many ticks
    line_letter: bool = False      # the line so far is one bare letter: "A:|" would read as a field "A:"
    need_note: bool = False        # after a decoration or a grace group
    final: bool = False            # a short last bar was closed: only the end may follow
    ended: bool = False            # <eos> was written
    must_end: bool = False         # the last mask asked the tune to end (bar cap or token budget)

    def state_key(self, must_end: bool) -> tuple:
        """What the legal tokens of the committed state depend on, and no more, so that
        they can be cached and shared: the last pitch counts only by whether there is one,
        except in a tie, where it decides; bars and notes only as far as the end rule needs
        (4 and 16; one commit adds at most one)."""
        tie = self.tie_pitch >= 0
        return (self.phase, self.full, self.bar, self.first_bar, self.pickup, self.section_ends > 0,
                self.repeat_open, self.ending, self.last, self.last_bar in SECTION_ENDS, self.last_note,
                self.tuplet_left, self.tuplet_len, self.broken_len, self.chord, self.chord_len, self.grace,
                (self.last_pitch, self.tie_pitch) if tie else self.last_pitch >= 0, self.short_next,
                self.line_letter, self.need_note, self.final, min(max(self.full_bars, 2), 4),
                min(max(self.notes, MIN_NOTES - 2), MIN_NOTES), must_end)

    def key(self, must_end: bool) -> tuple:
        """state_key and the token being written, a note by its shape ("^f2" as "c2")."""
        exact = self.tie_pitch >= 0 or self.pending == "-" or self.phase < 4
        pending = self.pending if exact else note_shape(self.pending)
        return self.state_key(must_end) + (pending, self.pending_must_end,
                                           self.last_pitch if self.pending == "-" else None)

    def can_end(self) -> bool:
        return (self.phase == 4 and self.last_bar in SECTION_ENDS and self.last in (BAR, NEWLINE) and self.bar == 0
                and self.full_bars >= 4 and self.notes >= MIN_NOTES and self.ending != 1 and not self.repeat_open
                and self.tie_pitch < 0)


class AbcConstraint:
    """Masks a vocabulary's tokens so that a sampled tune is valid ABC whose bars are full.

    start(prompt) -> TuneState; mask(state, tokens_left) -> (V,) bool; advance(state, id).
    """

    END_RESERVE = 120  # tokens kept to finish the bar and close the tune

    def __init__(self, vocab: Vocabulary, max_bars: int = 32):
        self.vocab, self.max_bars = vocab, max_bars
        char_ids = {t: i for i, t in enumerate(vocab.tokens) if len(t) == 1 and i >= len(SPECIALS)}
        missing = sorted(set("|\nXLMK:1/8CDEFGABcdefgab") - set(char_ids))
        if missing:
            raise PromptError("--constrained: the model's vocabulary lacks " + " ".join(map(repr, missing)))
        self.char_ids = char_ids
        info = body_tokens()
        self.body = _PrefixTable(info, char_ids)  # only what this vocabulary can spell
        self.headers = [_PrefixTable(lines, char_ids) for lines in HEADER_LINES]
        if not all(table.strings for table in self.headers):
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
        self.whole_header = [np.isin(whole, lines) for lines in HEADER_LINES]
        self.cache: dict[tuple, np.ndarray] = {}

    # --- state ------------------------------------------------------------------

    def start(self, prompt: str) -> TuneState:
        """The state after the prompt; refuses a prompt that the constraints would not allow."""
        state = TuneState()
        for i, ch in enumerate(prompt):
            if ch not in self.char_ids:
                raise PromptError(f"--constrained: the prompt has {ch!r}, which the model cannot write")
            if state.phase < 4:
                self._advance_header(state, ch)
            elif not self.mask(state, 10**6)[self.char_ids[ch]]:
                raise PromptError(f"--constrained: the prompt breaks the constraints at {prompt[:i + 1]!r}")
            else:
                self.advance(state, self.char_ids[ch])
        if state.phase < 4 and state.pending and state.pending not in self.headers[state.phase].prefixes:
            raise PromptError(f"--constrained: the prompt ends inside a header line it cannot complete: "
                              f"{state.pending!r} (end the line, or give X:, L:, M:, K: in order)")
        return state

    def advance(self, state: TuneState, token_id: int) -> None:
        if token_id == self.vocab.eos_id:
            state.ended = True
            return
        token = self.vocab.tokens[token_id]
        if state.phase < 4:
            self._advance_header(state, token)
        elif len(token) == 1 and state.pending + token in self.body.prefixes:
            state.pending += token
        else:
            if state.pending:
                self._commit(state, state.pending)
            state.pending, state.pending_must_end = token, state.must_end

    def _advance_header(self, state: TuneState, text: str) -> None:
        for ch in text:
            if ch != "\n":
                state.pending += ch
                continue
            line, state.pending = state.pending, ""
            letter, value = line[:1], line[2:]
            if line[1:2] != ":" or letter not in HEADER_ORDER or HEADER_ORDER.index(letter) < state.phase:
                raise PromptError(f"--constrained: the header must be X:, L:, M:, K: in order, not {line!r}")
            if letter == "L":
                state.unit = value
            elif letter == "M":
                state.meter = value
            state.phase = HEADER_ORDER.index(letter) + 1
            if letter == "K":
                if state.meter is None:
                    raise PromptError("--constrained: the header needs an M: line before K:")
                state.full = bar_ticks(state.meter, state.unit)

    def _commit(self, s: TuneState, text: str) -> None:
        kind, ticks = self.info[text]
        if kind in (NOTE, REST):
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
                s.tuplet_len = s.tuplet_len if s.tuplet_left else 0
                s.last_note = 0
            else:
                s.bar += ticks
                # no broken rhythm after a rest, a partner, a decorated or a tied note (abc2midi
                # fails on ~A>B and miscounts A-A>B)
                tied = s.tie_pitch >= 0
                s.last_note = 0 if (s.broken_len or kind == REST or s.need_note or tied) else ticks
                s.broken_len = 0
            # a note may start a tie unless it ends one (abc2midi miscounts A-A-A)
            outside = not (s.grace or s.chord)
            plain = kind == NOTE and outside and s.tie_pitch < 0
            s.last_pitch = int(self.pitch[self.at[text]]) if plain else -1
            s.tie_pitch = -1 if outside else s.tie_pitch
            s.notes += kind == NOTE and not (s.grace or s.chord)
            s.need_note = False
        elif kind == CHORD_OPEN:
            s.chord, s.chord_len, s.need_note = -1, 0, False
        elif kind == CHORD_CLOSE:
            s.bar += s.chord_len * ticks // TICKS  # a chord lasts as long as its first note
            s.notes += 1
            s.chord, s.chord_len, s.last_note = 0, 0, 0
        elif kind == GRACE_OPEN:
            s.grace, s.need_note = -1, False
        elif kind == GRACE_CLOSE:
            s.grace, s.need_note = 0, True
        elif kind == TUPLET:
            s.tuplet_left, s.tuplet_len = 3, 0
        elif kind == BROKEN:
            s.broken_len, s.last_note = s.last_note, 0  # A>B with equal lengths fills 2 x A
        elif kind == TIE:
            s.tie_pitch = s.last_pitch  # the tied note must sound the same pitch
        elif kind == DECORATION:
            s.need_note = True
        elif kind == BAR:
            self._commit_bar(s, text)
        s.line_letter = s.last in (NEWLINE, -1) and len(text) == 1 and text.isalpha()
        s.last = kind

    def _commit_bar(self, s: TuneState, bar: str) -> None:
        if s.bar == 0:
            pass  # |: before any note
        elif s.short_next:
            s.short_next = 0
        elif s.bar == s.full:
            s.full_bars += 1
        elif s.first_bar:
            s.pickup = s.bar
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
        s.bar, s.first_bar, s.last_bar, s.last_note = 0, False, bar, 0

    # --- masks ------------------------------------------------------------------

    def mask(self, state: TuneState, tokens_left: int) -> np.ndarray:
        """(V,) bool: the tokens that keep this tune valid."""
        return self._masks(state, tokens_left)[0]

    def penalty(self, state: TuneState, tokens_left: int) -> np.ndarray:
        """(V,) float32: 0 for the legal tokens, -inf for the others; added to the logits,
        one vector add, cheaper per step than indexing them with the mask."""
        return self._masks(state, tokens_left)[1]

    def _masks(self, state: TuneState, tokens_left: int) -> tuple[np.ndarray, np.ndarray]:
        must_end = state.full_bars >= self.max_bars or tokens_left < self.END_RESERVE
        state.must_end = must_end
        key = state.key(must_end)
        masks = self.cache.get(key)
        if masks is None:
            mask = self._header_mask(state) if state.phase < 4 else self._body_mask(state, must_end)
            if len(self.cache) > 200_000:
                self.cache.clear()
            masks = self.cache[key] = mask, np.where(mask, 0.0, -np.inf).astype(np.float32)
        return masks

    def _header_mask(self, s: TuneState) -> np.ndarray:
        mask = np.zeros(len(self.vocab), dtype=bool)
        table = self.headers[s.phase]
        mask[table.children(s.pending)[0]] = True
        if s.pending in table.index:
            mask[self.char_ids["\n"]] = True
        if not s.pending:
            mask[self.whole_ids[self.whole_header[s.phase]]] = True
        return mask

    def _body_mask(self, s: TuneState, must_end: bool) -> np.ndarray:
        # a token already begun finishes under the rules it began under
        legal, counts = self._legal_counts(s, s.pending_must_end)    # (N,), (N + 1,)
        ids, lo, hi = self.body.children(s.pending)
        mask = np.zeros(len(self.vocab), dtype=bool)
        mask[ids] = counts[hi] > counts[lo]                           # the pending token grows
        if s.pending and not (s.pending in self.at and legal[self.at[s.pending]]):
            return mask
        after = s
        if s.pending:                                                 # or it is finished ...
            after = _copy(s)
            self._commit(after, s.pending)
            after.pending, after.pending_must_end = "", False
        starts, can_end = self._starts(after, must_end)               # ... and a new one starts
        if can_end and must_end:  # time to stop: nothing else
            mask[:] = False
        else:
            mask |= starts & ~self._extending(s.pending)
        mask[self.vocab.eos_id] = can_end
        return mask

    def _legal_counts(self, s: TuneState, must_end: bool) -> tuple[np.ndarray, np.ndarray]:
        key = ("legal",) + s.state_key(must_end)
        if key not in self.cache:
            legal = self._legal(s, must_end)
            self.cache[key] = legal, np.concatenate(([0], np.cumsum(legal)))
        return self.cache[key]

    def _starts(self, s: TuneState, must_end: bool) -> tuple[np.ndarray, bool]:
        """(V,) the tokens that may begin now, and whether the tune may end here."""
        key = ("starts",) + s.state_key(must_end)
        if key not in self.cache:
            legal, counts = self._legal_counts(s, must_end)
            starts = np.zeros(len(self.vocab), dtype=bool)
            ids, lo, hi = self.body.children("")
            starts[ids] = counts[hi] > counts[lo]
            whole = self.whole_body >= 0
            whole[whole] = legal[self.whole_body[whole]]
            starts[self.whole_ids[whole]] = True
            self.cache[key] = starts, s.can_end()
        return self.cache[key]

    def _extending(self, pending: str) -> np.ndarray:
        """(V,) the tokens whose first character would extend the pending one: never a new start."""
        key = ("extending", pending)
        if key not in self.cache:
            extends = np.zeros(len(self.vocab) + 1, dtype=bool)       # (V + 1,) index -1: no character
            if pending:
                extends[self.body.children(pending)[0]] = True
            tokens = extends[:-1].copy()
            tokens[self.whole_ids] = extends[self.whole_first]
            self.cache[key] = tokens
        return self.cache[key]

    def _legal(self, s: TuneState, must_end: bool) -> np.ndarray:
        """(N,) bool over the body tokens: which may be committed next."""
        legal = np.zeros(len(self.kind), dtype=bool)
        rem = self._bar_target(s, must_end) - s.bar

        def put(text: str, value: bool) -> None:  # a token this vocabulary cannot spell stays illegal
            if text in self.at:
                legal[self.at[text]] = value

        if s.final:
            put("\n", s.last != NEWLINE)
            return legal
        if s.grace:
            legal |= self.is_note & (self.ticks == TICKS) & (s.grace < 4)
            put("}", s.grace > 0)
            return legal
        if s.chord:
            if max(s.chord, 0) < 4:
                legal |= self.is_note & ((self.ticks == s.chord_len) if s.chord_len
                                         else (self.ticks <= rem) & self.fits_granule)
            if s.chord > 0:
                # abc2midi takes an outer length ([CE]2) instead of the inner one, the standard
                # multiplies them: allow an outer length only on plain inner notes, where both agree
                length = s.chord_len * self.ticks
                outer_ok = (self.ticks == TICKS) | (s.chord_len == TICKS)
                legal |= (self.kind == CHORD_CLOSE) & outer_ok & (length % (TICKS * GRANULE) == 0) \
                    & (length <= rem * TICKS)
            return legal
        if s.broken_len:
            return self.is_note & (self.ticks == s.broken_len)
        if s.tuplet_left:
            fits = (self.ticks == s.tuplet_len) if s.tuplet_len else (2 * self.ticks <= rem) & self.fits_granule
            return (self.is_note | self.is_rest) & fits
        fits = (self.ticks <= rem) & self.fits_granule
        if s.short_next and s.bar == 0 and not s.repeat_open:
            put("|:", True)  # the next section opens its repeat before its pickup
            put("\n", s.last != NEWLINE)
            return legal
        if must_end and rem >= TICKS:  # finish the bar in few tokens: no ornaments, notes of L or longer
            fits &= self.ticks >= TICKS
        if s.tie_pitch >= 0:  # A2-A: the same pitch, within the bar
            return self.is_note & fits & (self.pitch == s.tie_pitch)
        if s.need_note:
            legal |= self.is_note & fits
            put("[", rem >= GRANULE and s.last != DECORATION)  # abc2midi: no rolls or trills on chords
            return legal
        legal |= (self.is_note | self.is_rest) & fits
        if rem >= GRANULE and not must_end:
            for text in ("[", "{") + DECORATIONS:
                put(text, True)
        put("(3", rem >= 2 * GRANULE and not must_end)
        if s.last == NOTE and s.last_note and not must_end:
            put(">", rem >= s.last_note)  # room for the partner note, of the same length
            put("<", rem >= s.last_note)
        put("-", s.last == NOTE and s.last_pitch >= 0 and rem > 0)
        put(" ", s.last not in (-1, SPACE, NEWLINE))
        put("\n", s.last not in (-1, SPACE, NEWLINE))
        for bar in self._bar_lines(s, must_end):
            put(bar, not (s.line_letter and bar.startswith(":")))
        return legal

    @staticmethod
    def _bar_target(s: TuneState, must_end: bool) -> int:
        """Ticks the current bar must reach: a full bar, a pickup, or (ending a tune that
        has a pickup) the short bar that completes it."""
        if s.short_next:
            return s.short_next
        inside = s.chord or s.grace or s.tuplet_left or s.broken_len or s.tie_pitch >= 0 or s.need_note
        if must_end and s.pickup and s.bar <= s.full - s.pickup and not inside:
            return s.full - s.pickup  # (not in mid-chord: what was begun under the old target finishes)
        return s.full

    @staticmethod
    def _bar_lines(s: TuneState, must_end: bool) -> list[str]:
        """The bar lines allowed now. abc2midi's reading decides the form, measured: a tune
        with a pickup is only clean if every section ends on the short bar that completes
        the pickup (with :| then |: and the pickup again, or |] at the very end)."""
        if s.bar == 0:  # a repeat may open the tune or follow a section's end, before any note
            start = s.first_bar or s.last_bar in SECTION_ENDS
            return ["|:"] if start and not s.repeat_open and (not must_end or s.short_next) else []
        if s.short_next:  # the pickup that completes the previous section's short bar
            return ["|"] if s.bar == s.short_next else []
        if s.first_bar and s.bar < s.full:  # the tune's pickup
            return ["|"]
        full = s.bar == s.full
        bars = ["|"] if full and not (must_end and s.full_bars >= 4 and not s.pickup) else []
        if s.pickup:
            if s.bar == s.full - s.pickup:
                bars.append(":|")
                if not s.repeat_open and s.full_bars >= 4:
                    bars += ["||", "|]"]  # the end of the tune
            return bars
        if full:
            if not s.repeat_open and not s.ending and not must_end:
                bars.append("|:")
            if s.ending == 0 and (s.repeat_open or not s.section_ends):
                bars.append(":|")
                if not must_end:
                    bars += ["::", "|1"]
            if s.ending == 1:
                bars.append(":|2")
            if not s.repeat_open and s.ending != 1:
                bars += ["||", "|]"]
        return bars


def _copy(state: TuneState) -> TuneState:
    return TuneState(**vars(state))


# -----------------------------------------------------------------------------
# the command line that musicrnn.py generate and infer_onnx.py share


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """The sampling flags, identical in musicrnn.py generate and infer_onnx.py."""
    group = parser.add_argument_group("sampling")
    group.add_argument("--num", type=positive_int, default=1, help="tunes to write, as one batch (default 1)")
    group.add_argument("--temperature", type=positive_float, default=1.0, help="> 0; lower is safer (default 1.0)")
    group.add_argument("--top-k", type=positive_int, default=None, help="sample from the k most likely tokens only")
    group.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    group.add_argument("--max-tokens", type=positive_int, default=1000, help="tokens per tune at most (default 1000)")
    group.add_argument("--constrained", action="store_true",
                       help="mask tokens that would break the tune: valid ABC, full bars, a clean end")
    group.add_argument("--max-bars", type=positive_int, default=32,
                       help="with --constrained: end the tune cleanly after this many bars (default 32)")
    start = parser.add_argument_group("start of the tune")
    start.add_argument("--meter", help='prime the header with this meter, e.g. "6/8"')
    start.add_argument("--key", help='prime the header with this key, e.g. "D" or "Ador"')
    start.add_argument("--prompt", help="start from this ABC text instead of --meter/--key")
    output = parser.add_argument_group("output")
    output.add_argument("--out", help="also write the tunebook to this .abc file")
    output.add_argument("--render", action="store_true",
                        help="with --out: also write MIDI (abc2midi) and SVG scores (abcm2ps) beside it")


def start_text(args: argparse.Namespace) -> str:
    """The prompt that the sampling flags ask for."""
    if args.prompt is not None and (args.meter or args.key):
        raise PromptError("--prompt cannot be combined with --meter or --key")
    return header_prompt(args.meter, args.key, args.prompt)


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside path, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_tunebook(text: str, out: str | None, render: bool = False) -> None:
    print(text)
    if out:
        write_atomic(Path(out), text.encode("utf-8"))
        if render:
            for line in render_tunebook(Path(out)):
                print(line, file=sys.stderr)


def render_tunebook(path: Path) -> list[str]:
    """MIDI files (abc2midi) and SVG scores (abcm2ps -g, in its secure mode -S) beside a
    tunebook, where the tools are installed. Returns one line per tool to show the user."""
    folder, name, stem = path.parent, path.name, path.stem
    lines = []
    if shutil.which("abc2midi"):
        subprocess.run(["abc2midi", name], cwd=folder, capture_output=True, timeout=300)
        lines.append(f"MIDI: {len(list(folder.glob(stem + '*.mid')))} files {folder / stem}N.mid")
    else:
        lines.append("no MIDI written: abc2midi is not installed (apt-get install abcmidi)")
    if shutil.which("abcm2ps"):
        subprocess.run(["abcm2ps", "-S", "-g", name, "-O", stem + ".svg"], cwd=folder, capture_output=True, timeout=300)
        lines.append(f"SVG: {len(list(folder.glob(stem + '[0-9][0-9][0-9].svg')))} scores {folder / stem}NNN.svg")
    else:
        lines.append("no SVG written: abcm2ps is not installed (apt-get install abcm2ps)")
    return lines
