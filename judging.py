"""
judging: how good are generated tunes, measured with abc2midi and with counts. Torch-free.

Holds:
- check_with_abc2midi, abc2midi_available: abc2midi (Debian package abcmidi), an independent
  ABC parser, says whether a tune is valid and whether its bars are full;
- tune_metrics: validity, bar-cleanness, length, diversity (distinct 4-grams), pitch classes
  against the training tunes, copying of a training tune's first 8 bars;
- sweep, sweep_table: those metrics per temperature, free and constrained, as a Markdown table;
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from abc_constraint import SECTION_ENDS
from abc_music import note_tokens, pitch_class, pitch_spelling, tune_body
from rendering import for_abc2midi

# -----------------------------------------------------------------------------
# abc2midi, the judge

_BAR_WARNING = re.compile(r"Bar \d+ has .* time units")


def abc2midi_available() -> bool:
    return shutil.which("abc2midi") is not None


def check_with_abc2midi(tune: str) -> dict:
    """Run abc2midi on one tune. It exits 0 even on errors, so its output is what counts.

    valid: a MIDI file is written and no "Error" line is printed (R:hornpipe aside: for_abc2midi).
    bar_clean: valid, and no "Bar N has X time units" warning (abc2midi does not warn
    about a pickup bar or the short last bar that completes it).
    """
    with tempfile.TemporaryDirectory() as tmp:
        src, midi = Path(tmp) / "tune.abc", Path(tmp) / "tune.mid"
        src.write_text(for_abc2midi(tune if tune.startswith("X:") else "X:1\n" + tune))
        result = subprocess.run(["abc2midi", str(src), "-o", str(midi)], capture_output=True, text=True, timeout=30)
        lines = (result.stdout + result.stderr).splitlines()
        valid = midi.exists() and midi.stat().st_size > 0 and not any("Error" in line for line in lines)
    bar_warnings = [line for line in lines if _BAR_WARNING.search(line)]
    return {"valid": valid, "bar_clean": valid and not bar_warnings, "messages": lines}


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
        "distinct_4grams": len(set(grams)) / max(1, len(grams)),
        # half the L1 distance: 0 = the training tunes' pitch-class mix, 1 = nothing in common
        "pitch_class_distance": 0.5 * float(np.abs(pitch_class_histogram(tunes) - train_hist).sum()),
        "copies_first_8_bars": float(np.mean([first_bars(t) in known_openings for t in tunes])),
    }
    if judge:
        results = [check_with_abc2midi(t) for t in tunes]
        metrics["valid"] = float(np.mean([r["valid"] for r in results]))
        metrics["bar_clean"] = float(np.mean([r["bar_clean"] for r in results]))
    return metrics


def sweep(generate_fn, opts, training_tunes: list[str], temperatures=(0.5, 0.8, 1.0, 1.2),
          log=print) -> list[dict]:
    """generate_fn(options) -> tunes, for each setting of the table: opts (a
    sampler.SamplingOptions) at each temperature, free and constrained."""
    judge = abc2midi_available()
    if not judge:
        log("abc2midi is not installed (apt-get install abcmidi): the valid and bar-clean columns are missing")
    rows = []
    for temperature in temperatures:
        for constrained in (False, True):
            tunes = generate_fn(replace(opts, temperature=temperature, constrained=constrained))
            rows.append({"temperature": temperature, "constrained": constrained,
                         **tune_metrics(tunes, training_tunes, judge)})
            log(f"temperature {temperature} {'constrained' if constrained else 'free':>11}: "
                + ", ".join(f"{k} {v:.3g}" for k, v in rows[-1].items() if k not in ("temperature", "constrained")))
    return rows


def sweep_table(rows: list[dict]) -> str:
    columns = [("temperature", "T"), ("constrained", "constrained"), ("valid", "valid"), ("bar_clean", "bar-clean"),
               ("min16_notes", ">=16 notes"), ("section_end", "ends a section"), ("mean_notes", "notes/tune"),
               ("distinct_4grams", "distinct 4-grams"), ("pitch_class_distance", "pitch-class dist."),
               ("copies_first_8_bars", "copies 8 bars")]
    columns = [(k, name) for k, name in columns if k in rows[0]]
    lines = ["| " + " | ".join(name for _, name in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for key, _ in columns:
            value = row[key]
            cells.append("yes" if value is True else "no" if value is False else
                         f"{value:.0%}" if key in ("valid", "bar_clean", "min16_notes", "section_end",
                                                   "copies_first_8_bars") else f"{value:.3g}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
