"""
musicrnn: an LSTM that learns folk tunes written in ABC notation and writes new ones.

The whole pipeline, in reading order: data -> vocabulary and tokenizer -> dataset ->
model -> training and evaluation -> sampling -> judging tunes with abc2midi ->
augmentation -> command line. The torch-free pieces that generation also needs without
torch (the ABC tokenizer, the vocabulary, the sampler, the constraint automaton) live in
abctext.py, which infer_onnx.py imports too.

    make train                                   # venv, data, train, export, one tune
    make train-long                              # the long-run model in runs/long/ (<= 60 min)
    python musicrnn.py stats --data data/train.json --plot runs/stats.png
    python musicrnn.py train                     # the default config, runs/best.pt
    python musicrnn.py train --augment-key 0.5 --out runs/augmented
    python musicrnn.py evaluate --checkpoint runs/best.pt --data data/validation.json
    python musicrnn.py generate --checkpoint runs/best.pt --num 5 --meter 6/8 --key D --constrained
    python musicrnn.py sweep --onnx runs/musicrnn.onnx  # validity per temperature, with abc2midi
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, fields
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import abctext
from abctext import Vocabulary, tokenize_abc


@dataclass
class Config:
    # data
    train_data: str = "data/train.json"         # IrishMAN JSON, any pandas path, .abc file or folder
    val_data: str = "data/validation.json"      # the same, for validation
    limit: int | None = None                    # use only the first N training tunes (None = all)
    tokenizer: str = "char"                     # "char" (measured better, README) or "abc" (musical tokens)
    min_count: int = 3                          # a whole token joins the vocabulary at this many uses
    augment_key: float = 0.0                    # each epoch, this share of training tunes moves to a random key
    augment_unit: float = 0.0                   # each epoch, this share is rewritten in a random unit length
    transpose_range: str = "G,..c'''"           # --augment-key refuses shifts that leave this range
    # model
    embedding_dim: int = 128                    # size of a token's embedding
    hidden_dim: int = 256                       # LSTM state size (512 scored the same, generates 4x slower)
    num_layers: int = 1                         # stacked LSTM layers
    dropout: float = 0.2                        # on the embedding, between layers and before the output
    # optimisation
    batch_size: int = 32                        # tunes per batch (grouped by length, so little padding)
    lr: float = 4e-3                            # peak learning rate of Adam
    schedule: str = "cosine"                    # "cosine" (warm-up then decay) or "plateau" (halve when stuck)
    warmup_steps: int = 50                      # linear warm-up, cosine schedule only
    epochs: int = 28                            # passes over the training tunes (~10 min on 2 cores)
    patience: int = 3                           # stop after this many epochs without a better val loss
    grad_clip: float = 1.0                      # max global gradient norm
    max_minutes: float = 10.0                   # wall-clock budget for training; stops cleanly after it
    # run
    out_dir: str = "runs"                       # best.pt, last.pt, loss.png go here
    seed: int = 1337                            # seeds python, numpy and torch
    device: str = "auto"                        # "auto", "cpu" or "cuda"


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2, no traceback."""


# -----------------------------------------------------------------------------
# data: IrishMAN JSON records, or ABC tunebooks normalised into that form

_FIELD_LINE = re.compile(r"^([A-Za-z]):(?![|:])(.*)$")     # "K: G", not the body line "G:|"
_QUOTED = re.compile(r'"[^"\n]*"')
# A chord symbol ("Am", "G/B", "D7", "Bbmaj7") is music; any other quoted string is an
# annotation ("^text", "_mf") or a fingering ("4") and is dropped.
_CHORD_SYMBOL = re.compile(
    r'"\(?[A-G][#b]?(?:m(?!aj)|min|maj|M|dim|aug|sus|add|\+|o)?\d*(?:(?:sus|add|b|#)\d+)*'
    r'(?:/[A-Ga-g][#b]?)?\)?"')


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


def clean_body_line(line: str) -> str:
    """Drop comments, annotations, fingerings, spacers and line continuations; keep the music."""
    line = line.split("%", 1)[0].replace("`", "")
    line = _QUOTED.sub(lambda m: m.group() if _CHORD_SYMBOL.fullmatch(m.group()) else "", line)
    line = line.rstrip().removesuffix("\\")
    return re.sub(r"[ \t]+", " ", line).strip()


def normalize_tune(lines: list[str]) -> str | None:
    """One tune's lines -> IrishMAN form (X:1, L:, M:, K:, body), or None to skip it.

    Skipped: tunes with several voices (V:), with no K: line, or with no notes.
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
    if "K" not in header or not any(kind == "note" for _, kind in abctext.tokenize_abc_kinds("\n".join(body))):
        return None
    head = ["X:1"] + [f"{k}:{header[k]}" for k in "LMK" if k in header]
    return "\n".join(head + body) + "\n"


def read_tunebook(text: str) -> list[str]:
    """All usable tunes of an ABC tunebook, normalised, in order."""
    return [t for t in (normalize_tune(lines) for lines in split_tunebook(text)) if t is not None]


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def load_tunes(path: str) -> list[str]:
    """The "abc notation" texts of a collection.

    path: an IrishMAN-format JSON list of {"control code", "abc notation"} records (any
    path pandas can open, hf://datasets/... included), an .abc tunebook, or a folder of them.
    """
    p = Path(path)
    is_remote = "://" in path
    if not is_remote and not p.exists():
        raise UserError(f"{path}: no such file or folder")
    if p.is_dir():
        books = sorted(p.rglob("*.abc"))
        tunes = [t for book in books for t in read_tunebook(read_text(book))]
    elif p.suffix.lower() == ".abc":
        tunes = read_tunebook(read_text(p))
    else:
        tunes = read_irishman_json(path)
    if not tunes:
        raise UserError(f"{path}: no tunes found")
    return tunes


def read_irishman_json(path: str) -> list[str]:
    import pandas as pd  # only this reader needs it; import costs ~0.5 s

    try:
        df = pd.read_json(path, dtype=False)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason})") from None
    except (ValueError, OSError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not an IrishMAN JSON list of records ({first_line})") from None
    except ImportError as e:
        raise UserError(f"{path}: pandas cannot open this path ({e})") from None
    if df.empty:
        return []
    if "abc notation" not in df.columns:
        raise UserError(f"{path}: records have no \"abc notation\" field (found: {', '.join(map(str, df.columns))})")
    return [str(t) for t in df["abc notation"] if isinstance(t, str) and t.strip()]


def write_irishman_json(path: Path, tunes: list[str]) -> None:
    records = [{"control code": "", "abc notation": t} for t in tunes]
    abctext.write_atomic(path, json.dumps(records, ensure_ascii=False, indent=0).encode("utf-8"))


def split_train_validation(tunes: list[str], val_percent: int = 5) -> tuple[list[str], list[str]]:
    """De-duplicate, then split by a hash of each tune's text: stable under reordering."""
    unique = list(dict.fromkeys(tunes))
    in_val = [int(hashlib.sha256(t.encode()).hexdigest(), 16) % 100 < val_percent for t in unique]
    return ([t for t, v in zip(unique, in_val) if not v], [t for t, v in zip(unique, in_val) if v])


def corpus_stats(tunes: list[str]) -> dict:
    """The report's figures: tunes, characters, lengths and the most frequent tokens."""
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
        "_char_lengths": char_lengths, "_token_lengths": token_lengths,
    }


def plot_stats(stats: dict, path: Path) -> None:
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
    save_figure(fig, path)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


# -----------------------------------------------------------------------------
# vocabulary and tokenizer
# The report's character path, kept as the teaching path. The Vocabulary class of
# abctext generalises it to ABC tokens: with tokenizer="char" its index IS char_to_idx.


def char_to_idx(texts: list[str]) -> dict[str, int]:
    """Sorted unique characters -> index."""
    return {ch: i for i, ch in enumerate(sorted({ch for t in texts for ch in t}))}


def idx_to_char(char_index: dict[str, int]) -> list[str]:
    return sorted(char_index, key=char_index.get)


def vectorize_string(text: str, char_index: dict[str, int]) -> list[int]:
    return [char_index[ch] for ch in text]


def pad_or_truncate(ids: list[int], length: int, pad_id: int) -> list[int]:
    """Exactly `length` ids: cut the tail, or fill it with pad_id."""
    return list(ids[:length]) + [pad_id] * max(0, length - len(ids))


# -----------------------------------------------------------------------------
# dataset: (x, y) shifted by one, batched by length so that padding costs little


class MusicDataset(torch.utils.data.Dataset):
    """Each tune as <eos> tune <eos>: x = all but the last id, y = all but the first.

    The leading <eos> is the start symbol, so the model is scored on every token of
    the tune, its first one and its end included.
    """

    def __init__(self, tunes: list[str], vocab: Vocabulary):
        self.sequences = [[vocab.eos_id] + vocab.encode(t) + [vocab.eos_id] for t in tunes]
        self.chars = sum(len(t) for t in tunes)
        self.unknown = sum(seq.count(vocab.unk_id) for seq in self.sequences)

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i: int) -> tuple[list[int], list[int]]:
        seq = self.sequences[i]
        return seq[:-1], seq[1:]

    def lengths(self) -> np.ndarray:
        return np.array([len(s) - 1 for s in self.sequences])


def length_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    """Index batches of tunes of similar length, in random order when rng is given.

    Shuffle, then sort by length in buckets of 16 tokens: batches differ from epoch to
    epoch, yet each pads only to the longest of its near neighbours.
    """
    order = rng.permutation(len(lengths)) if rng is not None else np.arange(len(lengths))
    order = order[np.argsort(lengths[order] // 16, kind="stable")]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def collate(items: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(x) for x, _ in items)
    x = torch.tensor([pad_or_truncate(x, length, pad_id) for x, _ in items])  # (B, T)
    y = torch.tensor([pad_or_truncate(y, length, pad_id) for _, y in items])  # (B, T)
    return x, y


def padding_fraction(lengths: np.ndarray, batches: list[np.ndarray]) -> float:
    padded = sum(len(b) * int(lengths[b].max()) for b in batches)
    return 1.0 - int(lengths.sum()) / padded


# -----------------------------------------------------------------------------
# model


class MusicRNN(nn.Module):
    """Embedding -> LSTM -> Linear, over token ids. forward(x, state) -> (logits, state)."""

    def __init__(self, vocab_size: int, embedding_dim: int = 128, hidden_dim: int = 512,
                 num_layers: int = 1, dropout: float = 0.0):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.lstm = nn.LSTM(embedding_dim, hidden_dim, num_layers, batch_first=True,
                            dropout=dropout if num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)
        self.to_logits = nn.Linear(hidden_dim, vocab_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The report's init (xavier Linear, orthogonal LSTM, zero biases) plus forget-gate bias 1."""
        nn.init.xavier_uniform_(self.to_logits.weight)
        nn.init.zeros_(self.to_logits.bias)
        hidden = self.lstm.hidden_size
        for name, param in self.lstm.named_parameters():
            if name.startswith("weight"):
                nn.init.orthogonal_(param)
            else:
                nn.init.zeros_(param)
                if name.startswith("bias_ih"):
                    # gates are stacked (input, forget, cell, output): open the forget gate, so
                    # the cell state starts out remembering and gradients flow through time
                    param.data[hidden:2 * hidden].fill_(1.0)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None):
        emb = self.dropout(self.embedding(x))          # (B, T, E)
        out, state = self.lstm(emb, state)             # (B, T, H), ((L, B, H), (L, B, H))
        logits = self.to_logits(self.dropout(out))     # (B, T, V)
        return logits, state


def parameter_summary(model: MusicRNN) -> str:
    """The report's table: layer, output shape, parameters.

    For vocab 682, emb 128, hidden 512, 1 layer the total is 1,751,978 =
    87,296 + 1,314,816 + 349,866. The report printed 1,747,522: it counted one LSTM bias
    vector where PyTorch keeps two (b_ih and b_hh, 2 x 4 x 512 = 4,096), and it
    miscounted the Linear layer (512 x 682 + 682 = 349,866).
    """
    rows = [
        ("embedding", f"(B, T, {model.embedding.embedding_dim})", model.embedding),
        ("lstm", f"(B, T, {model.lstm.hidden_size})", model.lstm),
        ("to_logits", f"(B, T, {model.to_logits.out_features})", model.to_logits),
    ]
    lines = [f"{'layer':<12}{'output shape':<18}{'parameters':>12}"]
    for name, shape, module in rows:
        lines.append(f"{name:<12}{shape:<18}{sum(p.numel() for p in module.parameters()):>12,}")
    lines.append(f"{'total':<30}{sum(p.numel() for p in model.parameters()):>12,}")
    return "\n".join(lines)


def build_model(cfg: Config, vocab_size: int) -> MusicRNN:
    return MusicRNN(vocab_size, cfg.embedding_dim, cfg.hidden_dim, cfg.num_layers, cfg.dropout)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here")
    return torch.device(name)


# -----------------------------------------------------------------------------
# checkpoints: plain dicts of tensors and builtins, loadable with weights_only=True


def save_checkpoint(path: Path, model: MusicRNN, optimizer, cfg: Config, vocab: Vocabulary,
                    epoch: int, step: int, best_val_loss: float, history: list[dict], lr_scale: float) -> None:
    ckpt = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "config": asdict(cfg), "vocab": vocab.to_dict(),
        "epoch": epoch, "step": step, "best_val_loss": best_val_loss,
        "history": history, "lr_scale": lr_scale,
    }
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    abctext.write_atomic(path, buffer.getvalue())  # a crash mid-write never leaves half a checkpoint


CHECKPOINT_KEYS = {"model", "config", "vocab", "optimizer", "epoch", "step", "best_val_loss"}


def load_checkpoint(path: str, device: torch.device | str = "cpu") -> dict:
    """Load a checkpoint dict. Refuses anything that is not one: never unpickles code."""
    if not Path(path).is_file():
        raise UserError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated zip, pickled object, foreign format: all the same to a user
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a readable musicrnn checkpoint ({reason})") from None
    if not isinstance(ckpt, dict) or not CHECKPOINT_KEYS <= ckpt.keys():
        raise UserError(f"{path}: not a musicrnn checkpoint (missing {sorted(CHECKPOINT_KEYS - set(ckpt or {}))})"
                        if isinstance(ckpt, dict) else f"{path}: not a musicrnn checkpoint")
    return ckpt


def config_from_dict(values: dict) -> Config:
    """The Config a checkpoint stored; keys that this version no longer has are dropped."""
    known = {f.name for f in fields(Config)}
    return Config(**{k: v for k, v in values.items() if k in known})


def model_from_checkpoint(ckpt: dict, path: str = "checkpoint") -> tuple[MusicRNN, Config, Vocabulary]:
    try:
        cfg = config_from_dict(ckpt["config"])
        vocab = Vocabulary.from_dict(ckpt["vocab"])
        model = build_model(cfg, len(vocab))
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0][:120]
        raise UserError(f"{path}: checkpoint does not match musicrnn's model ({reason})") from None
    return model.eval(), cfg, vocab


# -----------------------------------------------------------------------------
# training and evaluation


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def batch_loader(dataset: MusicDataset, batch_size: int, pad_id: int, rng: np.random.Generator | None):
    batches = length_batches(dataset.lengths(), batch_size, rng)
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches,
                                       collate_fn=lambda items: collate(items, pad_id)), batches


@torch.no_grad()
def evaluate(model: MusicRNN, dataset: MusicDataset, pad_id: int, device: torch.device,
             batch_size: int = 32) -> dict:
    """Loss per token, perplexity and bits per character over whole tunes.

    bits/char = total negative log-likelihood in bits (every token, each tune's <eos>
    included) / characters of the tunes' text. It does not depend on the tokenizer.
    """
    model.eval()
    loader, _ = batch_loader(dataset, batch_size, pad_id, rng=None)
    total_nll, total_tokens = 0.0, 0
    for x, y in loader:
        logits, _ = model(x.to(device))                                   # (B, T, V)
        nll = F.cross_entropy(logits.flatten(0, 1).float(), y.to(device).flatten(),
                              ignore_index=pad_id, reduction="sum")
        total_nll += nll.item()
        total_tokens += int((y != pad_id).sum())
    loss = total_nll / total_tokens
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_char": total_nll / math.log(2) / dataset.chars,
            "tunes": len(dataset), "chars": dataset.chars, "tokens": total_tokens, "unknown": dataset.unknown}


def learning_rate(cfg: Config, step: int, total_steps: int, lr_scale: float, time_used: float = 0.0) -> float:
    """Cosine: linear warm-up, then cosine decay to 5% of the peak. Plateau: peak x lr_scale.

    The cosine follows the steps, or the time budget (time_used = its fraction spent) when the
    run is behind it: on a slower machine the rate still anneals before --max-minutes stops the
    run. Steps and time are both counted from the start, warm-up included, so a run that keeps
    ahead of its budget depends on the seed alone, never on the clock.
    """
    if cfg.schedule == "plateau":
        return cfg.lr * lr_scale
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    done = max(step / total_steps, time_used)  # share of the run behind us: by steps, or by the clock if slower
    warmup = cfg.warmup_steps / total_steps
    progress = min(1.0, max(0.0, (done - warmup) / max(1e-9, 1.0 - warmup)))
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def log_line(*args) -> None:
    print(*args, flush=True)  # one line per epoch, visible at once even when piped to a file


def train(cfg: Config, resume: bool = False, overwrite: bool = False, tensorboard: bool = False,
          log=log_line) -> dict:
    """Train with early stopping; write best.pt and last.pt to cfg.out_dir. Returns the final metrics."""
    out = Path(cfg.out_dir)
    last_path, best_path = out / "last.pt", out / "best.pt"
    ckpt = load_checkpoint(str(last_path)) if resume else None
    if ckpt is None and not overwrite and (last_path.exists() or best_path.exists()):
        raise UserError(f"{out}/ already holds checkpoints: pass --resume to continue them, "
                        f"--overwrite to replace them, or --out DIR for a new run")
    if ckpt is not None:
        cfg = config_from_dict({**ckpt["config"], "max_minutes": cfg.max_minutes, "device": cfg.device,
                                "epochs": max(cfg.epochs, ckpt["config"]["epochs"]), "out_dir": cfg.out_dir})
    if cfg.tokenizer not in abctext.TOKENIZERS:
        raise UserError(f"--tokenizer must be one of {', '.join(abctext.TOKENIZERS)}")
    if not (0 <= cfg.augment_key <= 1 and 0 <= cfg.augment_unit <= 1):
        raise UserError("--augment-key and --augment-unit are shares between 0 and 1")
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)

    train_tunes, val_tunes = load_tunes(cfg.train_data), load_tunes(cfg.val_data)
    if cfg.limit:
        train_tunes = train_tunes[: cfg.limit]
    vocab = Vocabulary.from_dict(ckpt["vocab"]) if ckpt else Vocabulary.build(train_tunes, cfg.tokenizer, cfg.min_count)
    train_set, val_set = MusicDataset(train_tunes, vocab), MusicDataset(val_tunes, vocab)
    model = build_model(cfg, len(vocab)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    epoch, step, best_val, history, lr_scale = 0, 0, math.inf, [], 1.0
    if ckpt:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        epoch, step, best_val = ckpt["epoch"], ckpt["step"], ckpt["best_val_loss"]
        history, lr_scale = list(ckpt.get("history", [])), ckpt.get("lr_scale", 1.0)
        log(f"resuming {last_path} after epoch {epoch} (best val loss {best_val:.4f})")

    batches_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total_steps = cfg.epochs * batches_per_epoch
    log(f"{len(train_set)} training tunes, {len(val_set)} validation tunes, vocabulary {len(vocab)} "
        f"({cfg.tokenizer} tokens), device {device}")
    log(parameter_summary(model))
    writer = tensorboard_writer(out) if tensorboard else None
    from tqdm import tqdm

    transpose_range = parse_range(cfg.transpose_range)  # refuse a bad --transpose-range before training
    start, stale = time.time(), 0
    out_of_time = False
    while epoch < cfg.epochs and not out_of_time:
        rng = np.random.default_rng(cfg.seed + epoch)  # per-epoch seeds: --resume replays exactly
        torch.manual_seed(cfg.seed + epoch)
        if cfg.augment_key or cfg.augment_unit:  # the training split only; validation stays as written
            augmented = [augment_tune(t, rng, cfg.augment_key, cfg.augment_unit, *transpose_range)
                         for t in train_tunes]
            train_set = MusicDataset([t for t, _ in augmented], vocab)
            log(f"augmentation: {sum(r for _, r in augmented)} of {len(augmented)} transpositions refused "
                f"by the range guard {cfg.transpose_range}")
        loader, batches = batch_loader(train_set, cfg.batch_size, vocab.pad_id, rng)
        model.train()
        epoch_start, sum_loss, sum_tokens = time.time(), 0.0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=None, file=sys.stderr)
        for x, y in bar:
            x, y = x.to(device), y.to(device)                                  # (B, T)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, step, total_steps, lr_scale,
                                            (time.time() - start) / (cfg.max_minutes * 60))
            logits, _ = model(x)                                               # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=vocab.pad_id)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            n = int((y != vocab.pad_id).sum())
            sum_loss, sum_tokens, step = sum_loss + loss.item() * n, sum_tokens + n, step + 1
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if time.time() - start > cfg.max_minutes * 60:
                out_of_time = True
                break
        epoch += 1
        seconds = time.time() - epoch_start
        val = evaluate(model, val_set, vocab.pad_id, device)
        row = {"epoch": epoch, "step": step, "train_loss": sum_loss / max(1, sum_tokens), "val_loss": val["loss"],
               "val_bits_per_char": val["bits_per_char"], "tokens_per_s": sum_tokens / seconds,
               "padding": padding_fraction(train_set.lengths(), batches), "elapsed_s": time.time() - start,
               "lr": optimizer.param_groups[0]["lr"]}
        history.append(row)
        log(f"epoch {epoch:3d} | train loss {row['train_loss']:.4f} | val loss {val['loss']:.4f} | "
            f"val bits/char {val['bits_per_char']:.4f} | {row['tokens_per_s']:,.0f} tok/s | "
            f"padding {row['padding']:.1%} | lr {row['lr']:.2e} | {row['elapsed_s'] / 60:.1f} min"
            + (" (time budget reached)" if out_of_time else ""))
        if writer:
            for key in ("train_loss", "val_loss", "val_bits_per_char", "tokens_per_s"):
                writer.add_scalar(key, row[key], epoch)
        if val["loss"] < best_val:
            best_val, stale = val["loss"], 0
            save_checkpoint(best_path, model, optimizer, cfg, vocab, epoch, step, best_val, history, lr_scale)
        else:
            stale += 1
            lr_scale *= 0.5  # only the plateau schedule reads it
        save_checkpoint(last_path, model, optimizer, cfg, vocab, epoch, step, best_val, history, lr_scale)
        if stale >= cfg.patience and epoch < cfg.epochs:
            log(f"early stop: no better validation loss for {cfg.patience} epochs")
            break
    plot_history(history, out / "loss.png")
    log(f"best val loss {best_val:.4f}, checkpoints in {out}/, loss curve {out}/loss.png")
    return history[-1] if history else {}


def tensorboard_writer(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(out / "tensorboard"))


def plot_history(history: list[dict], path: Path) -> None:
    if not history:
        return
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train (with dropout)")
    ax.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    ax.set(xlabel="epoch", ylabel="cross-entropy per token (nats)", title="musicrnn training")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


# -----------------------------------------------------------------------------
# sampling: one token and (h, c) per step, through abctext's shared sampler


def torch_step(model: MusicRNN, device: torch.device):
    """The model as abctext.generate_ids wants it: (tokens (B, 1), state) -> (logits (B, V), state)."""

    @torch.no_grad()
    def step(tokens: np.ndarray, state):
        logits, state = model(torch.from_numpy(tokens).to(device), state)  # (B, 1, V)
        return logits[:, -1].float().cpu().numpy(), state

    return step


def generate(model: MusicRNN, vocab: Vocabulary, device: torch.device, num: int = 1, prompt: str = "",
             max_tokens: int = 1000, temperature: float = 1.0, top_k: int | None = None, seed: int = 0,
             constrained: bool = False, max_bars: int = 32) -> list[str]:
    """num tunes, each the prompt followed by what the model writes until <eos>."""
    return abctext.generate_tunes(torch_step(model.eval(), device), vocab, num, prompt, max_tokens, temperature,
                                  top_k, seed, constrained, max_bars)


# -----------------------------------------------------------------------------
# judging tunes with abc2midi, an independent ABC parser (Debian package abcmidi)

_BAR_WARNING = re.compile(r"Bar \d+ has .* time units")


def abc2midi_available() -> bool:
    return shutil.which("abc2midi") is not None


def check_with_abc2midi(tune: str) -> dict:
    """Run abc2midi on one tune. It exits 0 even on errors, so its output is what counts.

    valid: a MIDI file is written and no "Error" line is printed.
    bar_clean: valid, and no "Bar N has X time units" warning (abc2midi does not warn
    about a pickup bar or the short last bar that completes it).
    """
    with tempfile.TemporaryDirectory() as tmp:
        src, midi = Path(tmp) / "tune.abc", Path(tmp) / "tune.mid"
        src.write_text(tune if tune.startswith("X:") else "X:1\n" + tune)
        result = subprocess.run(["abc2midi", str(src), "-o", str(midi)], capture_output=True, text=True, timeout=30)
        lines = (result.stdout + result.stderr).splitlines()
        valid = midi.exists() and midi.stat().st_size > 0 and not any("Error" in line for line in lines)
    bar_warnings = [line for line in lines if _BAR_WARNING.search(line)]
    return {"valid": valid, "bar_clean": valid and not bar_warnings, "messages": lines}


def tune_body(tune: str) -> str:
    """The music after the K: line."""
    parts = re.split(r"(?m)^K:[^\n]*\n", tune, maxsplit=1)
    return parts[1] if len(parts) == 2 else tune


def note_tokens(tune: str) -> list[str]:
    return [t for t, kind in abctext.tokenize_abc_kinds(tune_body(tune)) if kind == "note"]


_NATURAL = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}  # pitch class of each letter


def pitch_class(note: str) -> int:
    """Written pitch class: letter and explicit accidental (the key signature is not applied)."""
    letter = next(ch for ch in note if ch.isalpha())
    shift = note.count("^") - note.count("_")
    return (_NATURAL[letter.upper()] + shift) % 12


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
    """The report's temperature table, with numbers: validity, bars, diversity, copying."""
    notes = [note_tokens(t) for t in tunes]
    pitches = [[abctext.pitch_spelling(n) for n in row] for row in notes]
    grams = [tuple(row[i:i + 4]) for row in pitches for i in range(len(row) - 3)]
    train_hist = pitch_class_histogram(training_tunes)
    known_openings = {first_bars(t) for t in training_tunes}
    metrics = {
        "tunes": len(tunes),
        "mean_notes": float(np.mean([len(row) for row in notes])) if tunes else 0.0,
        "min16_notes": float(np.mean([len(row) >= 16 for row in notes])) if tunes else 0.0,
        "section_end": float(np.mean([tune_body(t).rstrip().endswith(abctext.SECTION_ENDS) for t in tunes])),
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


def sweep(generate_fn, training_tunes: list[str], num: int, seed: int,
          temperatures=(0.5, 0.8, 1.0, 1.2), log=print) -> list[dict]:
    """generate_fn(num, temperature, seed, constrained) -> tunes, for each setting of the table."""
    judge = abc2midi_available()
    if not judge:
        log("abc2midi is not installed (apt-get install abcmidi): the valid and bar-clean columns are missing")
    rows = []
    for temperature in temperatures:
        for constrained in (False, True):
            tunes = generate_fn(num, temperature, seed, constrained)
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


# -----------------------------------------------------------------------------
# augmentation: transposition, rhythm and unit length, right by construction
#
# Every function rewrites the tokens of abctext's tokenizer and leaves all else as it is.
# Pitches are tracked the way ABC defines them: key signature, then accidentals that
# hold to the end of the bar for that pitch and octave. The tests check every function
# against abc2midi, an independent ABC parser.

_LETTERS = "CDEFGAB"
_LETTER_FIFTHS = [0, 2, 4, -1, 1, 3, 5]  # C D E F G A B as a major key: sharps (>0) or flats (<0)
_ALTERATION = {"^^": 2, "^": 1, "=": 0, "_": -1, "__": -2}
_ACCIDENTAL = {2: "^^", 1: "^", 0: "=", -1: "_", -2: "__"}
_MODES = {"": 0, "maj": 0, "ion": 0, "mix": -1, "dor": -2, "m": -3, "min": -3, "aeo": -3, "phr": -4, "loc": -5,
          "lyd": 1}  # fifths from the major key of the same tonic
_KEY = re.compile(r"\s*([A-G])([#b]?)\s*([A-Za-z]*)(.*)", re.S)
_CHORD_ROOT = re.compile(r'(")([A-G])([#b]?)([^"/]*)(?:/([A-G])([#b]?))?(")')


class TransposeError(ValueError):
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
        return {_LETTERS.index(ch): (1 if self.fifths > 0 else -1) for ch in order[:abs(self.fifths)]}

    def text(self) -> str:
        return _LETTERS[self.tonic] + {1: "#", -1: "b", 0: ""}[self.alter] + self.mode + self.rest


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
    mode = m.group(3)
    offset = _MODES.get(mode.lower()[:3] if len(mode) > 1 else mode.lower(), 0)
    tonic, alter = _LETTERS.index(m.group(1)), {"#": 1, "b": -1, "": 0}[m.group(2)]
    fifths = _LETTER_FIFTHS[tonic] + 7 * alter + offset
    return Key(tonic, alter, mode, m.group(4), fifths)


def transpose_key(key: Key, semitones: int) -> tuple[Key, int]:
    """The key a number of semitones away, spelled with the fewest accidentals, and the
    number of letter steps between the two tonics."""
    pitch = (_NATURAL[_LETTERS[key.tonic]] + key.alter + semitones) % 12
    best = None
    for steps in range(-7, 8):
        letter = (key.tonic + steps) % 7
        alter = (pitch - _NATURAL[_LETTERS[letter]] + 6) % 12 - 6
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
    return best[1], best[2]


def _letter_semitones(letter: int, steps: int) -> int:
    """Semitones between the natural notes `steps` letters apart, starting at `letter`."""
    start = _NATURAL[_LETTERS[letter]]
    total = letter + steps
    return _NATURAL[_LETTERS[total % 7]] + 12 * (total // 7) - start


@dataclass
class _Pitch:
    letter: int    # diatonic index from C of octave 0: octave * 7 + letter
    midi: int


def _note_pitch(acc, letter, octave_marks, signature, bar_alter) -> _Pitch:
    octave = (5 if letter.islower() else 4) + octave_marks.count("'") - octave_marks.count(",")
    index = _LETTERS.index(letter.upper())
    step = octave * 7 + index
    if acc:
        bar_alter[step] = _ALTERATION[acc]
    alter = bar_alter.get(step, signature.get(index, 0))
    return _Pitch(step, 12 * (octave + 1) + _NATURAL[letter.upper()] + alter)


def _spell(pitch: _Pitch, steps: int, semitones: int, signature, bar_alter) -> str:
    """The note `semitones` above pitch, on the letter `steps` above, with the accidental
    that this bar and key signature need (none where they already give it)."""
    step = pitch.letter + steps
    octave, index = divmod(step, 7)
    natural = 12 * (octave + 1) + _NATURAL[_LETTERS[index]]
    alter = pitch.midi + semitones - natural
    if abs(alter) > 2:  # only in keyless tunes: choose the nearest letter instead
        step += 1 if alter > 0 else -1
        octave, index = divmod(step, 7)
        natural = 12 * (octave + 1) + _NATURAL[_LETTERS[index]]
        alter = pitch.midi + semitones - natural
    accidental = ""
    if bar_alter.get(step, signature.get(index, 0)) != alter:
        accidental = _ACCIDENTAL[alter]
        bar_alter[step] = alter
    letter = _LETTERS[index] if octave <= 4 else _LETTERS[index].lower()
    marks = "," * max(0, 4 - octave) + "'" * max(0, octave - 5)
    return accidental + letter + marks


def _transpose_chord_symbol(text: str, semitones: int, sharps: bool) -> str:
    def name(letter: str, acc: str) -> str:
        pc = (_NATURAL[letter] + {"#": 1, "b": -1, "": 0}[acc] + semitones) % 12
        names = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"] if sharps else \
            ["C", "Db", "D", "Eb", "E", "F", "Gb", "G", "Ab", "A", "Bb", "B"]
        return names[pc]

    def repl(m: re.Match) -> str:
        bass = "/" + name(m.group(5), m.group(6)) if m.group(5) else ""
        return m.group(1) + name(m.group(2), m.group(3)) + m.group(4) + bass + m.group(7)

    return _CHORD_ROOT.sub(repl, text)


def transpose_tune(abc: str, semitones: int, low: int = 55, high: int = 108) -> str:
    """Transpose a whole tune chromatically: key, inline keys, notes, chords, chord symbols.

    Notes move to the letters of the new key (C -> D in a whole step), with only the
    accidentals the new key and bar need. Raises TransposeError when a note would leave
    [low, high] (MIDI; default G, to c''', 55..108).
    """
    if semitones == 0:
        _check_range(abc, 0, low, high)
        return abc
    new_key, steps = None, _steps_without_key(semitones)
    signature_in, signature_out = {}, {}
    out, bar_in, bar_out = [], {}, {}
    in_body = False
    for token, kind in abctext.tokenize_abc_kinds(abc):
        if kind in ("field", "inline_field") and token.lstrip("[")[:2] == "K:":
            value = token.lstrip("[")[2:].rstrip("]") if kind == "inline_field" else token[2:]
            key = parse_key(value)
            new_key, steps = transpose_key(key, semitones) if key else (None, _steps_without_key(semitones))
            signature_in, signature_out = (key.signature(), new_key.signature()) if key else ({}, {})
            text = f"K:{new_key.text()}" if new_key else f"K:{value}"
            out.append(f"[{text}]" if kind == "inline_field" else text)
            in_body, bar_in, bar_out = True, {}, {}
            continue
        if not in_body:
            out.append(token)
            continue
        if kind == "bar":
            bar_in, bar_out = {}, {}
            out.append(token)
        elif kind == "note" or kind == "grace":
            notes = _NOTE_IN_TEXT.sub(lambda m: _move(m, steps, semitones, signature_in, signature_out, bar_in, bar_out),
                                      token)
            out.append(notes)
        elif kind == "chord_symbol":
            out.append(_transpose_chord_symbol(token, semitones, sharps=(new_key.fifths >= 0) if new_key else semitones >= 0))
        else:
            out.append(token)
    result = "".join(out)
    _check_range(result, semitones, low, high)
    return result


def _check_range(abc: str, semitones: int, low: int, high: int) -> None:
    midis = _midi_range(abc)
    if midis and (midis[0] < low or midis[1] > high):
        raise TransposeError(f"a shift of {semitones:+d} puts notes outside MIDI {low}..{high}")


def _steps_without_key(semitones: int) -> int:
    """Letter steps for a keyless tune: the nearest diatonic interval."""
    return round(semitones * 7 / 12)


_NOTE_IN_TEXT = re.compile(r"(\^\^|\^|__|_|=)?([A-Ga-g])([,']*)")


def _move(m: re.Match, steps, semitones, signature_in, signature_out, bar_in, bar_out) -> str:
    pitch = _note_pitch(m.group(1), m.group(2), m.group(3), signature_in, bar_in)
    return _spell(pitch, steps, semitones, signature_out, bar_out)


def _midi_range(abc: str) -> tuple[int, int] | None:
    """Lowest and highest sounding MIDI pitch of a tune, key signature and accidentals applied."""
    signature, bar, pitches = {}, {}, []
    for token, kind in abctext.tokenize_abc_kinds(abc):
        if kind in ("field", "inline_field") and token.lstrip("[")[:2] == "K:":
            key, bar = parse_key(token.lstrip("[")[2:].rstrip("]")), {}
            signature = key.signature() if key else {}
        elif kind == "bar":
            bar = {}
        elif kind in ("note", "grace"):
            pitches += [_note_pitch(*m.groups(), signature, bar).midi for m in _NOTE_IN_TEXT.finditer(token)]
    return (min(pitches), max(pitches)) if pitches else None


def _parse_length(text: str) -> Fraction:
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


_LENGTHED = re.compile(r"((?:\^\^|\^|__|_|=)?[A-Ga-g][,']*|[zx]|\])([\d/]*)")


def scale_lengths(token: str, factor: Fraction) -> str:
    """A note, rest or chord close with its length multiplied by factor."""
    return _LENGTHED.sub(lambda m: m.group(1) + format_length(_parse_length(m.group(2)) * factor), token)


def _rewrite_lengths(abc: str, factor_for) -> str:
    """Scale every length in the body; factor_for(field_token) may change the factor mid-tune.

    A chord with an outer length ([CEG]2) has that length scaled, one without ([C2E2]) its
    notes: that keeps its duration right whether a reader multiplies the two or not.
    """
    out, chord, factor, in_body = [], None, factor_for(None), False
    for token, kind in abctext.tokenize_abc_kinds(abc):
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
        elif in_body and kind in ("note", "rest"):
            token = scale_lengths(token, factor)
        out.append(token)
    return "".join(out + [t for t, _ in chord or []])


def change_rhythm(abc: str, factor) -> str:
    """Every note and rest length times factor (2, 1/2); M: scales with them so bars stay full.

    M:6/8 becomes M:6/4 for a factor of 2 and M:6/16 for 1/2; M:C and M:C| count as 4/4, 2/2.
    L:, broken rhythm, tuplets, chord symbols and decorations are untouched.
    """
    factor = Fraction(factor)

    def fields(token):
        if token is None:
            return factor
        inline = token.startswith("[")
        body = token.strip("[]")
        if not body.startswith("M:"):
            return None
        meter = abctext.parse_meter(body[2:])
        if meter is None:
            raise TransposeError(f"cannot scale the meter {body}")
        num, den = meter  # not reduced: 6/8 stays six beats
        # keep the numerator (the beats) and move the denominator where possible
        if (Fraction(den) / factor).denominator == 1:
            den = int(den / factor)
        else:
            num = int(num * factor)
        text = f"M:{num}/{den}"
        return (f"[{text}]" if inline else text), factor

    return _rewrite_lengths(abc, fields)


def set_unit_length(abc: str, unit: str) -> str:
    """Rewrite L: and every length so that the music is identical: L:1/8 A2 == L:1/16 A4."""
    target = Fraction(unit)
    header = re.search(r"(?m)^L:\s*(\d+/\d+)", abc)
    meter = re.search(r"(?m)^M:(.*)$", abc)
    if header:
        current = Fraction(header.group(1))
    else:  # the default unit: 1/16 below a meter of 3/4, else 1/8
        m = abctext.parse_meter(meter.group(1)) if meter else None
        current = Fraction(1, 16) if m is not None and Fraction(*m) < Fraction(3, 4) else Fraction(1, 8)
        abc = re.sub(r"(?m)^(K:)", f"L:{unit}\n\\1", abc, count=1)
    state = {"unit": current}

    def fields(token):
        if token is None:
            return current / target
        inline = token.startswith("[")
        body = token.strip("[]")
        if not body.startswith("L:"):
            return None
        if header is None and not inline:
            return None  # the L: line we inserted
        state["unit"] = Fraction(body[2:].strip())
        text = f"L:{unit}"
        return (f"[{text}]" if inline else text), state["unit"] / target

    return _rewrite_lengths(abc, fields)


def augment_dataset(tunes: list[str], transpositions=(-2, 2), factors=(2, Fraction(1, 2))) -> list[str]:
    """The report's x5 set: each tune, its transpositions and its rhythm changes.

    A tune whose transposition leaves the playable range is left out of that copy.
    """
    variants = [(transpose_tune, shift) for shift in transpositions] + [(change_rhythm, f) for f in factors]
    out = list(tunes)
    for rewrite, amount in variants:
        for tune in tunes:
            try:
                out.append(rewrite(tune, amount))
            except TransposeError:
                pass
    return out


def parse_range(text: str) -> tuple[int, int]:
    """The lowest and highest note a transposition may reach: "G,..c'''" -> MIDI (55, 108)."""
    ends = text.split("..")
    notes = [_NOTE_IN_TEXT.fullmatch(end.strip()) for end in ends]
    if len(ends) != 2 or not all(notes):
        raise UserError(f"--transpose-range wants two ABC notes like G,..c''' (got {text!r})")
    low, high = (_note_pitch(*m.groups(), {}, {}).midi for m in notes)
    return low, high


def augment_tune(tune: str, rng: np.random.Generator, key_share: float = 1.0, unit_share: float = 1.0,
                 low: int = 55, high: int = 108, shifts=range(-5, 7),
                 units=("1/8", "1/16", "1/4")) -> tuple[str, bool]:
    """With probability key_share a random transposition, with unit_share a random unit length.

    For training on the fly (never validation). Returns the tune and whether the range guard
    refused its transposition (it then keeps its key).
    """
    refused = False
    if rng.random() < key_share:
        try:
            tune = transpose_tune(tune, int(rng.choice(list(shifts))), low, high)
        except TransposeError:
            refused = True
    if rng.random() < unit_share:
        tune = set_unit_length(tune, str(rng.choice(list(units))))
    return tune, refused


# -----------------------------------------------------------------------------
# command line


def config_from_args(args: argparse.Namespace) -> Config:
    given = {f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name, None) is not None}
    return Config(**given)


FLAG_HELP = {  # where "default: X" alone would not say what a flag does
    "augment_key": "share (0..1) of training tunes put in a random key (-5..+6 semitones) each epoch",
    "augment_unit": "share (0..1) of training tunes rewritten in a random unit length (L:1/8, 1/16, 1/4) each epoch",
}


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Config field, grouped as the dataclass is; defaults shown from Config."""
    defaults = Config()
    groups = {
        "data": ["train_data", "val_data", "limit", "tokenizer", "min_count", "augment_key", "augment_unit",
                 "transpose_range"],
        "model": ["embedding_dim", "hidden_dim", "num_layers", "dropout"],
        "optimisation": ["batch_size", "lr", "schedule", "warmup_steps", "epochs", "patience", "grad_clip",
                         "max_minutes"],
        "run": ["out_dir", "seed", "device"],
    }
    choices = {"tokenizer": list(abctext.TOKENIZERS), "schedule": ["cosine", "plateau"],
               "device": ["auto", "cpu", "cuda"]}
    types = {f.name: f.type for f in fields(Config)}
    for title, names in groups.items():
        group = parser.add_argument_group(title)
        for name in names:
            kind = {"int": int, "float": float, "str": str}[types[name].split(" ")[0]]  # "int | None" -> int
            flag = "--" + ("out" if name == "out_dir" else name.replace("_", "-"))
            help_text = f"{FLAG_HELP[name]}; " if name in FLAG_HELP else ""
            group.add_argument(flag, dest=name, type=kind, choices=choices.get(name), default=None,
                               help=f"{help_text}default: {getattr(defaults, name)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="musicrnn.py", description=__doc__.strip().splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model; writes runs/best.pt and runs/last.pt")
    add_config_flags(p)
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--overwrite", action="store_true", help="replace checkpoints already in OUT/")
    p.add_argument("--tensorboard", action="store_true", help="also log to OUT/tensorboard")

    p = sub.add_parser("evaluate", help="loss, perplexity and bits per character of a checkpoint")
    p.add_argument("--checkpoint", default="runs/best.pt", help="default: runs/best.pt")
    p.add_argument("--data", default="data/validation.json", help="default: data/validation.json")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("generate", help="write new tunes with a checkpoint (torch)")
    p.add_argument("--checkpoint", default="runs/best.pt", help="default: runs/best.pt")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    abctext.add_sampling_flags(p)

    p = sub.add_parser("sweep", help="judge generated tunes per temperature, with and without --constrained")
    p.add_argument("--checkpoint", default="runs/best.pt", help="default: runs/best.pt")
    p.add_argument("--onnx", help="generate through onnxruntime with this exported model instead of torch")
    p.add_argument("--train-data", default="data/train.json", help="for pitch classes and copying (default: data/train.json)")
    p.add_argument("--num", type=abctext.positive_int, default=50, help="tunes per setting (default 50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=abctext.positive_int, default=1000)
    p.add_argument("--temperatures", type=abctext.positive_float, nargs="+", default=[0.5, 0.8, 1.0, 1.2])
    p.add_argument("--out", default="runs/sweep.json", help="the table as JSON (default: runs/sweep.json)")

    p = sub.add_parser("stats", help="corpus statistics: tunes, lengths, frequent tokens")
    p.add_argument("--data", default="data/train.json", help="default: data/train.json")
    p.add_argument("--plot", help="also draw the length histogram and token counts to this PNG")
    return parser


def cmd_train(args) -> None:
    train(config_from_args(args), resume=args.resume, overwrite=args.overwrite, tensorboard=args.tensorboard)


def cmd_evaluate(args) -> None:
    device = pick_device(args.device)
    model, cfg, vocab = model_from_checkpoint(load_checkpoint(args.checkpoint, device), args.checkpoint)
    metrics = evaluate(model.to(device), MusicDataset(load_tunes(args.data), vocab), vocab.pad_id, device)
    if args.json:
        print(json.dumps({k: metrics[k] for k in ("loss", "perplexity", "bits_per_char", "tunes", "chars", "unknown")}))
    else:
        print(f"{args.data}: {metrics['tunes']} tunes, {metrics['chars']:,} characters, "
              f"{metrics['unknown']} unknown symbols")
        print(f"loss {metrics['loss']:.4f} nats/token | perplexity {metrics['perplexity']:.3f} | "
              f"{metrics['bits_per_char']:.4f} bits/char")


def cmd_generate(args) -> None:
    device = pick_device(args.device)
    model, cfg, vocab = model_from_checkpoint(load_checkpoint(args.checkpoint, device), args.checkpoint)
    try:
        tunes = generate(model.to(device), vocab, device, args.num, abctext.start_text(args), args.max_tokens,
                         args.temperature, args.top_k, args.seed, args.constrained, args.max_bars)
    except abctext.PromptError as e:
        raise UserError(str(e)) from None
    abctext.write_tunebook(abctext.tunebook(tunes), args.out, args.render)


def cmd_stats(args) -> None:
    stats = corpus_stats(load_tunes(args.data))
    print(f"tunes            {stats['tunes']:,}")
    print(f"unique chars     {stats['unique_chars']}")
    print(f"unique tokens    {stats['unique_tokens']:,}")
    for unit in ("chars", "tokens"):
        s = stats[unit]
        print(f"length ({unit:<6}) max {s['max']:,}  mean {s['mean']:.1f}  median {s['median']:.0f}")
    print("top 20 tokens    " + "  ".join(f"{tok!r}:{n:,}" for tok, n in stats["top_tokens"]))
    if args.plot:
        plot_stats(stats, Path(args.plot))
        print(f"plot written to {args.plot}")


def cmd_sweep(args) -> None:
    training_tunes = load_tunes(args.train_data)
    if args.onnx:
        import infer_onnx  # onnxruntime only; the same sampler as below

        try:
            session, vocab, config = infer_onnx.load_model(args.onnx)
        except infer_onnx.ModelError as e:
            raise UserError(str(e)) from None

        def generate_fn(num, temperature, seed, constrained):
            return infer_onnx.generate(session, vocab, config, num, "", args.max_tokens, temperature, None, seed,
                                       constrained)
    else:
        device = torch.device("cpu")
        model, cfg, vocab = model_from_checkpoint(load_checkpoint(args.checkpoint, device), args.checkpoint)

        def generate_fn(num, temperature, seed, constrained):
            return generate(model, vocab, device, num, "", args.max_tokens, temperature, None, seed, constrained)

    rows = sweep(generate_fn, training_tunes, args.num, args.seed, args.temperatures)
    print(sweep_table(rows))
    abctext.write_atomic(Path(args.out), json.dumps(rows, indent=2).encode())
    print(f"written to {args.out}")


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "generate": cmd_generate, "sweep": cmd_sweep,
            "stats": cmd_stats}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
