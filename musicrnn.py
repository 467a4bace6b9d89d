"""
musicrnn: an LSTM that learns folk tunes written in ABC notation and writes new ones.

The lesson, top to bottom in pipeline order:

    Config -> data -> vocabulary and padding -> the dataset's one-step shift -> the LSTM
    -> training -> evaluation -> sampling with temperature -> constrained sampling
    -> augmentation -> command line

The machinery lives in torch-free modules, each named for what it holds, so that
infer_onnx.py can generate without torch: abc_tokens (tokenizer, vocabulary), abc_music
(tunebooks, keys, transposition, rhythm), abc_constraint (the --constrained automaton),
sampler (the sampling options and loop), judging (abc2midi, the sweep), plots, safe_write.

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
import io
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import cli
import judging
import plots
import sampler
from abc_music import TransposeError, change_rhythm, parse_note_range, read_tunebook, set_unit_length, transpose_tune
from abc_tokens import TOKENIZERS, PromptError, Vocabulary
from safe_write import write_atomic


@dataclass
class Config:
    # data
    train_data: str = "data/train.json"         # IrishMAN JSON, any pandas path, .abc file or folder
    val_data: str = "data/validation.json"      # the same, for validation
    limit: int | None = None                    # use only the first N training tunes (None = all)
    tokenizer: str = "char"                     # "char" (measured better, README) or "abc" (musical tokens)
    min_count: int = 3                          # a whole token joins the vocabulary at this many uses
    augment_key: float = 0.0                    # share (0..1) of training tunes put in a random key each epoch
    augment_rhythm: float = 0.0                 # share (0..1) with every length doubled or halved (M: scaled)
    augment_unit: float = 0.0                   # share (0..1) rewritten in a random unit length (L:1/8, 1/16, 1/4)
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
# data: IrishMAN JSON records {"control code", "abc notation"}, or ABC tunebooks
# normalised into that form (abc_music.read_tunebook: X:1, L:, M:, K:, the music)


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


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


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
    write_atomic(path, json.dumps(records, ensure_ascii=False, indent=0).encode("utf-8"))


# -----------------------------------------------------------------------------
# vocabulary and padding
#
# The model reads integers. abc_tokens.Vocabulary gives every token an id:
#   0 <pad>  fills the short rows of a batch; the loss ignores it (below)
#   1 <eos>  ends a tune, and also starts one: the first input of every tune
#   2 <unk>  a character that training never saw
#   3...     with the default "char" tokenizer, every character seen in training, sorted.
# So a character's id is plain char_to_idx = {ch: i for i, ch in enumerate(sorted(chars))}
# plus 3. The "abc" tokenizer adds the whole musical tokens seen at least min_count times
# ("^c'", "|:", "K:D"); a whole token it does not know is read from its characters.


def build_vocabulary(tunes: list[str], cfg: Config) -> Vocabulary:
    """Specials, then the sorted characters (and, for "abc", the frequent whole tokens)."""
    return Vocabulary.build(tunes, cfg.tokenizer, cfg.min_count)


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
        return seq[:-1], seq[1:]  # the one-step shift: y[t] is the token after x[t]

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
    """Pad a batch to its longest tune. The padding mask is y == pad_id: cross_entropy's
    ignore_index leaves those positions out of the loss and its gradient."""
    length = max(len(x) for x, _ in items)
    x = torch.tensor([pad_or_truncate(x, length, pad_id) for x, _ in items])  # (B, T)
    y = torch.tensor([pad_or_truncate(y, length, pad_id) for _, y in items])  # (B, T)
    return x, y


def padding_fraction(lengths: np.ndarray, batches: list[np.ndarray]) -> float:
    padded = sum(len(b) * int(lengths[b].max()) for b in batches)
    return 1.0 - int(lengths.sum()) / padded


# -----------------------------------------------------------------------------
# model: embedding -> LSTM -> linear, one set of logits per position


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
        """Xavier Linear, orthogonal LSTM weights, zero biases except the forget gate's 1."""
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
    """Layer, output shape, parameters.

    For vocab 682, emb 128, hidden 512, 1 layer the total is 1,751,978 =
    87,296 + 1,314,816 + 349,866: PyTorch's LSTM keeps two bias vectors per layer
    (b_ih and b_hh, 2 x 4 x 512), and the Linear layer has 512 x 682 + 682.
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
# training: the step, the epoch, and the bookkeeping around them


@dataclass
class Progress:
    """Where a run stands; a checkpoint stores all of it but `stale`."""
    epoch: int = 0                                # epochs done
    step: int = 0                                 # optimizer steps done
    best_val: float = math.inf                    # best validation loss so far
    history: list = field(default_factory=list)   # one row of figures per epoch
    lr_scale: float = 1.0                         # the plateau schedule's factor
    stale: int = 0                                # epochs since the best validation loss


@dataclass
class Run:
    """One training run: settings, data, model, optimizer, progress and its clock."""
    cfg: Config
    device: torch.device
    vocab: Vocabulary
    train_tunes: list[str]                        # as written; augmentation rewrites copies
    train_set: MusicDataset
    val_set: MusicDataset
    model: MusicRNN
    optimizer: torch.optim.Optimizer
    progress: Progress
    started: float = 0.0                          # time.time() when the first epoch began

    def time_used(self) -> float:
        """The share of --max-minutes spent so far."""
        return (time.time() - self.started) / (self.cfg.max_minutes * 60)


def train_step(model: MusicRNN, optimizer, x: torch.Tensor, y: torch.Tensor, pad_id: int,
               grad_clip: float) -> float:
    """One step of gradient descent on a batch; returns its loss per real token."""
    logits, _ = model(x)                                                   # (B, T, V)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=pad_id)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.item()


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
    """Train with early stopping; write best.pt and last.pt to cfg.out_dir. Returns the last epoch's row."""
    run = start_run(cfg, resume, overwrite, log)
    out = Path(run.cfg.out_dir)
    writer = tensorboard_writer(out) if tensorboard else None
    run.started = time.time()
    while run.progress.epoch < run.cfg.epochs:
        rng = np.random.default_rng(run.cfg.seed + run.progress.epoch)  # per-epoch seeds: --resume replays exactly
        torch.manual_seed(run.cfg.seed + run.progress.epoch)
        train_set = epoch_training_set(run, rng, log)
        figures, out_of_time = train_epoch(run, train_set, rng)
        if end_of_epoch(run, figures, out_of_time, writer, log) or out_of_time:
            break
    plots.plot_history(run.progress.history, out / "loss.png")
    log(f"best val loss {run.progress.best_val:.4f}, checkpoints in {out}/, loss curve {out}/loss.png")
    return run.progress.history[-1] if run.progress.history else {}


def train_epoch(run: Run, train_set: MusicDataset, rng: np.random.Generator) -> tuple[dict, bool]:
    """One pass over length-grouped batches; its figures, and whether the time budget ran out."""
    from tqdm import tqdm

    cfg, p, pad_id = run.cfg, run.progress, run.vocab.pad_id
    total_steps = cfg.epochs * math.ceil(len(train_set) / cfg.batch_size)
    loader, batches = batch_loader(train_set, cfg.batch_size, pad_id, rng)
    run.model.train()
    started, sum_loss, sum_tokens, out_of_time = time.time(), 0.0, 0, False
    bar = tqdm(loader, desc=f"epoch {p.epoch + 1}/{cfg.epochs}", leave=False, disable=None, file=sys.stderr)
    for x, y in bar:
        x, y = x.to(run.device), y.to(run.device)                          # (B, T)
        for group in run.optimizer.param_groups:
            group["lr"] = learning_rate(cfg, p.step, total_steps, p.lr_scale, run.time_used())
        loss = train_step(run.model, run.optimizer, x, y, pad_id, cfg.grad_clip)
        n = int((y != pad_id).sum())
        sum_loss, sum_tokens, p.step = sum_loss + loss * n, sum_tokens + n, p.step + 1
        bar.set_postfix(loss=f"{loss:.3f}")
        if run.time_used() > 1:
            out_of_time = True
            break
    figures = {"train_loss": sum_loss / max(1, sum_tokens), "tokens_per_s": sum_tokens / (time.time() - started),
               "padding": padding_fraction(train_set.lengths(), batches)}
    return figures, out_of_time


def end_of_epoch(run: Run, figures: dict, out_of_time: bool, writer, log) -> bool:
    """Validate, log, write the checkpoints; True when early stopping ends the run."""
    p, out = run.progress, Path(run.cfg.out_dir)
    p.epoch += 1
    val = evaluate(run.model, run.val_set, run.vocab.pad_id, run.device)
    row = {"epoch": p.epoch, "step": p.step, "train_loss": figures["train_loss"], "val_loss": val["loss"],
           "val_bits_per_char": val["bits_per_char"], "tokens_per_s": figures["tokens_per_s"],
           "padding": figures["padding"], "elapsed_s": time.time() - run.started,
           "lr": run.optimizer.param_groups[0]["lr"]}
    p.history.append(row)
    log(f"epoch {p.epoch:3d} | train loss {row['train_loss']:.4f} | val loss {val['loss']:.4f} | "
        f"val bits/char {val['bits_per_char']:.4f} | {row['tokens_per_s']:,.0f} tok/s | "
        f"padding {row['padding']:.1%} | lr {row['lr']:.2e} | {row['elapsed_s'] / 60:.1f} min"
        + (" (time budget reached)" if out_of_time else ""))
    if writer:
        for key in ("train_loss", "val_loss", "val_bits_per_char", "tokens_per_s"):
            writer.add_scalar(key, row[key], p.epoch)
    if val["loss"] < p.best_val:
        p.best_val, p.stale = val["loss"], 0
        save_checkpoint(out / "best.pt", run)
    else:
        p.stale += 1
        p.lr_scale *= 0.5  # only the plateau schedule reads it
    save_checkpoint(out / "last.pt", run)
    if p.stale >= run.cfg.patience and p.epoch < run.cfg.epochs:
        log(f"early stop: no better validation loss for {run.cfg.patience} epochs")
        return True
    return False


def start_run(cfg: Config, resume: bool, overwrite: bool, log) -> Run:
    """A new run, or with resume the one in OUT/last.pt: its settings, except the clock,
    the device, OUT and a larger --epochs, which come from this command."""
    last_path = Path(cfg.out_dir) / "last.pt"
    ckpt = load_checkpoint(str(last_path)) if resume else None
    if ckpt is None and not overwrite and (last_path.exists() or last_path.with_name("best.pt").exists()):
        raise UserError(f"{cfg.out_dir}/ already holds checkpoints: pass --resume to continue them, "
                        f"--overwrite to replace them, or --out DIR for a new run")
    if ckpt is not None:
        cfg = config_from_dict({**ckpt["config"], "max_minutes": cfg.max_minutes, "device": cfg.device,
                                "epochs": max(cfg.epochs, ckpt["config"]["epochs"]), "out_dir": cfg.out_dir})
    check_config(cfg)
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    train_tunes, val_tunes = load_tunes(cfg.train_data), load_tunes(cfg.val_data)
    train_tunes = train_tunes[: cfg.limit] if cfg.limit else train_tunes
    vocab = Vocabulary.from_dict(ckpt["vocab"]) if ckpt else build_vocabulary(train_tunes, cfg)
    model = build_model(cfg, len(vocab)).to(device)
    run = Run(cfg, device, vocab, train_tunes, MusicDataset(train_tunes, vocab), MusicDataset(val_tunes, vocab),
              model, torch.optim.Adam(model.parameters(), lr=cfg.lr), Progress())
    if ckpt:
        restore(run, ckpt, log)
    log(f"{len(run.train_set)} training tunes, {len(run.val_set)} validation tunes, vocabulary {len(vocab)} "
        f"({cfg.tokenizer} tokens), device {device}")
    log(parameter_summary(model))
    return run


def check_config(cfg: Config) -> None:
    if cfg.tokenizer not in TOKENIZERS:
        raise UserError(f"--tokenizer must be one of {', '.join(TOKENIZERS)}")
    if not all(0 <= share <= 1 for share in (cfg.augment_key, cfg.augment_rhythm, cfg.augment_unit)):
        raise UserError("--augment-key, --augment-rhythm and --augment-unit are shares between 0 and 1")
    note_range(cfg.transpose_range)  # refuse a bad --transpose-range before training


def restore(run: Run, ckpt: dict, log) -> None:
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.progress = Progress(ckpt["epoch"], ckpt["step"], ckpt["best_val_loss"], list(ckpt.get("history", [])),
                            ckpt.get("lr_scale", 1.0))
    log(f"resuming {Path(run.cfg.out_dir) / 'last.pt'} after epoch {run.progress.epoch} "
        f"(best val loss {run.progress.best_val:.4f})")


def save_checkpoint(path: Path, run: Run) -> None:
    p = run.progress
    ckpt = {
        "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
        "config": asdict(run.cfg), "vocab": run.vocab.to_dict(),
        "epoch": p.epoch, "step": p.step, "best_val_loss": p.best_val,
        "history": p.history, "lr_scale": p.lr_scale,
    }
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    write_atomic(path, buffer.getvalue())  # a crash mid-write never leaves half a checkpoint


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def batch_loader(dataset: MusicDataset, batch_size: int, pad_id: int, rng: np.random.Generator | None):
    batches = length_batches(dataset.lengths(), batch_size, rng)
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches,
                                       collate_fn=lambda items: collate(items, pad_id)), batches


def tensorboard_writer(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(out / "tensorboard"))


# -----------------------------------------------------------------------------
# evaluation


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


# -----------------------------------------------------------------------------
# sampling with temperature: one token per step, the LSTM state (h, c) carried along
#
# sampler.generate_tunes runs the loop: feed the last token and the state, get the logits
# of the next token, draw it with sampler.sample_next, repeat until <eos>. sample_next is
# where the temperature acts: the logits are divided by it (below 1 sharpens the
# distribution, above 1 flattens it), top-k keeps the k largest, and one uniform number
# per tune draws the token from the cumulative probabilities. The loop lives in a
# torch-free module so that infer_onnx.py runs the very same code over onnxruntime.


def torch_step(model: MusicRNN, device: torch.device):
    """The model as the sampler wants it: (tokens (B, 1), state) -> (logits (B, V), state)."""

    @torch.no_grad()
    def step(tokens: np.ndarray, state):
        logits, state = model(torch.from_numpy(tokens).to(device), state)  # (B, 1, V)
        return logits[:, -1].float().cpu().numpy(), state

    return step


def generate(model: MusicRNN, vocab: Vocabulary, device: torch.device,
             opts: sampler.SamplingOptions = sampler.SamplingOptions()) -> list[str]:
    """opts.num tunes, each opts.prompt followed by what the model writes until <eos>."""
    return sampler.generate_tunes(torch_step(model.eval(), device), vocab, opts)


# -----------------------------------------------------------------------------
# constrained sampling: SamplingOptions(constrained=True)
#
# Before each draw, the sampler adds a mask to every tune's logits: 0 for the tokens that
# keep the tune valid, -inf for the others, so they are never drawn and the rest keep their
# relative probabilities. abc_constraint.AbcConstraint follows the ABC as it is written and
# guarantees: a header X:, L:, M:, K: in that order; bars that are exactly full (broken
# rhythm, triplets, chords, ties and pickups counted); chords and grace groups closed;
# an end only after 4 full bars, 16 notes and a section end; the end within max_bars bars
# and max_tokens tokens. It never replaces the model's choice, it only removes the illegal ones.


# -----------------------------------------------------------------------------
# augmentation: new training tunes from old ones, right by construction
#
# transpose_tune(abc, k) moves every note, key and chord symbol k semitones and spells the
# notes with the new key's letters; change_rhythm(abc, 2) doubles every length and scales
# M: so that bars stay full; set_unit_length(abc, "1/16") rewrites L: and every length with
# the music unchanged. abc2midi confirms all three on the test tunes (tests/test_augment.py).


def augment_tune(tune: str, rng: np.random.Generator, key_share: float = 1.0, unit_share: float = 1.0,
                 low: int = 55, high: int = 108, rhythm_share: float = 0.0) -> tuple[str, bool]:
    """With probability key_share a random transposition (-5..+6), with rhythm_share every
    length doubled or halved, with unit_share a random unit length (L:1/8, 1/16, 1/4).

    For training (never validation). Returns the tune and whether the range guard [low, high]
    refused its transposition (it then keeps its key). A share of 0 draws no random number,
    so the other shares' draws are the same with it as without it.
    """
    refused = False
    if rng.random() < key_share:
        try:
            tune = transpose_tune(tune, int(rng.choice(list(range(-5, 7)))), low, high)
        except TransposeError:
            refused = True
    if rhythm_share and rng.random() < rhythm_share:
        try:
            tune = change_rhythm(tune, (2, Fraction(1, 2))[int(rng.integers(2))])
        except TransposeError:
            pass  # a meter that cannot scale (M:none): the tune keeps its rhythm
    if rng.random() < unit_share:
        tune = set_unit_length(tune, str(rng.choice(["1/8", "1/16", "1/4"])))
    return tune, refused


def epoch_training_set(run: Run, rng: np.random.Generator, log) -> MusicDataset:
    """This epoch's training tunes: as written, or with the configured shares augmented."""
    cfg = run.cfg
    if not (cfg.augment_key or cfg.augment_unit or cfg.augment_rhythm):
        return run.train_set
    low, high = note_range(cfg.transpose_range)
    augmented = [augment_tune(t, rng, cfg.augment_key, cfg.augment_unit, low, high, cfg.augment_rhythm)
                 for t in run.train_tunes]
    log(f"augmentation: {sum(r for _, r in augmented)} of {len(augmented)} transpositions refused "
        f"by the range guard {cfg.transpose_range}")
    return MusicDataset([t for t, _ in augmented], run.vocab)


def note_range(text: str) -> tuple[int, int]:
    """--transpose-range "G,..c'''" -> MIDI (55, 108)."""
    try:
        return parse_note_range(text)
    except ValueError as e:
        raise UserError(f"--transpose-range {e}") from None


# -----------------------------------------------------------------------------
# command line


FLAG_CHOICES = {"tokenizer": list(TOKENIZERS), "schedule": ["cosine", "plateau"], "device": ["auto", "cpu", "cuda"]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="musicrnn.py", description=__doc__.strip().splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("train", help="train a model; writes runs/best.pt and runs/last.pt")
    cli.dataclass_flags(p, Config, FLAG_CHOICES, flag_names={"out_dir": "out"})
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
    sampler.add_sampling_flags(p)
    add_sweep_parser(sub)
    p = sub.add_parser("stats", help="corpus statistics: tunes, lengths, frequent tokens")
    p.add_argument("--data", default="data/train.json", help="default: data/train.json")
    p.add_argument("--plot", help="also draw the length histogram and token counts to this PNG")
    return parser


def add_sweep_parser(sub) -> None:
    p = sub.add_parser("sweep", help="judge generated tunes per temperature, with and without --constrained")
    p.add_argument("--checkpoint", default="runs/best.pt", help="default: runs/best.pt")
    p.add_argument("--onnx", help="generate through onnxruntime with this exported model instead of torch")
    p.add_argument("--train-data", default="data/train.json", help="for pitch classes and copying (default: data/train.json)")
    p.add_argument("--num", type=cli.positive_int, default=50, help="tunes per setting (default 50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=cli.positive_int, default=1000)
    p.add_argument("--temperatures", type=cli.positive_float, nargs="+", default=[0.5, 0.8, 1.0, 1.2])
    p.add_argument("--out", default="runs/sweep.json", help="the table as JSON (default: runs/sweep.json)")


def cmd_train(args) -> None:
    train(cli.dataclass_from_args(Config, args), resume=args.resume, overwrite=args.overwrite, tensorboard=args.tensorboard)


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
        tunes = generate(model.to(device), vocab, device, sampler.sampling_options(args))
    except PromptError as e:
        raise UserError(str(e)) from None
    sampler.write_tunebook(sampler.tunebook(tunes), args.out, args.render)


def cmd_stats(args) -> None:
    stats = plots.corpus_stats(load_tunes(args.data))
    print(plots.stats_text(stats))
    if args.plot:
        plots.plot_stats(stats, Path(args.plot))
        print(f"plot written to {args.plot}")


def cmd_sweep(args) -> None:
    training_tunes = load_tunes(args.train_data)
    generate_fn = onnx_generator(args.onnx) if args.onnx else torch_generator(args.checkpoint)
    opts = sampler.SamplingOptions(num=args.num, seed=args.seed, max_tokens=args.max_tokens)
    rows = judging.sweep(generate_fn, opts, training_tunes, args.temperatures)
    print(judging.sweep_table(rows))
    write_atomic(Path(args.out), json.dumps(rows, indent=2).encode())
    print(f"written to {args.out}")


def torch_generator(checkpoint: str):
    device = torch.device("cpu")
    model, cfg, vocab = model_from_checkpoint(load_checkpoint(checkpoint, device), checkpoint)
    step = torch_step(model, device)
    return lambda opts: sampler.generate_tunes(step, vocab, opts)


def onnx_generator(path: str):
    import exported_model  # onnxruntime, imported only when a sweep asks for it

    try:
        session, vocab, config = exported_model.load_model(path)
    except exported_model.ModelError as e:
        raise UserError(str(e)) from None
    step = exported_model.onnx_step(session, config)
    return lambda opts: sampler.generate_tunes(step, vocab, opts)


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
