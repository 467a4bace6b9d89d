"""
judging: how good are generated tunes, measured with abc2midi and with counts. Torch-free.

Holds:
- check_with_abc2midi, abc2midi_available: abc2midi (Debian package abcmidi), an independent
  ABC parser, says whether a tune is valid and whether its bars are full;
- tune_metrics: validity, bar-cleanness, length, diversity (distinct 4-grams), pitch classes
  against the training tunes, copying of a training tune's first 8 bars;
- sweep, sweep_table: those metrics per temperature, free and constrained, as a Markdown table;
- form_sweep, type_sweep, markdown_table: whether requested forms and tune types are honoured;
- add_commands, run_command: musicrnn.py's sweep, forms and types commands, which write tunes
  with a model (torch through musicrnn.py, or onnxruntime with --onnx) and judge them.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from abc_constraint import SECTION_ENDS, AbcConstraint
from abc_form import bar_times, control_code, form_code, parse_control_code, sections
from abc_music import header_field, note_tokens, pitch_class, pitch_spelling, tune_body, without_blank_lines
import cli
import plots
import sampler
from abc_tokens import header_prompt, music_only
from cli import UserError
from corpus import load_tunes
from rendering import for_abc2midi
from safe_write import check_output, write_atomic

# -----------------------------------------------------------------------------
# abc2midi, the judge

_BAR_WARNING = re.compile(r"Bar \d+ has .* time units")


def abc2midi_available() -> bool:
    return shutil.which("abc2midi") is not None


def check_with_abc2midi(tune: str) -> dict:
    """Run abc2midi on one tune. It exits 0 even on errors, so its output is what counts.

    valid: abc2midi ends normally, writes a MIDI file and prints no "Error" line (R:hornpipe aside:
    for_abc2midi); a crash or a run past 30 s is invalid, its reason among the messages.
    bar_clean: valid, no "Bar N has X time units" warning, the last bar closed by a bar line (abc2midi
    checks no bar the tune stops in), and the two bars abc2midi never checks of the right length
    (ends_fit): the first, and the last when it is short.
    """
    with tempfile.TemporaryDirectory() as tmp:
        src, midi = Path(tmp) / "tune.abc", Path(tmp) / "tune.mid"
        tune = without_blank_lines(tune)  # as a tunebook holds it: the whole tune, judged whole
        src.write_text(for_abc2midi(tune if tune.startswith("X:") else "X:1\n" + tune))
        try:
            result = subprocess.run(["abc2midi", str(src), "-o", str(midi)], capture_output=True, text=True,
                                    errors="replace", timeout=30)  # it echoes a bad character byte by byte
        except subprocess.TimeoutExpired:
            return {"valid": False, "bar_clean": False, "messages": ["abc2midi ran past 30 s"]}
        lines = (result.stdout + result.stderr).splitlines()
        lines += [f"abc2midi ended with exit status {result.returncode}"] * (result.returncode != 0)
        valid = (result.returncode == 0 and midi.exists() and midi.stat().st_size > 0
                 and not any("Error" in line for line in lines))
    bar_warnings = [line for line in lines if _BAR_WARNING.search(line)]
    closed = tune_body(music_only(tune)).rstrip().endswith(("|", "|]", "::"))  # a comment after the last bar too
    return {"valid": valid, "bar_clean": valid and not bar_warnings and closed and ends_fit(tune), "messages": lines}


def ends_fit(tune: str) -> bool:
    """The bars abc2midi does not check are of the right length: the first is full, or short (a pickup)
    with the last bar completing it; the last is full, or completes the pickup. A tune without a numeric
    meter has no lengths to check."""
    bars = bar_times(tune)
    if not bars or bars[0][1] is None or bars[-1][1] is None:
        return True
    (first, full), (last, last_full) = bars[0], bars[-1]
    pickup = first if first < full and len(bars) > 1 else 0
    return first <= full and (last == last_full or (pickup > 0 and pickup + last == last_full))


def pitch_class_histogram(tunes: list[str]) -> np.ndarray:
    counts = np.zeros(12)
    for tune in tunes:
        for note in note_tokens(tune):
            counts[pitch_class(note)] += 1
    return counts / max(1.0, counts.sum())


def first_bars(tune: str, n: int = 8) -> str:
    """The first n bars' music, spaces and line breaks removed: a fingerprint for copying."""
    bars = re.split(r":*\[?\|[\]|:]*\d*|::", tune_body(tune))
    bars = [re.sub(r"\s+", "", b) for b in bars]
    return "|".join([b for b in bars if b][:n])


def tune_metrics(tunes: list[str], training_tunes: list[str], judge: bool) -> dict:
    """The sweep table's columns for a set of tunes: validity, bars, diversity, copying."""
    notes = [note_tokens(t) for t in tunes]
    pitches = [[pitch_spelling(n) for n in row] for row in notes]
    grams = [tuple(row[i:i + 4]) for row in pitches for i in range(len(row) - 3)]
    train_hist = pitch_class_histogram(training_tunes)
    known_openings = {first_bars(t) for t in training_tunes}
    metrics = {
        "tunes": len(tunes),
        "mean_notes": float(np.mean([len(row) for row in notes])) if tunes else 0.0,
        "min16_notes": float(np.mean([len(row) >= 16 for row in notes])) if tunes else 0.0,
        "section_end": float(np.mean([tune_body(t).rstrip().endswith(SECTION_ENDS) for t in tunes])),
        "distinct_4grams": len(set(grams)) / len(grams) if grams else None,  # None: no four notes in a row
        # half the L1 distance: 0 = the training tunes' pitch-class mix, 1 = nothing in common; None: no notes
        "pitch_class_distance": 0.5 * float(np.abs(pitch_class_histogram(tunes) - train_hist).sum())
        if any(notes) else None,
        "copies_first_8_bars": float(np.mean([first_bars(t) in known_openings for t in tunes])),
    }
    if judge:
        results = [check_with_abc2midi(t) for t in tunes]
        metrics["valid"] = float(np.mean([r["valid"] for r in results]))
        metrics["bar_clean"] = float(np.mean([r["bar_clean"] for r in results]))
    return metrics


def judged_by_abc2midi(log=print) -> bool:
    """Whether abc2midi is here to judge the tunes; when it is not, the table says what it lacks."""
    if abc2midi_available():
        return True
    log("abc2midi is not installed (apt-get install abcmidi): the valid and bar-clean columns are missing")
    return False


def sweep(generate_fn, opts, training_tunes: list[str], temperatures=(0.5, 0.8, 1.0, 1.2),
          log=print) -> list[dict]:
    """generate_fn(options) -> tunes, for each setting of the table: opts (a
    sampler.SamplingOptions) at each temperature, free and constrained."""
    judge, rows = judged_by_abc2midi(log), []
    for temperature in temperatures:
        for constrained in (False, True):
            tunes = generate_fn(replace(opts, temperature=temperature, constrained=constrained))
            rows.append({"temperature": temperature, "constrained": constrained,
                         **tune_metrics(tunes, training_tunes, judge)})
            log(f"temperature {temperature} {'constrained' if constrained else 'free':>11}: "
                + ", ".join(f"{k} {'n/a' if v is None else format(v, '.3g')}" for k, v in rows[-1].items()
                            if k not in ("temperature", "constrained")))  # None: nothing to measure
    return rows


def sweep_table(rows: list[dict]) -> str:
    columns = [("temperature", "T"), ("constrained", "constrained"), ("valid", "valid"), ("bar_clean", "bar-clean"),
               ("min16_notes", ">=16 notes"), ("section_end", "ends a section"), ("mean_notes", "notes/tune"),
               ("distinct_4grams", "distinct 4-grams"), ("pitch_class_distance", "pitch-class dist."),
               ("copies_first_8_bars", "copies 8 bars")]
    return markdown_table(rows, columns, {"valid", "bar_clean", "min16_notes", "section_end", "copies_first_8_bars"})


# -----------------------------------------------------------------------------
# requests honoured: forms (sections and bars) and tune types

FORM_REQUESTS = [((8, 8), None), ((8, 8), "6/8"), ((8, 8), "4/4"), ((8, 8, 8), None), ((16,), None),
                 ((4, 4, 4, 4), None)]  # bars per section, meter (None: the model's choice)


def form_match(tunes: list[str], code: str) -> dict:
    """Shares of tunes whose own control code (abc_form) has the requested sections, bars, and all of it."""
    requested, found = parse_control_code(code)[0], [sections(t) for t in tunes]
    return {"sections": float(np.mean([len(f) == len(requested) for f in found])),
            "bars": float(np.mean([tuple(s.bars for s in f) == requested for f in found])),
            "code": float(np.mean([control_code(t) == code for t in tunes]))}


def form_sweep(generate_fn, opts, requests=FORM_REQUESTS, log=print) -> list[dict]:
    """generate_fn(options) -> tunes, for each request (bars per section, meter or None), free
    and constrained: how often the tunes have the form asked for, and abc2midi's verdict."""
    judge, rows = judged_by_abc2midi(log), []
    for bars, meter in requests:
        for constrained in (False, True):
            code = form_code(list(bars))
            tunes = generate_fn(replace(opts, form=code, constrained=constrained, prompt=header_prompt(meter)))
            row = {"request": "+".join(map(str, bars)), "meter": meter or "any", "constrained": constrained,
                   **form_match(tunes, code)}
            if judge:
                results = [check_with_abc2midi(t) for t in tunes]
                row |= {"valid": float(np.mean([r["valid"] for r in results])),
                        "bar_clean": float(np.mean([r["bar_clean"] for r in results]))}
            rows.append(row)
            log(", ".join(f"{k} {v}" for k, v in row.items()))
    return rows


def dotted_rhythm(tune: str) -> bool:
    """Broken rhythm (> or <) in half its bars or more: what marks a hornpipe written out
    (26% of the corpus's hornpipes, 3% of its reels)."""
    bars = [b for b in re.split(r"\|", tune_body(tune)) if re.search(r"[A-Ga-g]", b)]
    return sum(">" in b or "<" in b for b in bars) >= max(1, len(bars)) / 2


TYPE_MARKS = {  # a type -> what it looks like on the page, as a test of one tune
    "jig": ("in 6/8", lambda t: header_field(t, "M") == "6/8"),
    "slip jig": ("in 9/8", lambda t: header_field(t, "M") == "9/8"),
    "reel": ("in C| or 2/4", lambda t: header_field(t, "M") in ("C|", "2/4")),
    "hornpipe": ("dotted rhythm", dotted_rhythm),
}


def type_sweep(generate_fn, opts, corpus_tunes: list[str], types=tuple(TYPE_MARKS), log=print) -> list[dict]:
    """For each type (of TYPE_MARKS): the share of tunes with its mark, in the corpus's tunes of
    that type, in tunes written with R: of that type primed, and in tunes written without."""
    unprimed = generate_fn(replace(opts, prompt="", form="", constrained=False))
    rows = []
    for name in types:
        mark, test = TYPE_MARKS[name]
        typed = [t for t in corpus_tunes if header_field(t, "R") == name]
        primed = generate_fn(replace(opts, prompt=f"X:1\nR:{name}\n", form="", constrained=False))
        rows.append({"type": name, "mark": mark, "corpus_tunes": len(typed),
                     "corpus": float(np.mean([test(t) for t in typed])) if typed else None,  # JSON null
                     "primed": float(np.mean([test(t) for t in primed])),
                     "unprimed": float(np.mean([test(t) for t in unprimed]))})
        log(", ".join(f"{k} {v}" for k, v in rows[-1].items()))
    return rows


def percent(share: float) -> str:
    """A share as a whole percentage, except that only all is 100% and only none 0% (665 of 668: 99.6%)."""
    text = f"{share:.0%}"
    if text not in ("0%", "100%") or share in (0, 1):
        return text
    return f"{share:.1%}".replace("100.0%", ">99.9%").replace("0.0%", "<0.1%")


def markdown_table(rows: list[dict], columns: list[tuple[str, str]], shares: set[str]) -> str:
    """rows as a Markdown table: (key, heading) columns; keys in shares as percentages."""
    columns = [(key, name) for key, name in columns if key in rows[0]]
    lines = ["| " + " | ".join(name for _, name in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = ["yes" if row[k] is True else "no" if row[k] is False else "n/a" if row[k] is None
                 else percent(row[k]) if k in shares
                 else f"{row[k]:.3g}" if isinstance(row[k], float) else str(row[k]).replace("|", "\\|")
                 for k, _ in columns]  # a bar line in a cell ("C|") would end it
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def form_table(rows: list[dict]) -> str:
    return markdown_table(rows, [("request", "sections x bars"), ("meter", "meter"), ("constrained", "constrained"),
                                 ("sections", "sections match"), ("bars", "bars match"), ("code", "whole code matches"),
                                 ("valid", "valid"), ("bar_clean", "bar-clean")],
                          {"sections", "bars", "code", "valid", "bar_clean"})


def type_table(rows: list[dict]) -> str:
    return markdown_table(rows, [("type", "--type"), ("mark", "share of tunes"), ("corpus", "corpus, that type"),
                                 ("primed", "written with --type"), ("unprimed", "written without")],
                          {"corpus", "primed", "unprimed"})


# -----------------------------------------------------------------------------
# the commands: sweep, forms, types (musicrnn.py's parser holds them; torch is musicrnn.py's)


def add_commands(sub, command) -> None:
    """The three judging commands on musicrnn.py's subparsers; command(sub, name, what) makes one."""
    sweep_parser = judging_parser(sub, command, "sweep", "judge generated tunes per temperature, free and "
                                                         "--constrained (abc2midi)", outputs="--out and --plot")
    sweep_parser.add_argument("--train-data", default="data/train.json",
                              help="the training tunes, for pitch classes and copying (default: data/train.json)")
    sweep_parser.add_argument("--max-tokens", type=cli.int_in(AbcConstraint.END_RESERVE, 100_000), default=1000,
                              help=f"tokens per tune at most (default 1000; at least {AbcConstraint.END_RESERVE}, "
                                   f"which the constrained rows keep to finish a tune)")
    sweep_parser.add_argument("--plot", help="also draw the table against the temperature to this .png file")
    sweep_parser.add_argument("--temperatures", type=sampler.TEMPERATURE, nargs="+", default=[0.5, 0.8, 1.0, 1.2],
                              help="one row pair (free, constrained) per temperature, each 0.01-100 "
                                   "(default: 0.5 0.8 1.0 1.2)")
    requests = ", ".join("+".join(map(str, bars)) + (f" in {meter}" if meter else "") for bars, meter in FORM_REQUESTS)
    forms = judging_parser(sub, command, "forms", f"how often tunes hold the form asked for, free and --constrained, "
                                                  f"with abc2midi's verdict; the requests (bars per section): {requests}")
    types = judging_parser(sub, command, "types", "how often tunes written with --type look like the corpus's "
                                                  "tunes of that type (jigs in 6/8, hornpipes dotted, ...), against "
                                                  "tunes written without")
    for p in (forms, types):
        p.add_argument("--temperature", type=sampler.TEMPERATURE, default=1.0,
                       help="divides the logits before each draw, 0.01-100 (default 1.0)")
    types.add_argument("--train-data", default="data/train.json",
                       help="the corpus whose typed tunes set the reference shares (default: data/train.json)")


def judging_parser(sub, command, name: str, what: str, outputs: str = "--out"):
    """A judging command, with the flags they all share: the model, how many tunes, the seed, the output."""
    p = command(sub, name, what)
    model = p.add_mutually_exclusive_group()  # one model: a --checkpoint beside --onnx would go unread
    model.add_argument("--checkpoint", default="runs/best.pt", help="the model, with torch (default: runs/best.pt)")
    model.add_argument("--onnx", help="generate through onnxruntime with this exported model instead of torch")
    p.add_argument("--num", type=cli.int_in(1, 10_000), default=50, help="tunes per row of the table, 1-10000 (default 50)")
    p.add_argument("--seed", type=sampler.SEED, default=0, help="seeds the draws of every row (default 0)")
    p.add_argument("--out", default=f"runs/{name}.json", help=f"the table as JSON (default: runs/{name}.json)")
    p.add_argument("--overwrite", action="store_true", help=f"let {outputs} replace existing files")
    return p


def run_command(args, torch_generator) -> None:
    """sweep, forms or types: read the corpus and check --out, load the model as generate_fn(options)
    -> tunes (torch_generator(checkpoint), or onnxruntime with --onnx), judge, print the table,
    write it as JSON."""
    inputs = [args.train_data] if "train_data" in args else []  # sweep and types read a corpus
    corpus = load_tunes(inputs[0]) if inputs else []              # refused before the model loads
    model = args.checkpoint if args.onnx is None else args.onnx  # --onnx '' is a model named wrong, not none
    out = check_output(args.out, "--out", args.overwrite, inputs=[model, *inputs], suffix=".json")
    plot = plots.checked_plot_path(args.plot, args.overwrite, [model, *inputs, out]) \
        if getattr(args, "plot", None) is not None else None  # sweep's alone
    judge, table = {"sweep": (judge_sweep, sweep_table), "forms": (judge_forms, form_table),
                    "types": (judge_types, type_table)}[args.command]
    generate_fn, facts = torch_generator(model) if args.onnx is None else onnx_generator(model)
    rows = judge(args, corpus, generate_fn, facts)
    print(table(rows))
    write_atomic(out, json.dumps(rows, indent=2).encode(), args.overwrite)
    print(f"written to {out}")
    if plot:
        plots.plot_sweep(rows, plot, args.overwrite)
        print(f"plot written to {plot}")


def judge_sweep(args, corpus: list[str], generate_fn, facts) -> list[dict]:
    twice = sorted({t for t in args.temperatures if args.temperatures.count(t) > 1})
    if twice:  # the same rows again, drawn from the same seed: nothing new, minutes spent
        raise UserError(f"--temperatures gives {twice[0]:g} more than once: each row pair is measured once")
    opts = sampler.SamplingOptions(num=args.num, seed=args.seed, max_tokens=args.max_tokens)
    return sweep(generate_fn, opts, corpus, args.temperatures)


def judge_forms(args, corpus: list[str], generate_fn, facts, log=print) -> list[dict]:
    if not facts.control_codes:  # the free rows are then its base rate, the same tunes for every request
        log("this model was trained without control codes (train --control): its free rows never read the "
            "form asked for; only the constrained rows are held to it")
    return form_sweep(generate_fn, sampler.SamplingOptions(num=args.num, seed=args.seed, temperature=args.temperature))


def judge_types(args, corpus: list[str], generate_fn, facts: sampler.ModelFacts, log=print) -> list[dict]:
    if facts.control_codes:
        raise UserError("types measures a model trained without --control (one with codes needs a form too)")
    types = [name for name in TYPE_MARKS if name in facts.tune_types]
    if not types:
        raise UserError(f"the model knows none of the types measured ({', '.join(TYPE_MARKS)})")
    unknown = [name for name in TYPE_MARKS if name not in types]
    if unknown:  # --type refuses a type its training tunes never named: there is no row to measure
        log(f"the model knows no {' or '.join(unknown)} (its training tunes name none): "
            f"{'that row is' if len(unknown) == 1 else 'those rows are'} left out")
    opts = sampler.SamplingOptions(num=args.num, seed=args.seed, temperature=args.temperature)
    return type_sweep(generate_fn, opts, corpus, types)


def onnx_generator(path: str):
    """(generate_fn, facts) for an exported model, through onnxruntime."""
    import exported_model  # onnxruntime, imported only when a command asks for it

    session, vocab, config = exported_model.load_model(path)
    step, facts = exported_model.onnx_step(session, config), exported_model.model_facts(config)
    return (lambda opts: sampler.generate_tunes(step, vocab, opts, facts=facts)), facts
