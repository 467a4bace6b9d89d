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
import json
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
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


def token_kind(token: str) -> str:
    """The kind of one token, as named in _TOKEN_PATTERNS ("note", "bar", ...)."""
    m = _TOKEN_RE.fullmatch(token)
    return m.lastgroup if m else "text"


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
                 rng: np.random.Generator, temperature: float = 1.0, top_k: int | None = None) -> list[list[int]]:
    """Autoregressive generation of `num` tunes as one batch, carrying the LSTM state.

    step(tokens (B, 1) int64, state) -> (logits (B, V) float32 numpy, state) is the model:
    torch in musicrnn.py, onnxruntime in infer_onnx.py. state=None means zeros. The
    prompt is fed one token at a time too, so both back ends run the same code path.
    Rows stop independently at <eos>.
    """
    state = None
    for tok in prompt_ids[:-1]:
        _, state = step(np.full((num, 1), tok, dtype=np.int64), state)
    tokens = np.full(num, prompt_ids[-1], dtype=np.int64)             # (B,)
    out = [[] for _ in range(num)]
    done = np.zeros(num, dtype=bool)
    for _ in range(max_tokens):
        logits, state = step(tokens[:, None], state)                  # (B, V)
        tokens = sample_next(logits, rng, temperature, top_k)         # (B,)
        for b in np.flatnonzero(~done):
            if tokens[b] == vocab.eos_id:
                done[b] = True
            else:
                out[b].append(int(tokens[b]))
        if done.all():
            break
    return out


def tunebook(bodies: list[str]) -> str:
    """Number the tunes X:1..X:N, one blank line between them."""
    tunes = []
    for n, text in enumerate(bodies, start=1):
        text = re.sub(r"\AX:[^\n]*\n?", "", text)  # the model writes its own X:1
        tunes.append(f"X:{n}\n{text.rstrip()}\n")
    return "\n".join(tunes)


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
    start = parser.add_argument_group("start of the tune")
    start.add_argument("--meter", help='prime the header with this meter, e.g. "6/8"')
    start.add_argument("--key", help='prime the header with this key, e.g. "D" or "Ador"')
    start.add_argument("--prompt", help="start from this ABC text instead of --meter/--key")
    output = parser.add_argument_group("output")
    output.add_argument("--out", help="also write the tunebook to this .abc file")


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


def write_tunebook(text: str, out: str | None) -> None:
    print(text)
    if out:
        write_atomic(Path(out), text.encode("utf-8"))
