"""
musicrnn: an LSTM that learns folk tunes written in ABC notation and writes new ones.

The lesson, top to bottom in pipeline order:

    Config -> data -> vocabulary and padding -> the dataset's one-step shift -> the LSTM
    -> training -> evaluation -> sampling with temperature -> constrained sampling
    -> augmentation -> command line

The machinery lives in modules, each named for what it holds. These are torch-free, so that
infer_onnx.py can generate without torch: corpus (reading collections), abc_tokens (tokenizer,
vocabulary), abc_music (tunebooks, keys, transposition, rhythm), abc_form (control codes, bars
per section), abc_constraint (the --constrained automaton), sampler (the sampling options and
loop), judging (abc2midi; the sweep, forms and types commands), plots, settings (ranges, resume
rules), cli and safe_write (errors, outputs). With torch: checkpoint_files (reading a checkpoint
back), distributed (training on several processes, torchrun) and export.py (the ONNX graph).
The lesson keeps their call sites.

    make train                                   # venv, data, train, export, one tune
    make train-long                              # the long-run model in runs/long/ (<= 60 min)
    python musicrnn.py stats --data data/train.json --plot runs/stats.png
    python musicrnn.py train                     # the default config, runs/best.pt
    python musicrnn.py train --augment-key 0.5 --out runs/augmented
    torchrun --standalone --nproc_per_node=2 musicrnn.py train   # 2 processes, one model
    python musicrnn.py evaluate --checkpoint runs/best.pt --data data/validation.json
    python musicrnn.py generate --checkpoint runs/best.pt --num 5 --meter 6/8 --key D --constrained
    python musicrnn.py generate --constrained --type jig --sections 2 --bars 8   # a jig, two parts of 8 bars
    python musicrnn.py train --control --out runs/control   # learn p(tune | form) from the control codes
    python musicrnn.py sweep --onnx runs/musicrnn.onnx --plot runs/sweep.png  # validity per temperature (abc2midi)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field, fields
from fractions import Fraction
from pathlib import Path

import cli  # first: Ctrl-C while torch loads is one line, as it is later
cli.quiet_interrupt_while_loading(__name__)

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

import distributed
import judging
import plots
import sampler
from abc_form import control_code
from abc_music import (HIGHEST, LOWEST, NOTE_RANGE, RewriteError, change_rhythm, parse_note_range, set_unit_length,
                       transpose_tune, tune_types)
from abc_tokens import Vocabulary
from checkpoint_files import check_finite, checkpoint_mismatch, load_checkpoint, real_weights
from cli import UserError
from corpus import collection_digest, load_records, load_tunes
from distributed import World, rank_rows
from safe_write import check_output, check_run_files, deferred_interrupt, folder_lock, removed_if_failed, write_atomic
from settings import (FLAG_CHOICES, FLAG_TYPES, check_config, check_same_data, check_unused_flags,
                      config_from_dict, epochs_since_best, resumed_config, stale_after, stored_config)


@dataclass
class Config:
    # data
    train_data: str = "data/train.json"         # IrishMAN JSON, any pandas path, .abc file or folder
    val_data: str = "data/validation.json"      # the same, for validation
    limit: int | None = None                    # use only the first N training tunes (default: all of them)
    control: bool = False                       # read each tune's control code (its form) before it: p(tune | form)
    tokenizer: str = "char"                     # "char" (measured better, README) or "abc" (musical tokens)
    min_count: int = 3                          # --tokenizer abc: a whole token joins the vocabulary at this many uses
    augment_key: float = 0.3                    # share (0..1) of training tunes drawn a random key (-5..+6) each epoch
    augment_rhythm: float = 0.0                 # share (0..1) with every length doubled or halved (M: scaled)
    augment_unit: float = 0.3                   # share (0..1) drawn a random unit length (L:1/8, 1/16 or 1/4)
    transpose_range: str = NOTE_RANGE           # --augment-key refuses shifts that leave this range
    # model
    embedding_dim: int = 128                    # size of a token's embedding
    hidden_dim: int = 384                       # LSTM state size (README: 384 beat 256 and 512 in 10 min)
    num_layers: int = 1                         # stacked LSTM layers
    dropout: float = 0.15                       # on the embedding and before the output, and between layers
    dropout_mask: str = "tune"                  # "tune": one mask per tune (per chunk, past CHUNK), all its steps;
                                                # "element": one per step (between layers it is always per element)
    # optimisation
    batch_size: int = 32                        # tunes per batch, grouped by length (README: 32 beat 16)
    lr: float = 5.6e-3                          # peak learning rate of Adam (about 4e-3 x sqrt(2), for the batch of 32)
    schedule: str = "cosine"                    # "cosine" (warm-up then decay) or "plateau" (halve when stuck)
    warmup_steps: int = 50                      # linear warm-up, cosine schedule only
    epochs: int = 24                            # passes over the training tunes (what 10 min fit in bf16 on the
                                                # README's 2-core host; a slower one anneals by the clock)
    patience: int = 3                           # stop after this many epochs without a better val loss
    grad_clip: float = 1.0                      # max global gradient norm
    precision: str = "auto"                     # products in "bf16", "fp32" or "auto" (bf16 where the hardware has it)
    max_minutes: float = 10.0                   # wall-clock budget of the training, from its first epoch
                                                # (--resume's sessions added up), checked before each batch;
                                                # once spent, the epoch so far is validated and saved
    # run
    out_dir: str = "runs"                       # best.pt, last.pt, loss.png go here
    seed: int = 1337                            # seeds python, numpy and torch
    device: str = "auto"                        # "auto", "cpu" or "cuda"


# -----------------------------------------------------------------------------
# data: a collection is an IrishMAN-format JSON list of records, one per tune:
#
#     {"control code": "S:2\nB:8\n...", "abc notation": "X:1\nL:1/8\nM:6/8\nK:D\nA|dfa ..."}
#
# The control code describes the tune's form (TunesFormer): S sections, B bars in each, E how
# alike each later section is to every earlier one. By default the model reads the ABC alone;
# with --control it reads the code first and learns p(tune | form), which generation then asks
# for (--form). corpus.load_records returns both texts; a record without a code gets the one
# abc_form.control_code computes. ABC tunebooks (.abc files or folders of them) are read too,
# normalised into the same form by abc_music.normalize_tune: X:1, R: (the tune type, when
# known), L:, M:, K:, then the music, with titles, comments and lyrics dropped.


def load_collection(path: str, control: bool, limit: int | None = None) -> tuple[list[str], list[str] | None]:
    """The first `limit` tunes of a collection and, for a --control model, their control codes:
    as the records give them, else computed."""
    records = load_records(path)[:limit]
    tunes = [tune for _, tune in records]
    return tunes, [code or control_code(tune) for code, tune in records] if control else None


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
    """Specials, then the characters (and, for "abc", the frequent whole tokens), sorted together."""
    return Vocabulary.build(tunes, cfg.tokenizer, cfg.min_count)


def pad_or_truncate(ids: np.ndarray, length: int, pad_id: int) -> np.ndarray:
    """Exactly `length` ids: cut the tail, or fill it with pad_id."""
    return np.pad(np.asarray(ids)[:length], (0, max(0, length - len(ids))), constant_values=pad_id)


# -----------------------------------------------------------------------------
# dataset: (x, y) shifted by one, batched by length so that padding costs little


class MusicDataset(torch.utils.data.Dataset):
    """Each tune as <eos> tune <eos>: x = all but the last id, y = all but the first.

    The leading <eos> is the start symbol, so the model is scored on every token of
    the tune, its first one and its end included. With codes, each tune is read as
    <eos> code tune <eos>, and the code's own tokens are not scored: they are the request,
    given, so the loss and bits/char count the tune alone, comparable with a model without.
    """

    def __init__(self, tunes: list[str], vocab: Vocabulary, codes: list[str] | None = None):
        codes = codes or [""] * len(tunes)
        # int32 arrays, not lists of Python ints: 4 bytes a token instead of 8 or more
        self.sequences = [np.array([vocab.eos_id, *vocab.encode(c + t), vocab.eos_id], dtype=np.int32)
                          for c, t in zip(codes, tunes)]
        self.code_tokens = [len(vocab.encode(c)) for c in codes]  # leading tokens read but not scored
        self.pad_id = vocab.pad_id
        self.chars = sum(len(t) for t in tunes)
        self.unknown = sum(int((seq == vocab.unk_id).sum()) for seq in self.sequences)

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        seq = self.sequences[i]
        x, y = seq[:-1], seq[1:].copy()  # the one-step shift: y[t] is the token after x[t]
        y[: self.code_tokens[i]] = self.pad_id  # the code is read, never predicted: padding, to the loss
        return x, y

    def lengths(self) -> np.ndarray:
        """Tokens read per tune: what a batch pads to."""
        return np.array([len(s) - 1 for s in self.sequences])

    def scored(self) -> np.ndarray:
        """Tokens scored per tune (its code's left out): what the loss divides by."""
        return self.lengths() - np.array(self.code_tokens, dtype=np.int64)


CHUNK = 4096  # tokens a row is read in at once; the corpus's longest row (with --control, its code too) has 2,538


def length_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator | None,
                   row_tokens: int = CHUNK) -> list[np.ndarray]:
    """Index batches of tunes of similar length, in random order when rng is given.

    Shuffle, then sort by length in buckets of 16 tokens: batches differ from epoch to
    epoch, yet each pads only to the longest of its near neighbours. A batch also stops before
    it would pad past batch_size x row_tokens tokens, so a tune k chunks long shares its batch
    with at most batch_size / k - 1 others, never 31 padded to its length (the corpus's tunes,
    all under a chunk, never meet that cap).
    """
    max_tokens = batch_size * row_tokens
    order = rng.permutation(len(lengths)) if rng is not None else np.arange(len(lengths))
    order = order[np.argsort(lengths[order] // 16, kind="stable")]
    batches, batch, longest = [], [], 0
    for i in order:
        if batch and (len(batch) == batch_size or (len(batch) + 1) * max(longest, lengths[i]) > max_tokens):
            batches.append(np.array(batch))
            batch, longest = [], 0
        batch.append(i)
        longest = max(longest, lengths[i])
    batches += [np.array(batch)] if batch else []
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def collate(items: list[tuple[np.ndarray, np.ndarray]], pad_id: int,
            length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a batch to its longest tune (or to `length`). The padding mask is y == pad_id:
    cross_entropy's ignore_index leaves those positions out of the loss and its gradient.
    No items give one row of padding: a process whose share of a batch is empty still steps."""
    items = items or [(np.zeros(0, np.int32), np.zeros(0, np.int32))]
    length = length or max(len(x) for x, _ in items)
    x = np.stack([pad_or_truncate(x, length, pad_id) for x, _ in items])  # (B, T)
    y = np.stack([pad_or_truncate(y, length, pad_id) for _, y in items])  # (B, T)
    return torch.from_numpy(x).long(), torch.from_numpy(y).long()


def padding_fraction(lengths: np.ndarray, batches: list[np.ndarray]) -> float:
    padded = sum(len(b) * int(lengths[b].max()) for b in batches)
    return 1.0 - int(lengths.sum()) / padded


# -----------------------------------------------------------------------------
# model: embedding -> LSTM -> linear, one set of logits per position


class LockedDropout(nn.Module):
    """Dropout with one mask per tune, the same at every time step: (B, 1, C) over (B, T, C).

    The variational dropout of Gal & Ghahramani (2016), which AWD-LSTM applies to an LSTM's input
    and output: a feature a tune loses, it loses for the whole tune. Its random numbers are T times
    fewer than per-element dropout's, whose masks cost 18% of a bf16 training step on a CPU without
    AMX (README, "Training")."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor, share: tuple[int, int, int] | None = None) -> torch.Tensor:  # (B, T, C)
        """share = (rank, ranks, rows) where x holds rows rank, rank + ranks, ... of a batch of `rows`
        split over processes (distributed.World.share): each process draws the whole batch's masks, the
        same on every one, and keeps its own rows', so each row gets the mask one process gives it."""
        if not self.training or self.p == 0:
            return x
        rank, ranks, rows = share or (0, 1, x.size(0))
        masks = x.new_empty(rows, 1, x.size(2)).bernoulli_(1 - self.p) / (1 - self.p)  # (rows, 1, C), alike on all
        keep = rank_rows(masks, rank, ranks) if rank < rows else 1.0  # (B, 1, C); an empty share: a padding row
        return x * keep


class MusicRNN(nn.Module):
    """Embedding -> LSTM -> Linear, over token ids. forward(x, state) -> (logits, state)."""

    def __init__(self, vocab_size: int, embedding_dim: int = 128, hidden_dim: int = 384,
                 num_layers: int = 1, dropout: float = 0.0, dropout_mask: str = "tune"):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.lstm = nn.LSTM(embedding_dim, hidden_dim, num_layers, batch_first=True,
                            dropout=dropout if num_layers > 1 else 0.0)
        self.dropout = LockedDropout(dropout) if dropout_mask == "tune" else nn.Dropout(dropout)
        self.to_logits = nn.Linear(hidden_dim, vocab_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier Linear; each LSTM weight matrix orthogonal as a whole, its four gates stacked (4H, .);
        zero biases except the forget gate's 1; the embedding keeps torch's N(0, 1)."""
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

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None,
                share: tuple[int, int, int] | None = None):
        """share: the rows of a batch split over processes that x holds (LockedDropout.forward)."""
        emb = self.drop(self.embedding(x), share)      # (B, T, E)
        out, state = self.lstm(emb, state)             # (B, T, H), ((L, B, H), (L, B, H))
        logits = self.to_logits(self.drop(out, share))  # (B, T, V)
        return logits, state

    def drop(self, x: torch.Tensor, share: tuple[int, int, int] | None) -> torch.Tensor:
        return self.dropout(x, share) if isinstance(self.dropout, LockedDropout) else self.dropout(x)


def parameter_summary(model: MusicRNN) -> str:
    """Layer, output shape, parameters.

    For the default (vocab 87, emb 128, hidden 384, 1 layer) the total is 834,135 =
    11,136 + 789,504 + 33,495: the LSTM has 4 x 384 x (128 + 384) weights and keeps two
    bias vectors per layer (b_ih and b_hh, 2 x 4 x 384), and the Linear layer 384 x 87 + 87.
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
    return MusicRNN(vocab_size, cfg.embedding_dim, cfg.hidden_dim, cfg.num_layers, cfg.dropout, cfg.dropout_mask)


def bf16_products(precision: str, device: torch.device) -> bool:
    """Whether training multiplies in bfloat16 (autocast; the weights and Adam stay fp32).
    auto asks for it only where the hardware has bf16 units: emulated, it is slower than fp32."""
    if precision == "bf16" and device.type == "cpu" and not cpu_runs_bf16_lstm():
        raise UserError("--precision bf16: this CPU cannot run the LSTM in bf16 (oneDNN has no bf16 LSTM "
                        "for it: it needs AVX-512); use --precision auto or fp32")
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)  # its default counts emulated bf16
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def cpu_runs_bf16_lstm() -> bool:
    """Whether this CPU runs an LSTM under bf16 autocast: oneDNN, which runs it, has no bf16 LSTM on
    an AVX2 CPU. A probe, not a list of CPU features: what oneDNN supports changes with its version."""
    lstm = nn.LSTM(2, 2, batch_first=True)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lstm(torch.zeros(1, 1, 2))  # (B, T, E)
        return True
    except RuntimeError:
        return False


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here")
    return torch.device(name)


# -----------------------------------------------------------------------------
# checkpoints: plain dicts of tensors and builtins, as nanoGPT's
#
# save_checkpoint writes one atomically; checkpoint_files.load_checkpoint reads it back with
# weights_only=True (tensors and plain values, never code), refusing in one line a file that is not
# one of ours, and check_finite refuses the weights of a training that diverged.


def save_checkpoint(path: Path, run: Run) -> None:
    p = run.progress
    ckpt = {
        "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
        "config": stored_config(run.cfg), "vocab": run.vocab.to_dict(),
        "epoch": p.epoch, "step": p.step, "best_val_loss": p.best_val,
        "history": p.history, "lr_scale": p.lr_scale, "tune_types": list(tune_types(run.train_tunes)),
        "seconds": run.seconds(), "batches_done": p.batches_done, "data": run.data_digests,
    }
    if p.batches_done:  # an epoch cut short: --resume draws its dropout masks on from here (on the CPU)
        ckpt["rng_state"] = p.rng_state
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    write_atomic(path, buffer.getvalue())  # a crash mid-write never leaves half a checkpoint


def model_facts(ckpt: dict, cfg: Config) -> sampler.ModelFacts:
    """What generation needs besides the vocabulary: control codes or not, the tune types known."""
    return sampler.ModelFacts(cfg.control, tuple(ckpt.get("tune_types", ())))


def model_from_checkpoint(ckpt: dict, path: str = "checkpoint") -> tuple[MusicRNN, Config, Vocabulary]:
    cfg = config_from_dict(Config, ckpt["config"], path)
    with checkpoint_mismatch(path):
        vocab = Vocabulary.from_dict(ckpt["vocab"])
        model = build_model(cfg, len(vocab))
        model.load_state_dict(real_weights(ckpt["model"]))
    check_finite(model, path)
    return model.eval(), cfg, vocab


# -----------------------------------------------------------------------------
# training: the step, the epoch, and the bookkeeping around them


@dataclass
class Progress:
    """Where a run stands; a checkpoint stores all of it but `stale`, which its history holds."""
    epoch: int = 0                                # whole epochs done
    step: int = 0                                 # optimizer steps done
    best_val: float = math.inf                    # best validation loss so far
    history: list = field(default_factory=list)   # one row of figures per epoch
    lr_scale: float = 1.0                         # the plateau schedule's factor
    stale: int = 0                                # epochs since the best validation loss
    batches_done: int = 0                         # batches of the next epoch done, when the time budget cut it
    rng_state: torch.Tensor | None = None         # and torch's generator there (torch.get_rng_state())
    seconds: float = 0.0                          # training time of the run's earlier sessions (--resume)


@dataclass
class Run:
    """One training run: settings, data, model, optimizer, progress and its clock."""
    cfg: Config
    device: torch.device
    vocab: Vocabulary
    train_tunes: list[str]                        # as written; augmentation rewrites copies
    train_codes: list[str] | None                 # their control codes, read before each (--control)
    train_set: MusicDataset
    val_set: MusicDataset
    model: MusicRNN
    optimizer: torch.optim.Optimizer
    progress: Progress
    world: World                                  # this process among the training's (distributed.py)
    ddp_model: nn.Module                          # the model steps go through: DistributedDataParallel(model) or it
    bf16: bool = False                            # the step's products in bfloat16 (bf16_products)
    data_digests: dict = field(default_factory=dict)  # the training and validation data's (collection_digest)
    started: float = 0.0                          # time.time() when this session's first epoch began

    def seconds(self) -> float:
        """Training time so far, the earlier sessions' included."""
        return self.progress.seconds + time.time() - self.started

    def budget_used(self) -> float:
        """The share of --max-minutes spent so far."""
        return self.seconds() / (self.cfg.max_minutes * 60)


def chunk_nll(model: nn.Module, x: torch.Tensor, y: torch.Tensor, state, pad_id: int,
              bf16: bool = False, share: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, tuple]:
    """The summed loss (nats) of one chunk x, y (B, t) of a batch, and the LSTM state after it.
    The padding mask is ignore_index: a target that is <pad> (a short tune's tail, or a control
    code's token, which is read but not scored) adds nothing to the loss or its gradient."""
    with torch.autocast(x.device.type, torch.bfloat16, enabled=bf16):
        logits, state = model(x, state, share)                            # (B, t, V)
    logits = logits.float().flatten(0, 1)                                 # (B * t, V)
    return F.cross_entropy(logits, y.flatten(), ignore_index=pad_id, reduction="sum"), state  # <pad>: no loss


def train_step(model: nn.Module, optimizer, x: torch.Tensor, y: torch.Tensor, pad_id: int,
               grad_clip: float, tokens: int, share: tuple[int, int, int] | None = None, bf16: bool = False,
               chunk: int = CHUNK) -> float:
    """One step of gradient descent; returns the summed loss (nats) of the rows x, y (B, T).

    The loss is the mean over the batch's `tokens` real tokens. Under torchrun the batch is
    split over processes, x holding this one's rows: share = (rank, ranks, rows of the batch).
    DistributedDataParallel averages the processes' gradients, so each sums its rows' losses,
    divides by the whole batch's token count and multiplies by ranks: every token then weighs
    the same, whichever process holds it, and each row gets the dropout mask one process gives it.

    A batch longer than `chunk` tokens is learnt chunk by chunk: the LSTM state is carried
    into the next chunk but the gradient is not (truncated backpropagation through time), so
    memory stays bounded; every tune of the corpus fits in one chunk.

    With bf16 the forward products run in bfloat16 (their gradients follow); the loss, the
    weights and Adam's moments stay fp32, so only the products' rounding changes.
    """
    optimizer.zero_grad(set_to_none=True)
    state, total = None, 0.0
    for xc, yc in zip(x.split(chunk, dim=1), y.split(chunk, dim=1)):   # (B, <= chunk) each
        nll, state = chunk_nll(model, xc, yc, state, pad_id, bf16, share)
        (nll * (share[1] if share else 1) / tokens).backward()
        total += nll.item()
        state = tuple(s.detach() for s in state)
    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return total


def learning_rate(cfg: Config, step: int, total_steps: int, lr_scale: float, budget_used: float = 0.0) -> float:
    """Cosine: linear warm-up, then cosine decay to 5% of the peak. Plateau: peak x lr_scale.

    The cosine follows the steps, or the time budget (budget_used = its fraction spent) when the
    run is behind it: on a slower machine the rate still anneals before --max-minutes stops the
    run. Steps and time are both counted from the start, warm-up included, so a run that keeps
    ahead of its budget depends on the seed alone, never on the clock.
    """
    if cfg.schedule == "plateau":
        return cfg.lr * lr_scale
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    done = max(step / total_steps, budget_used)  # share of the run behind us: by steps, or by the clock if slower
    warmup = cfg.warmup_steps / total_steps
    progress = min(1.0, max(0.0, (done - warmup) / max(1e-9, 1.0 - warmup)))
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress)))


RUN_FILES = ("best.pt", "last.pt", "loss.png")  # what a training writes in OUT/, beside its lock (.lock) and
                                                # with --tensorboard, OUT/tensorboard/


def log_line(*args) -> None:
    print(*args, flush=True)  # one line per epoch, visible at once even when piped to a file


def train(cfg: Config, resume: bool = False, overwrite: bool = False, tensorboard: bool = False,
          log=log_line, given: set[str] | None = None) -> dict:
    """Train with early stopping; write best.pt, last.pt and loss.png to cfg.out_dir. Returns the last epoch's row.

    The run folder is locked for the whole run: a second training into it is refused. Under
    torchrun this is one of several processes (distributed.py): each steps through its share
    of every batch, and rank 0 alone holds the lock, logs and writes.
    """
    out = check_output(cfg.out_dir, "--out", folder=True)
    pick_device(cfg.device)  # refused here, in every rank, before a process group is set up on it
    with removed_if_failed(out), distributed.session(cfg.device) as (world, device):  # a failed start leaves no folder
        log = log if world.writer else (lambda *args: None)
        with folder_lock(out, leftovers=RUN_FILES) if world.writer else contextlib.nullcontext():
            return train_loop(start_run(cfg, resume, overwrite, given, log, world, device), tensorboard, log)


def train_loop(run: Run, tensorboard: bool, log) -> dict:
    out = Path(run.cfg.out_dir)
    run.started = time.time()
    if not has_epochs_left(run):  # a resumed run that is done
        log(nothing_to_train(run))
    with tensorboard_writer(out) if tensorboard and run.world.writer else contextlib.nullcontext() as writer:
        train_epochs(run, writer, log)  # the writer closed however they end: its last events reach the file
    if run.world.writer and not (out / "loss.png").exists():  # every epoch draws it: here only a run that had none
        plots.plot_history(run.progress.history, out / "loss.png")
    there = [name for name in ("best.pt", "last.pt") if (out / name).exists()]  # a resumed folder may lack best.pt
    log(f"best val loss {run.progress.best_val:.4f}, checkpoints {' and '.join(there) or 'none'} in {out}/, "
        f"loss curve {out}/loss.png")
    return run.progress.history[-1] if run.progress.history else {}


def train_epochs(run: Run, writer, log) -> None:
    """Epochs until --epochs, early stopping or the time budget ends the run."""
    while has_epochs_left(run):
        rng = np.random.default_rng(run.cfg.seed + run.progress.epoch)  # per-epoch seeds: --resume replays
        torch.manual_seed(run.cfg.seed + run.progress.epoch)
        train_set = epoch_training_set(run, rng, log)
        figures, out_of_time = train_epoch(run, train_set, rng)
        if out_of_time and not figures["tokens"]:  # spent before this epoch's first step: no epoch to record
            log(budget_spent_line(run))
            break
        if end_of_epoch(run, figures, out_of_time, writer, log) or out_of_time:
            break


def budget_spent_line(run: Run) -> str:
    """The line for a run whose time budget ran out between two steps: how far it got, how to go on."""
    return (f"time budget reached after {work_done(run.progress)} ({run.seconds() / 60:.1f} min of --max-minutes "
            f"{run.cfg.max_minutes:g}, the run's sessions added up): --resume with more to go on")


def work_done(p: Progress) -> str:
    """"epoch 3", "epoch 3 and 9 batches of epoch 4" or "9 batches of epoch 1"."""
    whole = f"epoch {p.epoch}" if p.epoch or not p.batches_done else ""
    cut = f"{p.batches_done} batch{'es' * (p.batches_done != 1)} of epoch {p.epoch + 1}" if p.batches_done else ""
    return " and ".join(filter(None, (whole, cut)))


def nothing_to_train(run: Run) -> str:
    """Why a resumed run has no epoch left, and which limit to raise."""
    p, cfg = run.progress, run.cfg
    reached = [flag for flag, done in (("--epochs", p.epoch >= cfg.epochs), ("--patience", p.stale >= cfg.patience))
               if done]
    return (f"nothing to train: {p.epoch} of --epochs {cfg.epochs} done, {p.stale} without a better validation "
            f"loss (--patience {cfg.patience}); raise {' and '.join(reached)} to go on")


def has_epochs_left(run: Run) -> bool:
    """Neither --epochs nor early stopping (--patience, a resumed run's too) has ended the run."""
    return run.progress.epoch < run.cfg.epochs and run.progress.stale < run.cfg.patience


def train_epoch(run: Run, train_set: MusicDataset, rng: np.random.Generator) -> tuple[dict, bool]:
    """One pass over length-grouped batches; its figures, and whether the time budget ran out."""
    cfg, p, pad_id, world = run.cfg, run.progress, run.vocab.pad_id, run.world
    total_steps = cfg.epochs * math.ceil(len(train_set) / cfg.batch_size)
    lengths, scored = train_set.lengths(), train_set.scored()
    batches = length_batches(lengths, cfg.batch_size, rng)                # the same on every process
    run.model.train()
    started, sum_loss, sum_tokens, out_of_time, done = time.time(), 0.0, 0, False, restore_epoch_position(p)
    progress_bar = tqdm(batches[done:], desc=f"epoch {p.epoch + 1}/{cfg.epochs}", leave=False, file=sys.stderr,
                        initial=done, total=len(batches), disable=None if world.writer else True)
    for batch in progress_bar:
        budget_used = world.from_writer(run.budget_used())                # one clock for every process
        if budget_used > 1 and (p.step or sum_tokens):  # a run's first epoch takes one step at least: a model to save
            out_of_time = True
            break
        x, y = collate([train_set[i] for i in world.share(batch)], pad_id, int(lengths[batch].max()))  # (B / ranks, T)
        tokens = int(scored[batch].sum())                                  # scored tokens of the whole batch
        for group in run.optimizer.param_groups:
            group["lr"] = learning_rate(cfg, p.step, total_steps, p.lr_scale, budget_used)
        loss = train_step(run.ddp_model, run.optimizer, x.to(run.device), y.to(run.device), pad_id, cfg.grad_clip,
                          tokens, (world.rank, world.size, len(batch)), run.bf16)
        sum_loss, sum_tokens, p.step, done = sum_loss + loss, sum_tokens + tokens, p.step + 1, done + 1
        progress_bar.set_postfix(loss=f"{loss * world.size / tokens:.3f}")
    p.batches_done, p.rng_state = (done, torch.get_rng_state()) if out_of_time else (0, None)
    figures = {"train_loss": world.sum(sum_loss) / max(1, sum_tokens), "tokens": sum_tokens,
               "tokens_per_s": sum_tokens / (time.time() - started), "padding": padding_fraction(lengths, batches),
               "epoch_share": done / len(batches)}  # < 1 where the time budget ended the epoch early
    return figures, out_of_time


def restore_epoch_position(p: Progress) -> int:
    """The batch an epoch starts from: 0, or where the time budget cut it, torch's generator set back as it
    was there, so that the dropout masks go on as they would have. That is the CPU's generator: on a GPU,
    whose generator is not kept, the rest of the epoch draws the masks of its first batches again."""
    if p.batches_done:
        torch.set_rng_state(p.rng_state.cpu())
    return p.batches_done


def end_of_epoch(run: Run, figures: dict, out_of_time: bool, writer, log) -> bool:
    """Validate, log, write the checkpoints; True when early stopping ends the run. An epoch the time
    budget cut short is validated too (its model may be the best) but not counted: --resume finishes it."""
    p = run.progress
    p.epoch += not out_of_time
    val = evaluate(run.model, run.val_set, run.vocab.pad_id, run.device, world=run.world)
    row = {"epoch": p.epoch + out_of_time, "step": p.step, "train_loss": figures["train_loss"], "val_loss": val["loss"],
           "val_bits_per_char": val["bits_per_char"], "tokens_per_s": figures["tokens_per_s"],
           "padding": figures["padding"], "elapsed_s": run.seconds(),
           "lr": run.optimizer.param_groups[0]["lr"], "epoch_share": figures["epoch_share"]}
    p.history.append(row)
    log(epoch_line(row, out_of_time))
    if writer:
        for key in ("train_loss", "val_loss", "val_bits_per_char", "tokens_per_s"):
            writer.add_scalar(key, row[key], row["epoch"])
    improved = run.world.from_writer(val["loss"] < p.best_val)  # decided once, for every process
    p.stale = stale_after(p.stale, improved, whole=not out_of_time)
    p.best_val = val["loss"] if improved else p.best_val
    if not (improved or out_of_time):
        p.lr_scale *= 0.5  # only the plateau schedule reads it
    if run.world.writer:
        write_checkpoints(run, improved)
        plots.plot_history(p.history, Path(run.cfg.out_dir) / "loss.png")  # kept up: a run stopped by Ctrl-C has it
    if p.stale >= run.cfg.patience and p.epoch < run.cfg.epochs:
        log(f"early stop: no better validation loss for {run.cfg.patience} epochs")
        return True
    return False


def epoch_line(row: dict, out_of_time: bool) -> str:
    return (f"epoch {row['epoch']:3d} | train loss {row['train_loss']:.4f} | val loss {row['val_loss']:.4f} | "
            f"val bits/char {row['val_bits_per_char']:.4f} | {row['tokens_per_s']:,.0f} tok/s | "
            f"padding {row['padding']:.1%} | lr {row['lr']:.2e} | {row['elapsed_s'] / 60:.1f} min"
            + (f" (time budget reached {row['epoch_share']:.0%} into the epoch)" if out_of_time else ""))


def write_checkpoints(run: Run, improved: bool) -> None:
    """last.pt, and best.pt when the epoch improved: Ctrl-C (or kill) waits for both, so that a
    new best.pt never sits beside an old last.pt."""
    out = Path(run.cfg.out_dir)
    with deferred_interrupt():
        if improved:
            save_checkpoint(out / "best.pt", run)
        save_checkpoint(out / "last.pt", run)


def start_run(cfg: Config, resume: bool, overwrite: bool, given: set[str] | None, log,
              world: World | None = None, device_name: str | None = None) -> Run:
    """A new run, or with resume the one in OUT/last.pt. world and device_name come from
    distributed.session."""
    cfg, ckpt = run_settings(cfg, resume, overwrite, given)
    device = pick_device(device_name or cfg.device)
    seed_everything(cfg.seed)
    train_tunes, train_codes = load_collection(cfg.train_data, cfg.control, cfg.limit)
    val_tunes, val_codes = load_collection(cfg.val_data, cfg.control)
    with checkpoint_mismatch(str(Path(cfg.out_dir) / "last.pt")):
        texts = train_tunes + (train_codes or [])
        vocab = Vocabulary.from_dict(ckpt["vocab"]) if ckpt else build_vocabulary(texts, cfg)
        model = build_model(cfg, len(vocab)).to(device)
        world = world or World()
        run = Run(cfg, device, vocab, train_tunes, train_codes, MusicDataset(train_tunes, vocab, train_codes),
                  MusicDataset(val_tunes, vocab, val_codes), model, torch.optim.Adam(model.parameters(), lr=cfg.lr),
                  Progress(), world, model)
        if ckpt:
            restore(run, ckpt, log)
    typed = [f"--{name.replace('_', '-')}" for name in ("epochs", "patience", "max_minutes") if name in (given or ())]
    if ckpt and typed and not has_epochs_left(run):  # what was typed to go on would do nothing
        raise UserError(f"{' and '.join(typed)}: {nothing_to_train(run)}")
    run.data_digests = {"train_data": collection_digest(train_tunes, train_codes),
                        "val_data": collection_digest(val_tunes, val_codes)}  # a --control model reads the codes
    if ckpt:  # a checkpoint may have digested its validation tunes alone, their codes not counted
        check_same_data(ckpt.get("data", {}), run.data_digests, cfg, {"val_data": collection_digest(val_tunes)})
    run.ddp_model = distributed.wrap(model, world, device)  # after restore: every rank starts from these weights
    run.bf16 = bf16_products(cfg.precision, device)
    describe_run(run, val_tunes, log)
    return run


def run_settings(cfg: Config, resume: bool, overwrite: bool, given: set[str] | None) -> tuple[Config, dict | None]:
    """The settings a run trains with, and with resume OUT/last.pt (resumed_config says which settings
    this command may change); the run's files checked before any epoch."""
    last_path = Path(cfg.out_dir) / "last.pt"
    ckpt = load_checkpoint(str(last_path)) if resume else None
    check_run_files(last_path.parent, RUN_FILES, replace=resume or overwrite,  # all of them, before any epoch
                    inputs=(cfg.train_data, cfg.val_data))
    if ckpt is not None:
        cfg = resumed_config(ckpt, cfg, given, str(last_path))  # only some settings may change (settings.py)
    check_config(cfg, "the settings")
    check_unused_flags(cfg, given)
    return cfg, ckpt


def describe_run(run: Run, val_tunes: list[str], log) -> None:
    """What a run trains on, where, and what its user should know before the first epoch."""
    cfg, vocab = run.cfg, run.vocab
    log(f"{len(run.train_set)} training tunes, {len(run.val_set)} validation tunes, vocabulary {len(vocab)} "
        f"({cfg.tokenizer} tokens); {distributed.describe(run.world, run.device)}, "
        f"{'bf16' if run.bf16 else 'fp32'} products")
    warn_if_validation_is_trained_on(run.train_tunes, val_tunes, log)
    log(parameter_summary(run.model))


def warn_if_validation_is_trained_on(train_tunes: list[str], val_tunes: list[str], log) -> None:
    """Allowed (overfitting one tune is a sanity check), never silent: validation is then not a held-out measure."""
    known = set(train_tunes)
    shared = sum(tune in known for tune in val_tunes)
    if shared:
        log(f"warning: {shared} of the {len(val_tunes)} validation tunes are training tunes too: validation "
            f"bits/char measures memorising, not generalising")


def restore(run: Run, ckpt: dict, log) -> None:
    run.model.load_state_dict(real_weights(ckpt["model"]))
    run.optimizer.load_state_dict(ckpt["optimizer"])
    history = list(ckpt.get("history", []))
    run.progress = p = Progress(ckpt["epoch"], ckpt["step"], ckpt["best_val_loss"], history,
                                ckpt.get("lr_scale", 1.0), epochs_since_best(history),  # early stopping counts on
                                ckpt.get("batches_done", 0), ckpt.get("rng_state"), ckpt.get("seconds", 0.0))
    cut = ", where the time budget cut it" * bool(p.batches_done)
    log(f"resuming {Path(run.cfg.out_dir) / 'last.pt'} after {work_done(p)}{cut} (best val loss {p.best_val:.4f}, "
        f"{p.seconds / 60:.1f} of --max-minutes {run.cfg.max_minutes:g} spent)")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
             batch_size: int = 32, chunk: int = CHUNK, world: World | None = None) -> dict:
    """Loss per token, perplexity and bits per character over whole tunes.

    bits/char = total negative log-likelihood in bits (every scored token: each tune's <eos>
    included, a control code's tokens left out) / characters of the tunes' text. It does not
    depend on the tokenizer. Tunes longer than `chunk` tokens are read chunk by chunk with the
    state carried: the same numbers in bounded memory. Under torchrun each process scores its share
    of every batch and the sums are added up: the same figures as one process.
    """
    model.eval()
    world, lengths, total_nll = world or World(), dataset.lengths(), 0.0
    for batch in tqdm(length_batches(lengths, batch_size, None), desc="evaluate", leave=False,
                      disable=None if world.writer else True, file=sys.stderr):
        x, y = collate([dataset[i] for i in world.share(batch)], pad_id, int(lengths[batch].max()))  # (B / ranks, T)
        state = None
        for xc, yc in zip(x.split(chunk, dim=1), y.split(chunk, dim=1)):  # long tunes: the state carried on
            nll, state = chunk_nll(model, xc.to(device), yc.to(device), state, pad_id)
            total_nll += nll.item()
    total_nll, total_tokens = world.sum(total_nll), int(dataset.scored().sum())
    loss = total_nll / total_tokens
    perplexity = math.inf if loss > 700 else math.exp(loss)  # exp overflows past 709 nats (a diverged model)
    return {"loss": loss, "perplexity": perplexity, "bits_per_char": total_nll / math.log(2) / dataset.chars,
            "tunes": len(dataset), "chars": dataset.chars, "tokens": total_tokens, "unknown": dataset.unknown}


# -----------------------------------------------------------------------------
# sampling with temperature: one token per step, the LSTM state (h, c) carried along
#
# sampler.generate_tunes runs the loop: feed the last token and the state, get the logits of the
# next token, draw it with sampler.sample_next, repeat until <eos> (or opts.max_tokens: the tune is
# cut off unfinished). sample_next is where the temperature acts: the logits are divided by it
# (below 1 sharpens the distribution, above 1 flattens it: `z = logits / temperature` in
# sample_next), top-k keeps the k largest, and one uniform number per tune draws the token from the
# cumulative probabilities. The loop lives in a torch-free module so that infer_onnx.py runs the
# very same code over onnxruntime.
# In short:
#
#     state, token = None, <eos>                            # <eos> starts a tune (the prompt is fed next)
#     repeat:
#         logits, state = step(token, state)                # (B, V); the state carried to the next step
#         logits += constraint.penalty(tune, tokens_left)   # with --constrained: -inf on illegal tokens
#         token = sample_next(logits / temperature)         # one uniform draw per tune
#         constraint.advance(tune, token)


def torch_step(model: MusicRNN, device: torch.device):
    """The model as the sampler wants it: (tokens (B, 1), state) -> (logits (B, V), state)."""

    @torch.no_grad()
    def step(tokens: np.ndarray, state):
        logits, state = model(torch.from_numpy(tokens).to(device), state)  # (B, 1, V)
        return logits[:, -1].float().cpu().numpy(), state

    return step


def generate(model: MusicRNN, vocab: Vocabulary, device: torch.device,
             opts: sampler.SamplingOptions = sampler.SamplingOptions(),
             facts: sampler.ModelFacts = sampler.ModelFacts()) -> list[str]:
    """opts.num tunes, each opts.prompt followed by what the model writes until <eos> (at most
    opts.max_tokens tokens)."""
    return sampler.generate_tunes(torch_step(model.eval(), device), vocab, opts, facts=facts)


# -----------------------------------------------------------------------------
# constrained sampling: SamplingOptions(constrained=True)
#
# Before each draw, the sampler adds a mask to every tune's logits: 0 for the tokens that
# keep the tune valid, -inf for the others, so they are never drawn and the rest keep their relative
# probabilities (sampler.generate_tunes builds the constraint; sampler.mask_illegal adds
# constraint.penalty(tune, tokens_left) to each row's logits before sample_next draws, and
# constraint.advance(tune, token) follows the token drawn). abc_constraint.AbcConstraint follows the
# ABC as it is written and guarantees: a header X:, R: (optional), L:, M:, K: (a prompt may give R:,
# L:, M: in any order, and info lines like T:); bars that are exactly full (broken rhythm, triplets,
# chords, ties and pickups counted); chords and grace groups closed; an end only after 4 full bars,
# 16 notes and a section end; the end within max_bars bars and max_tokens tokens (when it must end,
# the bars left take the longest notes that fit, and the next section end closes the tune, 4 bars or
# not). Asked for a form (--form, --sections/--bars: opts.form), it holds exactly that many sections
# of exactly those bars, counted as abc_form counts them, and ends after the last. It never replaces
# the model's choice, it only removes the illegal ones.


# -----------------------------------------------------------------------------
# augmentation: new training tunes from old ones, right by construction
#
# transpose_tune(abc, k) moves every note, key and chord symbol k semitones and spells the
# notes with the new key's letters; change_rhythm(abc, 2) doubles every length and scales
# M: so that bars stay full; set_unit_length(abc, "1/16") rewrites L: and every length with
# the music unchanged. abc2midi confirms all three on the test tunes (tests/test_augment.py).


def augmentation_draws(rng: np.random.Generator, key_share: float, unit_share: float,
                       rhythm_share: float) -> tuple[int | None, int | Fraction | None, str | None]:
    """One tune's random choices, None where none is drawn: with probability key_share a transposition
    (-5..+6 semitones), with rhythm_share every length doubled or halved, with unit_share a unit
    length (L:1/8, 1/16, 1/4). The key and the unit draw a number whatever their share; the rhythm
    only above 0 (its default)."""
    shift = int(rng.choice(list(range(-5, 7)))) if rng.random() < key_share else None
    rhythm = None
    if rhythm_share and rng.random() < rhythm_share:
        rhythm = (2, Fraction(1, 2))[int(rng.integers(2))]
    unit = str(rng.choice(["1/8", "1/16", "1/4"])) if rng.random() < unit_share else None
    return shift, rhythm, unit


def rewrite_tune(tune: str, draws: tuple, low: int = LOWEST, high: int = HIGHEST) -> tuple[str, bool | None]:
    """The tune with augmentation_draws' choices applied, for training (never validation); and
    whether its transposition was refused (a note outside [low, high], or a key that writes out its
    accidentals: it then keeps its key; None: no transposition was drawn)."""
    shift, rhythm, unit = draws
    refused = None if shift is None else False
    if shift is not None:
        try:
            tune = transpose_tune(tune, shift, low, high)
        except RewriteError:
            refused = True
    if rhythm is not None:
        try:
            tune = change_rhythm(tune, rhythm)
        except RewriteError:
            pass  # a meter that cannot scale (M:none), or a hornpipe's that abc2midi would refuse: kept as is
    return (tune if unit is None else set_unit_length(tune, unit)), refused


def epoch_training_set(run: Run, rng: np.random.Generator, log) -> MusicDataset:
    """This epoch's training tunes: as written, or with the configured shares augmented.

    Every process draws every tune's choices, so the random stream is the same as one
    process's; each rewrites only every size-th tune, and the processes swap their shares.
    """
    cfg, world = run.cfg, run.world
    if not (cfg.augment_key or cfg.augment_unit or cfg.augment_rhythm):
        return run.train_set
    low, high = parse_note_range(cfg.transpose_range)  # checked when the run started
    draws = [augmentation_draws(rng, cfg.augment_key, cfg.augment_unit, cfg.augment_rhythm) for _ in run.train_tunes]
    mine = world.share(np.arange(len(run.train_tunes)))
    augmented = world.gather_shares([rewrite_tune(run.train_tunes[i], draws[i], low, high) for i in mine])
    if cfg.augment_key:
        log(f"augmentation: {sum(r is True for _, r in augmented)} of {sum(r is not None for _, r in augmented)} "
            f"transpositions refused (notes outside {cfg.transpose_range}, or a key with its accidentals "
            f"written out)")
    # each rewrite keeps the sections and their bars; the code's E values, read from the written notes,
    # can differ for the rewritten text (about 1 in 400 transpositions or unit rewrites of training
    # tunes), and each tune keeps its record's code
    return MusicDataset([t for t, _ in augmented], run.vocab, run.train_codes)


# -----------------------------------------------------------------------------
# command line


DATA_HELP = ("an IrishMAN JSON list of {\"control code\", \"abc notation\"} records, an .abc tunebook, "
             "a folder of them (its .abc and .json files), or any URL pandas opens (hf://datasets/..., "
             "with huggingface_hub)")


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(prog="musicrnn.py", description=__doc__.strip().splitlines()[0],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train_parser(sub)
    p = command(sub, "evaluate", "loss, perplexity and bits per character of a checkpoint on a collection")
    p.add_argument("--checkpoint", default="runs/best.pt", help="the model to score (default: runs/best.pt)")
    p.add_argument("--data", default="data/validation.json", help=f"{DATA_HELP} (default: data/validation.json)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to run: auto takes a GPU when there is one (default: auto)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of two lines")
    p = command(sub, "generate", "write new tunes with a checkpoint (torch; infer_onnx.py does it without)")
    p.add_argument("--checkpoint", default="runs/best.pt", help="the model that writes (default: runs/best.pt)")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"],
                   help="where to run: one token at a time is fastest on the CPU (default: cpu)")
    sampler.add_sampling_flags(p)
    judging.add_commands(sub, command)  # sweep, forms, types
    p = command(sub, "stats", "corpus statistics: tunes, lengths, the most frequent tokens")
    p.add_argument("--data", default="data/train.json", help=f"{DATA_HELP} (default: data/train.json)")
    p.add_argument("--plot", help="also draw the length histogram and the token counts to this .png file")
    p.add_argument("--overwrite", action="store_true", help="let --plot replace an existing file")
    return parser


def command(sub, name: str, what: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=what, description=what)


def add_train_parser(sub) -> None:
    p = command(sub, "train", "train a model: OUT/best.pt (the best validation loss), OUT/last.pt, OUT/loss.png")
    cli.dataclass_flags(p, Config, FLAG_CHOICES, FLAG_TYPES, flag_names={"out_dir": "out"})
    again = p.add_argument_group("an existing run folder").add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue OUT/last.pt as it was set up; only --epochs, --max-minutes, --patience, "
                            "--device and --precision may change")
    again.add_argument("--overwrite", action="store_true", help="start afresh, replacing the checkpoints in OUT/")
    p.add_argument("--tensorboard", action="store_true",
                   help="also log the curves to OUT/tensorboard (needs pip install tensorboard)")
    p.add_argument("--procs", type=cli.int_in(1, 256), default=1,
                   help="train as this many processes of this machine (torchrun's launcher, gloo on the CPU, the "
                        "cores shared out): the same model as one process, dropout's tune masks included; make train "
                        "gives 2 on 2 cores; at most one a core (default: 1)")


def cmd_train(args) -> None:
    out = Path(Config.out_dir if args.out_dir is None else args.out_dir)
    with removed_if_failed(out):  # ranks stopped before a checkpoint clean up nothing: the launcher does
        launched = distributed.launched(args.procs, [__file__, *args.argv])  # this very command again, as ranks
    if launched:
        return
    given = {f.name for f in fields(Config) if getattr(args, f.name) is not None}
    train(cli.dataclass_from_args(Config, args), resume=args.resume, overwrite=args.overwrite,
          tensorboard=args.tensorboard, given=given)


def cmd_evaluate(args) -> None:
    device = pick_device(args.device)
    model, cfg, vocab = model_from_checkpoint(load_checkpoint(args.checkpoint, device), args.checkpoint)
    tunes, codes = load_collection(args.data, cfg.control)  # a --control model reads each code first
    metrics = evaluate(model.to(device), MusicDataset(tunes, vocab, codes), vocab.pad_id, device)
    if args.json:
        shown = {k: metrics[k] for k in ("loss", "perplexity", "bits_per_char", "tunes", "chars", "unknown")}
        print(json.dumps({k: v if math.isfinite(v) else None for k, v in shown.items()}))  # JSON has no inf
    else:
        print(f"{args.data}: {metrics['tunes']} tunes, {metrics['chars']:,} characters, "
              f"{metrics['unknown']} unknown symbols")
        print(f"loss {metrics['loss']:.4f} nats/token | perplexity {metrics['perplexity']:.3f} | "
              f"{metrics['bits_per_char']:.4f} bits/char")


def cmd_generate(args) -> None:
    def load():
        device = pick_device(args.device)
        model, vocab, facts = sampling_model(args.checkpoint, device)
        return torch_step(model, device), vocab, facts

    sampler.run_generation(load, args, args.checkpoint)


def sampling_model(checkpoint: str, device: torch.device) -> tuple[MusicRNN, Vocabulary, sampler.ModelFacts]:
    """A checkpoint ready to sample from: its model, in eval mode on device; its vocabulary and facts."""
    ckpt = load_checkpoint(checkpoint, device)
    model, cfg, vocab = model_from_checkpoint(ckpt, checkpoint)
    return model.to(device).eval(), vocab, model_facts(ckpt, cfg)


def cmd_stats(args) -> None:
    if args.overwrite and not args.plot:
        raise UserError("--overwrite replaces an existing --plot; without --plot, stats writes no file")
    plot = plots.checked_plot_path(args.plot, args.overwrite, [args.data]) if args.plot is not None else None
    stats = plots.corpus_stats(load_tunes(args.data))
    print(plots.stats_text(stats))
    if plot:
        plots.plot_stats(stats, plot, args.overwrite)
        print(f"plot written to {plot}")


def cmd_judge(args) -> None:
    """sweep, forms and types: judging.py's commands, with the torch model loaded here."""
    judging.run_command(args, torch_generator)


def torch_generator(checkpoint: str):
    device = torch.device("cpu")
    model, vocab, facts = sampling_model(checkpoint, device)
    return (lambda opts: generate(model, vocab, device, opts, facts)), facts


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "generate": cmd_generate, "sweep": cmd_judge,
            "forms": cmd_judge, "types": cmd_judge, "stats": cmd_stats}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser().parse_args(argv)
    args.argv = argv  # as typed: train --procs N runs it again as N processes
    return cli.run_command(COMMANDS[args.command], args)


if __name__ == "__main__":
    distributed.exit_process(main())  # sys.exit(main()), made safe for torchrun's ranks
