"""
plots: corpus statistics and the pictures, written as PNG files (matplotlib, no display).

Holds:
- corpus_stats: tunes, characters, tune lengths, the most frequent ABC tokens, tune types and forms;
- stats_text: those figures as `musicrnn.py stats` prints them;
- plot_stats: the length histogram and the token counts;
- plot_history: the training and validation loss per epoch (runs/loss.png);
- plot_sweep: what the temperature does to the tunes, free and --constrained (`sweep --plot`);
- checked_plot_path: a --plot file name, checked before any work as every output is.
"""

from __future__ import annotations

import io
import os
from collections import Counter
from pathlib import Path

import numpy as np

from abc_form import sections
from abc_music import header_field
from abc_tokens import tokenize_abc
from safe_write import check_output, write_atomic


def corpus_stats(tunes: list[str]) -> dict:
    """Tunes, characters, lengths and the most frequent ABC tokens of a collection."""
    char_lengths = np.array([len(t) for t in tunes])
    token_lists = [tokenize_abc(t) for t in tunes]
    token_lengths = np.array([len(t) for t in token_lists])
    counts = Counter(tok for toks in token_lists for tok in toks)
    return {
        "tunes": len(tunes),
        "unique_chars": len({c for t in tunes for c in t}),
        "unique_tokens": len(counts),
        "chars": {"max": int(char_lengths.max()), "mean": float(char_lengths.mean()),
                  "median": float(np.median(char_lengths))},
        "tokens": {"max": int(token_lengths.max()), "mean": float(token_lengths.mean()),
                   "median": float(np.median(token_lengths))},
        "top_tokens": counts.most_common(20),
        "types": Counter(header_field(t, "R") or "none" for t in tunes).most_common(),
        "forms": Counter("+".join(str(s.bars) for s in sections(t)) for t in tunes).most_common(12),
        "_char_lengths": char_lengths, "_token_lengths": token_lengths,
    }


def stats_text(stats: dict) -> str:
    """corpus_stats as the lines that `musicrnn.py stats` prints."""
    lines = [f"tunes            {stats['tunes']:,}", f"unique chars     {stats['unique_chars']}",
             f"unique tokens    {stats['unique_tokens']:,}"]
    for unit in ("chars", "tokens"):
        s = stats[unit]
        lines.append(f"{f'length ({unit})':<17}max {s['max']:,}  mean {s['mean']:.1f}  median {s['median']:.0f}")
    lines.append("top 20 tokens    " + "  ".join(f"{tok!r}:{n:,}" for tok, n in stats["top_tokens"]))
    lines.append("tune types (R:)  " + "  ".join(f"{name}:{n:,}" for name, n in stats["types"]))
    lines.append("forms (bars per section, sections joined by +)    "
                 + "  ".join(f"{form}:{n:,}" for form, n in stats["forms"]))
    return "\n".join(lines)


def plot_stats(stats: dict, path: Path, overwrite: bool = True) -> None:
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.hist(stats["_char_lengths"], bins=60, alpha=0.6, label="characters")
    ax1.hist(stats["_token_lengths"], bins=60, alpha=0.6, label="ABC tokens")
    ax1.set(title=f"Tune length ({stats['tunes']} tunes)", xlabel="length", ylabel="tunes")
    ax1.legend()
    names, counts = zip(*stats["top_tokens"])
    ax2.bar(range(len(names)), counts)
    ax2.set_xticks(range(len(names)), [repr(n)[1:-1] for n in names], rotation=60)
    ax2.set(title="The 20 most frequent ABC tokens", ylabel="count")
    fig.tight_layout()
    save_figure(fig, path, overwrite)


SWEEP_PANELS = [  # (title, [(row key, label)], y axis): one panel each, a line per key and side
    ("abc2midi's verdict", [("valid", "valid"), ("bar_clean", "bar-clean")], "share of tunes"),
    ("novelty", [("distinct_4grams", "distinct 4-grams"), ("copies_first_8_bars", "copies 8 bars")], "share"),
    ("against the corpus", [("pitch_class_distance", "pitch-class distance")], "distance"),
]


def plot_sweep(rows: list[dict], path: Path, overwrite: bool = False) -> None:
    """sweep's rows against the temperature: free draws solid, --constrained dashed; a figure abc2midi
    could not judge (None) is left out."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(SWEEP_PANELS), figsize=(13, 3.8))
    for ax, (title, series, ylabel) in zip(axes, SWEEP_PANELS):
        for i, (key, label) in enumerate(series):
            for constrained, style in ((False, "o-"), (True, "s--")):
                points = [(r["temperature"], r[key]) for r in rows if r["constrained"] == constrained
                          and r.get(key) is not None]
                if points:
                    ax.plot(*zip(*points), style, color=f"C{i}",
                            label=f"{label}, {'constrained' if constrained else 'free'}")
        ax.set(title=title, xlabel="temperature", ylabel=ylabel)
        if ylabel.startswith("share"):  # a line at 100% stays inside the frame
            ax.set_ylim(-0.03, 1.03)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, overwrite)


def checked_plot_path(plot: str, overwrite: bool, inputs: list) -> Path:
    """--plot's file: a .png name, not an input, not an existing file unless overwrite (check_output)."""
    return check_output(plot, "--plot", overwrite, inputs=inputs, suffix=".png")


def pyplot():
    os.environ["MPLBACKEND"] = "Agg"  # before the import, which refuses a notebook's (Jupyter sets it for its kernels)
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, overwrite: bool = True) -> None:
    """The figure as a PNG at path, written atomically (safe_write)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    pyplot().close(fig)
    write_atomic(path, buffer.getvalue(), overwrite)


def plot_history(history: list[dict], path: Path) -> None:
    if not history:
        return
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [h["epoch"] - 1 + h.get("epoch_share", 1.0) for h in history]  # an epoch cut short: where it stopped
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train (with dropout)")
    ax.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    ax.set(xlabel="epoch", ylabel="cross-entropy per token (nats)", title="musicrnn training")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
