"""
abc_tokens: ABC text <-> token ids, torch-free.

Holds:
- PITCH / PITCH_RE, LENGTH: the one spelling of an ABC note (accidental, letter, octave,
  length) that the tokenizer and the music arithmetic (abc_music) share;
- tokenize_abc, tokenize_abc_kinds, iter_token_kinds: the lossless ABC tokenizer ("".join(tokens) == text),
  tokenize_chars: one token per character, TOKENIZERS: both by name;
- PAD, EOS, UNK, SPECIALS and Vocabulary: the id of every token, the special tokens first;
- PromptError, header_prompt, music_only, prompt_as_read, encode_prompt: the text a tune starts from, as
  the model reads it, as ids.

It imports only the standard library (and cli's error class), so infer_onnx.py (onnxruntime, no
torch) and musicrnn.py (training with torch) encode and decode with the same code.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field

from cli import UserError

# -----------------------------------------------------------------------------
# the lossless ABC tokenizer

# The one spelling of a note's pitch, used by the tokenizer and by the music arithmetic:
# accidental, letter, octave marks ("^c'", "_B,,"), each its own group.
PITCH = r"(\^\^|\^|__|_|=)?([A-Ga-g])([,']*)"
PITCH_RE = re.compile(PITCH)
# Note lengths: "2", "3/2", "/", "//", "/2", "3/". Always optional.
LENGTH = r"\d*(?:/+\d*)?"
_NOTE = PITCH + LENGTH                                    # ^c'3/2
_REST = r"[zx]" + LENGTH + r"|Z\d*"                       # z2, x/2, Z4 (whole bars)

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
    ("chord_close", r"\]" + LENGTH),                     # ]2
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
    return list(iter_token_kinds(text))


def iter_token_kinds(text: str):
    """tokenize_abc_kinds one pair at a time, for texts too long to hold as a list."""
    return ((m.group(), m.lastgroup) for m in _TOKEN_RE.finditer(text))


def tokenize_chars(text: str) -> list[str]:
    """One token per character: the default, which scored better than ABC tokens (README)."""
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
        if not all(isinstance(t, str) and t for t in self.tokens) or len(set(self.tokens)) != len(self.tokens):
            raise ValueError("vocabulary tokens must be distinct, non-empty strings")
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


class PromptError(UserError, ValueError):
    """A prompt that the model cannot read."""


def header_prompt(meter: str | None = None, key: str | None = None, prompt: str | None = None) -> str:
    """The text a tune starts from: a free prompt, or a header primed with meter and key. Blank
    lines before a prompt's first line carry nothing (in a tunebook they only separate tunes)."""
    if prompt is not None:
        return re.sub(r"\A(?:[ \t]*\n)+", "", prompt)
    if meter is None and key is None:
        return ""
    lines = ["X:1", "L:1/8"]
    if meter is not None:
        lines.append(f"M:{meter.strip()}")
    lines.append(f"K:{key.strip() if key is not None else 'D'}")
    return "\n".join(lines) + "\n"


INFO_FIELDS = "TCOASZNHGDFBW"  # title, composer, origin, area, source, transcription, notes, history, group,
# discography, file, book, words: text about a tune, not music
BODY_INFO_FIELDS = "TWP"  # those abc2midi also takes in a tune's body (the others there are an error to it);
# P:, a part's label, changes nothing it plays without a P: line in the header (which --constrained refuses)
_INFO_LINE = {fields: re.compile(rf"[{fields}]:(?![|:])") for fields in (INFO_FIELDS, BODY_INFO_FIELDS)}  # not
# "A:|", a line's lone note before a bar line
_COMMENT = re.compile(r"[ \t]*%.*")  # to the line's end; a %% line too, a directive to what plays the tune


def music_only(abc: str) -> str:
    """ABC as the model and the judges read it: without info lines (T:, C:, S:, ...), comments (% to the
    line's end) and directives (%%MIDI ...), which no training tune has (the corpus builder drops them)
    and which change no bar abc2midi counts."""
    lines, fields = [], INFO_FIELDS
    for line in re.split(r"(?<=\n)", abc):  # lines as ABC ends them: \n alone
        lines.append(_line_as_read(line, _INFO_LINE[fields]))
        fields = BODY_INFO_FIELDS if line.startswith("K:") else fields
    return "".join(lines)


def _line_as_read(line: str, info_line: re.Pattern) -> str:
    """One line as the model reads it: "" for an info line or a comment alone, else without its comment."""
    if "%" not in line and not info_line.match(line):
        return line  # music, or a field the model reads
    music = _COMMENT.sub("", line)
    return "" if info_line.match(line) or not music.strip() else music


def prompt_as_read(prompt: str) -> str:
    """The prompt as the model reads it (music_only); the tune keeps it as typed (the sampler writes
    the prompt). A prompt may not end inside an info line or a comment: the model would go on writing
    it without having read it."""
    read = music_only(prompt)
    last = prompt[prompt.rfind("\n") + 1:]
    if last and not read.endswith(last):
        what = "comment" if "%" in last else "line"
        raise PromptError(f"the prompt ends inside its {what} {last!r}, which the model does not read "
                          f"(it leaves out info lines and comments): end the line")
    return read


def encode_prompt(vocab: Vocabulary, text: str) -> list[int]:
    """<eos> (the start symbol) + the prompt's ids; refuses symbols the model never saw."""
    unknown = vocab.unknown_chars(text)
    if unknown:
        raise PromptError("the tune's start (--prompt, or the header of --meter, --key and --type) has symbols "
                          "the model never saw: " + " ".join(repr(c) for c in unknown))
    return [vocab.eos_id] + vocab.encode(text)
