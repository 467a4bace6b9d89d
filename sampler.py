"""
sampler: drawing tunes from any model that steps one token at a time, torch-free.

Holds:
- SamplingOptions: every sampling setting in one dataclass, shared by musicrnn.py generate
  (torch), infer_onnx.py (onnxruntime), the sweep and their command lines;
- sample_next: temperature, top-k and the draw of the next token, in one function;
- generate_tunes: the generation loop, carrying the LSTM state from step to step, with the
  constraint's mask (abc_constraint) added to the logits when asked;
- tunebook, write_tunebook: the tunes numbered X:1..X:N, printed and written;
- add_sampling_flags, sampling_options: the flags, shared by both command lines.

A model is a function step(tokens (B, 1) int64, state) -> (logits (B, V) float32, state),
state None meaning zeros: torch in musicrnn.torch_step, onnxruntime in exported_model.onnx_step.
Both run this same loop with the same numpy generator, so the same seed gives the same tunes.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import cli
from abc_constraint import AbcConstraint
from abc_tokens import PromptError, Vocabulary, encode_prompt, header_prompt
from judging import render_tunebook
from safe_write import write_atomic


@dataclass(frozen=True)
class SamplingOptions:
    num: int = 1                    # tunes, written as one batch
    temperature: float = 1.0        # divides the logits: below 1 safer, above 1 wilder
    top_k: int | None = None        # draw among the k most likely tokens only (None: all)
    seed: int = 0                   # seeds the numpy generator: the same seed, the same tunes
    max_tokens: int = 1000          # tokens per tune at most
    constrained: bool = False       # mask every token that would break the tune (abc_constraint)
    max_bars: int = 32              # with constrained: end the tune cleanly after this many bars
    prompt: str = ""                # the text every tune starts from (a header, or the opening bars)


# -----------------------------------------------------------------------------
# one draw, then the loop


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


def generate_tunes(step, vocab: Vocabulary, opts: SamplingOptions,
                   constraint: AbcConstraint | None = None) -> list[str]:
    """opts.num tunes as one batch, each the prompt followed by what the model writes until <eos>.

    The prompt is fed one token at a time, as generation is, so both back ends run the same
    code path. Rows stop independently at <eos>. With opts.constrained, illegal tokens get
    -inf before the draw, from a new AbcConstraint or the one given (its mask cache kept).
    """
    prompt_ids = encode_prompt(vocab, opts.prompt)
    if not opts.constrained:
        constraint = None
    elif constraint is None:
        constraint = AbcConstraint(vocab, opts.max_bars)
    rng, num = np.random.default_rng(opts.seed), opts.num
    state = None
    for tok in prompt_ids[:-1]:
        _, state = step(np.full((num, 1), tok, dtype=np.int64), state)
    tunes = [constraint.start(opts.prompt) for _ in range(num)] if constraint else []
    tokens = np.full(num, prompt_ids[-1], dtype=np.int64)             # (B,)
    out, done = [[] for _ in range(num)], np.zeros(num, dtype=bool)
    for t in range(opts.max_tokens):
        logits, state = step(tokens[:, None], state)                  # (B, V), the state carried on
        if constraint:
            for row, tune in zip(logits, tunes):                      # (V,) each, masked in place
                if not tune.ended:
                    row += constraint.penalty(tune, opts.max_tokens - t)  # -inf where illegal
        tokens = sample_next(logits, rng, opts.temperature, opts.top_k)  # (B,)
        for b in np.flatnonzero(~done):
            done[b] = tokens[b] == vocab.eos_id
            if not done[b]:
                out[b].append(int(tokens[b]))
            if constraint:
                constraint.advance(tunes[b], int(tokens[b]))
        if done.all():
            break
    return [opts.prompt + vocab.decode(row) for row in out]


# -----------------------------------------------------------------------------
# tunebooks out


def tunebook(bodies: list[str]) -> str:
    """Number the tunes X:1..X:N, one blank line between them."""
    tunes = []
    for n, text in enumerate(bodies, start=1):
        text = re.sub(r"\AX:[^\n]*\n?", "", text)  # the model writes its own X:1
        tunes.append(f"X:{n}\n{text.rstrip()}\n")
    return "\n".join(tunes)


def write_tunebook(text: str, out: str | None, render: bool = False) -> None:
    print(text)
    if out:
        write_atomic(Path(out), text.encode("utf-8"))
        if render:
            for line in render_tunebook(Path(out)):
                print(line, file=sys.stderr)


# -----------------------------------------------------------------------------
# the flags that musicrnn.py generate and infer_onnx.py share


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """The sampling flags, identical in musicrnn.py generate and infer_onnx.py."""
    group = parser.add_argument_group("sampling")
    group.add_argument("--num", type=cli.positive_int, default=1, help="tunes to write, as one batch (default 1)")
    group.add_argument("--temperature", type=cli.positive_float, default=1.0, help="> 0; lower is safer (default 1.0)")
    group.add_argument("--top-k", type=cli.positive_int, default=None, help="sample from the k most likely tokens only")
    group.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    group.add_argument("--max-tokens", type=cli.positive_int, default=1000, help="tokens per tune at most (default 1000)")
    group.add_argument("--constrained", action="store_true",
                       help="mask tokens that would break the tune: valid ABC, full bars, a clean end")
    group.add_argument("--max-bars", type=cli.positive_int, default=32,
                       help="with --constrained: end the tune cleanly after this many bars (default 32)")
    start = parser.add_argument_group("start of the tune")
    start.add_argument("--meter", help='prime the header with this meter, e.g. "6/8"')
    start.add_argument("--key", help='prime the header with this key, e.g. "D" or "Ador"')
    start.add_argument("--prompt", help="start from this ABC text instead of --meter/--key")
    output = parser.add_argument_group("output")
    output.add_argument("--out", help="also write the tunebook to this .abc file")
    output.add_argument("--render", action="store_true",
                        help="with --out: also write MIDI (abc2midi) and SVG scores (abcm2ps) beside it")


def sampling_options(args: argparse.Namespace) -> SamplingOptions:
    """The options that the sampling flags ask for."""
    if args.prompt is not None and (args.meter or args.key):
        raise PromptError("--prompt cannot be combined with --meter or --key")
    return SamplingOptions(num=args.num, temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                           max_tokens=args.max_tokens, constrained=args.constrained, max_bars=args.max_bars,
                           prompt=header_prompt(args.meter, args.key, args.prompt))
