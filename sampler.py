"""
sampler: drawing tunes from any model that steps one token at a time, torch-free.

Holds:
- SamplingOptions: every sampling setting in one dataclass, shared by musicrnn.py generate
  (torch), infer_onnx.py (onnxruntime), the sweep and their command lines;
- sample_next: temperature, top-k and the draw of the next token, in one function;
- generate_tunes: the generation loop, carrying the LSTM state from step to step, with the
  constraint's mask (abc_constraint) added to the logits when asked;
- generate_batches, tunebook, write_tunes: any number of tunes in bounded batches, numbered
  X:1..X:N, printed and written as each batch finishes;
- run_generation, add_sampling_flags, sampling_options: the generate command that
  musicrnn.py (torch) and infer_onnx.py (onnxruntime) share, its flags and their checks.

A model is a function step(tokens (B, 1) int64, state) -> (logits (B, V) float32, state),
state None meaning zeros: torch in musicrnn.torch_step, onnxruntime in exported_model.onnx_step.
Both run this same loop with the same numpy generators, so the same seed gives the same tunes
wherever their logits agree to the last bit (float32 rounding flips about 1 tune in 500: README).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

import cli
from abc_constraint import HEADER_TOKENS, TOKENS_PER_BAR, AbcConstraint, form_tokens
from abc_form import DEFAULT_SIMILARITY, MAX_BARS, MAX_SECTIONS, form_code, parse_control_code
from abc_music import BLANK_LINE, TUNE_TYPES, playable_key, playable_meter, tune_type, without_blank_lines
from abc_tokens import PromptError, Vocabulary, encode_prompt, header_prompt, prompt_as_read
from cli import UserError
from rendering import check_render, render_tunebook
from safe_write import atomic_file, check_output


@dataclass(frozen=True)
class SamplingOptions:
    num: int = 1                    # tunes (generate_tunes writes them as one batch; run_generation in BATCHes)
    temperature: float = 1.0        # divides the logits: below 1 safer, above 1 wilder
    top_k: int | None = None        # draw among the k most likely tokens only, ties with the k-th kept (None: all)
    seed: int | tuple = 0           # seeds each tune's numpy generator (seed, i): the same seed, the same tunes
    max_tokens: int = 1000          # tokens per tune at most
    constrained: bool = False       # mask every token that would break the tune (abc_constraint)
    max_bars: int = 32              # with constrained: end the tune cleanly after this many bars
    prompt: str = ""                # the text every tune starts from (a header, or the opening bars)
    form: str = ""                  # a control code to write to ("S:2\nB:8\nE:3\nB:8\n"; "": any form)


@dataclass(frozen=True)
class ModelFacts:
    """What generation needs to know of a model besides its vocabulary."""
    control_codes: bool = False     # trained with each tune's control code before it (train --control)
    tune_types: tuple = ()          # the R: types its training tunes name, for --type


def form_bars(code: str) -> tuple[int, ...]:
    """The bars of each section that a control code asks for; () for no code."""
    return parse_control_code(code)[0] if code else ()


CONTROL_FORM = form_code([8, 8])  # the corpus's commonest form (AABB, 8 bars each): 2,521 of 4,176 tunes


def model_prompt(opts: SamplingOptions, facts: ModelFacts) -> tuple[str, tuple[int, ...]]:
    """What the model (and the constraint) reads before it writes, and the form the constraint is told
    of: the prompt without its info lines and comments (prompt_as_read); a model trained with codes reads the
    code before it (CONTROL_FORM when none is asked for: training never asks it to write one), and
    the constraint reads the form there."""
    prompt = prompt_as_read(opts.prompt)
    if facts.control_codes:
        return (opts.form or CONTROL_FORM) + prompt, ()
    return prompt, form_bars(opts.form)


# -----------------------------------------------------------------------------
# one draw, then the loop


def sample_next(logits: np.ndarray, rngs: list[np.random.Generator], temperature: float = 1.0,
                top_k: int | None = None) -> np.ndarray:
    """Draw one token id per row from logits (B, V) -> (B,), row b with rngs[b].

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
    u = np.array([rng.random() for rng in rngs])[:, None] * cdf[:, -1:]  # (B, 1)
    return np.minimum((cdf <= u).sum(axis=1), z.shape[1] - 1)         # (B,)


def generate_tunes(step, vocab: Vocabulary, opts: SamplingOptions, constraint: AbcConstraint | None = None,
                   facts: ModelFacts = ModelFacts(), first: int = 0) -> list[str]:
    """opts.num tunes as one batch, each the prompt followed by what the model writes until <eos>:
    the request's tunes first, first + 1, ... (from 0), each drawn by its own generator (row_generators).

    The prompt is fed one token at a time, as generation is, so both back ends run the same
    code path. Rows stop independently at <eos>. With opts.constrained, illegal tokens get
    -inf before the draw, from a new AbcConstraint or the one given (its mask cache kept).
    A model trained with control codes reads opts.form (or CONTROL_FORM) before the prompt; the
    tunes come back without it.
    """
    prompt, form = model_prompt(opts, facts)
    prompt_ids = encode_prompt(vocab, prompt)
    constraint = (constraint or AbcConstraint(vocab, opts.max_bars, coded=facts.control_codes)) \
        if opts.constrained else None
    rngs, num = row_generators(opts.seed, first, opts.num), opts.num
    state = None
    for tok in prompt_ids[:-1]:
        _, state = step(np.full((num, 1), tok, dtype=np.int64), state)
    tunes = [constraint.start(prompt, form, opts.max_tokens) for _ in range(num)] if constraint else []
    tokens = np.full(num, prompt_ids[-1], dtype=np.int64)             # (B,)
    out, done = [[] for _ in range(num)], np.zeros(num, dtype=bool)
    for t in range(opts.max_tokens):
        logits, state = step(tokens[:, None], state)                  # (B, V), the state carried on
        if constraint:
            mask_illegal(logits, tunes, constraint, opts.max_tokens - t)
        tokens = sample_next(logits, rngs, opts.temperature, opts.top_k)  # (B,)
        for b in np.flatnonzero(~done):
            done[b] = tokens[b] == vocab.eos_id
            if not done[b]:
                out[b].append(int(tokens[b]))
            if constraint:
                constraint.advance(tunes[b], int(tokens[b]))
        if done.all():
            break
    return [opts.prompt + vocab.decode(row) for row in out]  # as typed: info lines kept, no code


def row_generators(seed: int, first: int, num: int) -> list[np.random.Generator]:
    """One generator per tune, seeded by (seed, the tune's number in the request): tune i draws the
    same numbers whatever --num, the batch it falls in and the tunes beside it."""
    return [np.random.default_rng([seed, i]) for i in range(first, first + num)]


def mask_illegal(logits: np.ndarray, tunes: list, constraint: AbcConstraint, tokens_left: int) -> None:
    """-inf, in place, on every token that would break its row's tune (rows that ended are left)."""
    for row, tune in zip(logits, tunes):                              # (V,) each
        if not tune.ended:
            row += constraint.penalty(tune, tokens_left)


# -----------------------------------------------------------------------------
# many tunes: bounded batches, streamed out as they finish

BATCH = 64  # tunes generated at once: memory stays bounded whatever --num asks for


def generate_batches(step, vocab: Vocabulary, opts: SamplingOptions, constraint: AbcConstraint | None = None,
                     facts: ModelFacts = ModelFacts(), batch: int = BATCH):
    """opts.num tunes in batches of at most `batch`, yielded as each batch finishes. Tune i is
    the same as with any other batch or --num (its own generator). One constraint serves every
    batch, so its mask cache fills once.
    """
    if opts.constrained and constraint is None:
        constraint = AbcConstraint(vocab, opts.max_bars, coded=facts.control_codes)
    for first in range(0, opts.num, batch):
        part = replace(opts, num=min(batch, opts.num - first))
        yield generate_tunes(step, vocab, part, constraint, facts, first)


def tunebook(bodies: list[str], first: int = 1) -> str:
    """Number the tunes X:first, X:first+1, ..., one blank line between them. A blank line that a
    model wrote inside a tune is dropped: in a tunebook it would end the tune there; so is an X: line,
    which would start a tune numbered as the model wrote it (its own X:1 first of all)."""
    tunes = []
    for n, text in enumerate(bodies, start=first):
        text = re.sub(r"(?m)^X:[^\n]*(\n|\Z)", "", text)
        text = without_blank_lines(text)
        tunes.append(f"X:{n}\n{text.rstrip()}\n")
    return "\n".join(tunes)


BEFORE_X = re.compile(r"(?:[ \t]*(?:%[^\n]*)?\n)*")  # comment lines (a file's %abc-2.1, pasted with its tune;
# the model does not read them: music_only) and blank ones


def from_x_line(prompt: str) -> str:
    """The prompt from where its X: line may be: past the lines ABC allows before it (BEFORE_X)."""
    return prompt[BEFORE_X.match(prompt).end():]


def first_number(prompt: str) -> int:
    """The X: number a prompt gives its tune (X:42 -> 42), which the tunebook then counts on from; 1
    without one."""
    m = re.match(r"X:[ \t]*(\d{1,9})[ \t]*(?:\n|\Z)", from_x_line(prompt))
    return int(m[1]) if m else 1


def write_tunes(batches, num: int, out: Path | None, overwrite: bool, first: int = 1) -> None:
    """Print each batch's tunes as it arrives, numbered from X:first, and write them all to out
    (atomically, at the end)."""
    with contextlib.ExitStack() as stack:
        f = stack.enter_context(atomic_file(out, overwrite)) if out else None
        bar = stack.enter_context(progress_bar(num))
        written, printing = 0, True
        for tunes in batches:
            text = tunebook(tunes, first=first + written)
            printing = printing and print_while_read(text)
            if not (printing or f):
                break
            if f:
                f.write((("\n" if written else "") + text).encode("utf-8"))
            written += len(tunes)
            bar.update(len(tunes))


def progress_bar(num: int):
    """A bar on stderr for requests of several batches; tqdm is imported only then, so that
    infer_onnx.py needs no more than onnxruntime and numpy for the usual few tunes."""
    if num <= BATCH:
        return contextlib.nullcontext(argparse.Namespace(update=lambda n: None))
    from tqdm import tqdm

    return tqdm(total=num, unit="tune", file=sys.stderr, leave=False, disable=None)  # None: only on a terminal


def print_while_read(text: str) -> bool:
    """Print text; False once the reader has gone (`| head -5`), as cli.ReaderSafeStdout (every
    command's stdout) says: --out is still written in full, and stdout goes nowhere from then on."""
    print(text, flush=True)
    return not getattr(sys.stdout, "gone", False)


def run_generation(load_model, args: argparse.Namespace, model_path: str) -> None:
    """The generate command of musicrnn.py and infer_onnx.py: check the flags and the outputs,
    then load_model() -> (step, vocab, facts), then stream the tunes out and render them if asked."""
    opts = sampling_options(args)
    out = check_outputs(args, model_path, opts)
    step, vocab, facts = load_model()
    if facts.control_codes and args.max_bars is not None:  # no form asked for: CONTROL_FORM sets the bars
        raise UserError("--max-bars: this model reads a form before each tune, which sets its bars "
                        "(S:2 B:8 E:3 B:8 when none is asked for); give --form or --sections/--bars instead")
    opts, constraint = check_against_model(opts, vocab, facts, args.type)
    if form_unheld(opts, facts):  # a flag that would do nothing is refused (the page shows form_note's note)
        raise UserError("--form (or --sections/--bars) holds only with --constrained on a model trained without "
                        "control codes (train --control): add --constrained")
    note = form_note(opts, facts)
    if note:
        cli.note_line(note)
    write_tunes(generate_batches(step, vocab, opts, constraint, facts), opts.num, out, args.overwrite,
                first_number(opts.prompt))
    if out and args.render:
        for line in render_tunebook(out, args.overwrite, inputs=[model_path]):
            print(line, file=sys.stderr)


def check_outputs(args: argparse.Namespace, model_path: str, opts: SamplingOptions) -> Path | None:
    if args.render and args.out is None:
        raise UserError("--render writes beside the tunebook: give --out too")
    if args.overwrite and args.out is None:
        raise UserError("--overwrite lets --out replace a file: without --out nothing is written")
    if args.out is None:
        return None
    out = check_output(args.out, "--out", args.overwrite, inputs=[model_path], suffix=".abc")
    if args.render:  # before any work: the tunes asked for; render_tunebook checks again the tunes written
        check_render(out, opts.num, args.overwrite, inputs=[model_path])
    return out


def check_against_model(opts: SamplingOptions, vocab: Vocabulary, facts: ModelFacts, type_asked: str | None = None,
                        constraint: AbcConstraint | None = None) -> tuple[SamplingOptions, AbcConstraint | None]:
    """What only the model can answer: is top-k within its vocabulary, does it know the tune
    type, can it read (and, when constrained, continue) the prompt. Returns the options with
    the type's R: line in the prompt, and the constraint that generation will use: the one
    given (its mask cache kept), or a new one."""
    if opts.top_k is not None and opts.top_k > len(vocab):
        raise UserError(f"--top-k {opts.top_k}: the model has only {len(vocab)} tokens")
    if type_asked is not None:
        opts = replace(opts, prompt=typed_prompt(opts.prompt, type_asked, facts))
    prompt, form = model_prompt(opts, facts)
    encode_prompt(vocab, prompt)
    if not opts.constrained:
        return opts, None
    if facts.control_codes and not opts.form:  # the form it reads must fit the budget as an asked one does
        check_form_budget(CONTROL_FORM, opts.max_tokens, "the form this model reads when none is asked for, ")
    constraint = constraint or AbcConstraint(vocab, opts.max_bars, coded=facts.control_codes)
    try:
        constraint.start(prompt, form)
    except PromptError as e:
        if prompt_as_read(opts.prompt) == opts.prompt:
            raise
        raise PromptError(f"{e} (it quotes the prompt as the model reads it: without its info lines, comments "
                          f"and directives)") from None
    return opts, constraint


def form_unheld(opts: SamplingOptions, facts: ModelFacts) -> bool:
    """A form is asked for that neither the model (trained without codes) nor the masks will hold."""
    return bool(opts.form) and not facts.control_codes and not opts.constrained


def form_note(opts: SamplingOptions, facts: ModelFacts) -> str | None:
    """What a user who asks for a form should know when nothing will hold the tunes to it."""
    if form_unheld(opts, facts):
        return ("this model was trained without control codes (train --control): only --constrained holds it "
                "to --form")
    if facts.control_codes and not opts.form:
        return ("this model reads a form before each tune; none was asked for, so it reads "
                f"{CONTROL_FORM.strip().replace(chr(10), ' ')} (2 sections of 8 bars, the corpus's commonest; "
                "--form or --sections/--bars for another)")
    return None


def typed_prompt(prompt: str, asked: str, facts: ModelFacts) -> str:
    """The header prompt with the R: line of --type after its X:1."""
    name = tune_type(asked)
    if name is None or name not in facts.tune_types:
        known = ", ".join(facts.tune_types) or "none: it was trained on tunes without R: lines"
        raise PromptError(f"--type {asked}: unknown to this model; it knows {known}")
    return re.sub(r"\AX:1\n|\A", f"X:1\nR:{name}\n", prompt, count=1)


# -----------------------------------------------------------------------------
# the flags that musicrnn.py generate and infer_onnx.py share

TEMPERATURE = cli.float_in(0.01, 100)
SEED = cli.int_in(0, 2**32 - 1)
SECTIONS = cli.int_in(1, MAX_SECTIONS)


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """The sampling flags, identical in musicrnn.py generate and infer_onnx.py."""
    group = parser.add_argument_group("sampling")
    group.add_argument("--num", type=cli.int_in(1, 10**6), default=1,
                       help=f"how many tunes to write; they are made {BATCH} at a time and printed as each "
                            f"batch is done (default 1)")
    group.add_argument("--temperature", type=TEMPERATURE, default=None,  # None: not typed (see --top-k 1)
                       help="divides the logits before the draw: below 1 safer and more repetitive, above 1 "
                            "wilder (0.01 to 100, default 1.0)")
    group.add_argument("--top-k", type=cli.positive_int, default=None,
                       help="draw only among the k most likely tokens; 1: always the most likely, with no "
                            "temperature (default: all of them)")
    group.add_argument("--seed", type=SEED, default=0, help="seeds the draws: the same seed gives the same tunes, "
                                                            "tune N the same whatever --num (float32 rounding aside: "
                                                            "README) (0 to 2^32-1, default 0)")
    group.add_argument("--max-tokens", type=cli.int_in(1, 100_000), default=1000,
                       help="tokens the model writes per tune at most, after the prompt (default 1000)")
    group.add_argument("--constrained", action="store_true",
                       help="mask tokens that would break the tune: valid ABC, full bars, a clean end")
    group.add_argument("--max-bars", type=cli.int_in(1, 1000), default=None,
                       help=f"with --constrained and no form: end the tune cleanly after at most this many full "
                            f"bars (default {SamplingOptions.max_bars})")
    add_request_flags(parser)
    output = parser.add_argument_group("output")
    output.add_argument("--out", help="also write the tunebook to this .abc file (never replaces a file "
                                      "unless --overwrite)")
    output.add_argument("--render", action="store_true",
                        help="with --out: also write MIDI (abc2midi), audio (fluidsynth, .wav) and SVG scores "
                             "(abcm2ps) beside it")
    output.add_argument("--overwrite", action="store_true", help="let --out and --render replace existing files")


def add_request_flags(parser: argparse.ArgumentParser) -> None:
    """What a tune should be: its header (meter, key, type) or a prompt, and its form."""
    start = parser.add_argument_group("start of the tune")
    start.add_argument("--meter", help='prime the header with this meter, e.g. "6/8", "C" or "C|"')
    start.add_argument("--key", help='prime the header with this key, e.g. "D", "Ador" or "Bbmix" (with --meter '
                                     'alone: D); the header is then X:1, L:1/8, M: (with --meter) and K:')
    start.add_argument("--type", help=f'prime the header with this tune type (R:), e.g. "jig", "reel" or "slip jig"; '
                                      f'one the model met in training, which a refusal lists (names are read as one of '
                                      f'{", ".join(TUNE_TYPES)})')
    start.add_argument("--prompt", type=cli.abc_text,
                       help='start from this ABC text instead of --meter/--key/--type, e.g. '
                            '"X:1\\nL:1/8\\nM:6/8\\nK:D\\n" (\\n: a line break)')
    form = parser.add_argument_group("form (sections and bars; exact with --constrained, which a model "
                                     "trained without --control needs)")
    form.add_argument("--form", help='an IrishMAN control code: S:sections, B:bars of the first section, then for '
                                     'each later section E:similarity (0-10) to every earlier one and its B:bars; '
                                     'lines apart by spaces, e.g. "S:2 B:8 E:3 B:8" (two parts of 8 bars)')
    form.add_argument("--sections", type=SECTIONS,
                      help=f"the same, spelt short: this many sections (1-{MAX_SECTIONS}), with --bars")
    form.add_argument("--bars", help=f'with --sections: bars per section (1-{MAX_BARS}), one number for all or '
                                     f'one per section, e.g. "8" or "8,8,16"; similarities default to '
                                     f'E:{DEFAULT_SIMILARITY}')


def sampling_options(args: argparse.Namespace) -> SamplingOptions:
    """The options that the sampling flags ask for, each checked."""
    check_start_flags(args)
    form = requested_form(args)
    check_budget(args, form)
    if args.top_k == 1 and args.temperature is not None:  # scaling the logits cannot change which is largest
        raise UserError("--temperature does nothing with --top-k 1, which always takes the most likely token: "
                        "give one or the other")
    temperature = SamplingOptions.temperature if args.temperature is None else args.temperature
    return SamplingOptions(num=args.num, temperature=temperature, top_k=args.top_k, seed=args.seed,
                           max_tokens=args.max_tokens, constrained=args.constrained,
                           max_bars=SamplingOptions.max_bars if args.max_bars is None else args.max_bars,
                           prompt=header_prompt(args.meter, args.key, args.prompt), form=form)


def check_start_flags(args: argparse.Namespace) -> None:
    """--prompt, or --meter and --key (checked alike, free and constrained)."""
    if args.prompt is not None and (args.meter or args.key or args.type):
        raise PromptError("--prompt cannot be combined with --meter, --key or --type")
    text = header_prompt(prompt=args.prompt)
    if BLANK_LINE.search(text):  # at its end too
        raise PromptError("--prompt has a blank line, which ends a tune in ABC: remove it")
    x_lines = [n for n, line in enumerate(text.split("\n"), start=1) if line.startswith("X:")]
    if x_lines[1:]:
        raise PromptError("--prompt has a second X: line, which starts another tune in ABC: give one tune")
    if x_lines and not from_x_line(text).startswith("X:"):
        raise PromptError(f"--prompt has its X: line on line {x_lines[0]}: X: starts a tune in ABC, so it comes "
                          f"first")
    if args.meter is not None and not playable_meter(args.meter):
        raise PromptError(f"--meter {args.meter}: not a meter like 6/8, 3/4, C or C|")
    if args.key is not None and not playable_key(args.key):
        capital = args.key[:1].upper() + args.key[1:]
        hint = f" (its letter a capital: {capital})" if playable_key(capital) else ""
        raise PromptError(f"--key {args.key}: not a key like D, Ador, Bbmix or F#m{hint}")
    if args.constrained and args.key is not None and args.meter is None:
        raise PromptError("--constrained counts bars in the meter: with --key, give --meter too (e.g. --meter 6/8)")


def check_budget(args: argparse.Namespace, form: str) -> None:
    """--max-bars, --max-tokens: what the constraint and the form asked for can be held to."""
    if args.max_bars is not None and not args.constrained:
        raise UserError("--max-bars holds only with --constrained: add --constrained")
    if args.max_bars is not None and form:
        raise UserError("--max-bars with a form: the form sets the bars itself; give --max-bars or the form, not both")
    if args.constrained and args.max_tokens < AbcConstraint.END_RESERVE:
        raise UserError(f"--max-tokens {args.max_tokens} is too few for --constrained, which keeps "
                        f"{AbcConstraint.END_RESERVE} tokens to finish a tune cleanly: give at least that many")
    check_form_budget(form, args.max_tokens)


def check_form_budget(code: str, max_tokens: int, whose: str = "") -> None:
    """Refuses a form whose bars max_tokens cannot hold (whose: what the form is, when not asked for)."""
    bars = sum(form_bars(code))
    if bars and form_tokens(bars) > max_tokens:
        named = f" ({whose}{code.strip().replace(chr(10), ' ')})" if whose else ""
        raise UserError(f"--max-tokens {max_tokens} is too few for {bars} bars{named}: give at least "
                        f"{TOKENS_PER_BAR} per bar and {HEADER_TOKENS} for the header, "
                        f"--max-tokens {form_tokens(bars)}")


def requested_form(args: argparse.Namespace) -> str:
    """The control code that --form, or --sections with --bars, asks for ("" for none)."""
    if args.form is not None and (args.sections or args.bars):
        raise PromptError("give --form, or --sections with --bars, not both")
    if args.form is not None:
        return parse_control_code(args.form)[1]
    if args.sections is None and args.bars is None:
        return ""
    if args.sections is None or args.bars is None:
        raise PromptError("--sections and --bars go together, e.g. --sections 2 --bars 8")
    parts = args.bars.replace(" ", "").split(",")
    if not all(p.isascii() and p.isdigit() for p in parts) or len(parts) not in (1, args.sections):
        apart = f", or {args.sections} numbers apart by commas" if args.sections > 1 else ""
        raise PromptError(f"--bars {args.bars}: one number{apart}")
    bars = [int(p) if len(p) < 10 else MAX_BARS + 1 for p in parts] * (args.sections if len(parts) == 1 else 1)
    if not all(1 <= n <= MAX_BARS for n in bars):
        raise PromptError(f"--bars {args.bars}: bars per section must be 1 to {MAX_BARS}")
    return form_code(bars)
