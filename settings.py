"""
settings: the rules every training config obeys, torch-free.

Holds:
- FLAG_TYPES, FLAG_CHOICES: the range or the choices of each setting, which argparse checks on
  the flags and check_config on a config from anywhere else (an API caller, a checkpoint);
- MAX_PARAMETERS, parameter_count: how large a model may be, counted without building it;
- config_from_dict: a checkpoint's stored settings back as a checked config;
- check_checkpoint_fields: a checkpoint's progress and tune types, of the kinds training writes;
- RESUME_MAY_CHANGE, resumed_config: which settings a --resume may change; the others would
  make it another run, and are refused when they differ;
- stored_config, stale_after, epochs_since_best, check_same_data: what a checkpoint keeps of a run's settings,
  and what --resume reads back from it (the early-stopping count, the data's digests).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, fields, replace
from typing import NoReturn

import cli
from abc_music import parse_note_range
from abc_tokens import TOKENIZERS
from cli import UserError

LEAST_LR = 1e-8  # an Adam step moves a weight by about lr: below this, float32 weights of 0.01-1 round it away

FLAG_TYPES = {  # the range of every numeric setting: checked on the flags and on any Config used
    "limit": cli.int_in(1), "min_count": cli.int_in(1), "augment_key": cli.float_in(0, 1),
    "augment_rhythm": cli.float_in(0, 1), "augment_unit": cli.float_in(0, 1),
    "embedding_dim": cli.int_in(1, 4096), "hidden_dim": cli.int_in(1, 4096), "num_layers": cli.int_in(1, 16),
    "dropout": cli.float_in(0, 1, high_open=True), "batch_size": cli.int_in(1, 4096),
    "lr": cli.float_in(LEAST_LR, 10), "warmup_steps": cli.int_in(0, 10**7), "epochs": cli.int_in(1, 10**6),
    "patience": cli.int_in(1, 10**6), "grad_clip": cli.float_in(0, 1e6, low_open=True),
    "max_minutes": cli.float_in(0, 10**6, low_open=True), "seed": cli.int_in(0, 2**32 - 1),
}
FLAG_CHOICES = {"tokenizer": list(TOKENIZERS), "schedule": ["cosine", "plateau"], "device": ["auto", "cpu", "cuda"],
                "precision": ["auto", "bf16", "fp32"], "dropout_mask": ["tune", "element"]}
BEFORE_ADDED = {"dropout_mask": "element"}  # settings a checkpoint may lack: the value a checkpoint
#                                          without the key was trained with
MAX_PARAMETERS = 100_000_000  # a model this project's CPUs can train; Adam keeps 3 more copies


def parameter_count(cfg, vocab_size: int) -> int:
    """What build_model(cfg, vocab_size) will hold, without building it: the embedding, each
    layer's four gates over its input and its state with two bias vectors, the output layer."""
    E, H, L, V = cfg.embedding_dim, cfg.hidden_dim, cfg.num_layers, vocab_size
    lstm = 4 * H * (E + H) + 8 * H + (L - 1) * (4 * H * 2 * H + 8 * H)
    return V * E + lstm + H * V + V


def check_config(cfg, source: str) -> None:
    """Every setting in its range and of its kind, wherever the Config came from."""
    cli.check_dataclass(cfg, FLAG_TYPES, source)
    for name, allowed in FLAG_CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise UserError(f"{source}: --{name} must be one of {', '.join(allowed)}, not {getattr(cfg, name)!r}")
    if not all(isinstance(getattr(cfg, n), str) for n in ("train_data", "val_data", "transpose_range", "out_dir")):
        raise UserError(f"{source}: data paths, --out and --transpose-range must be text")
    if not isinstance(cfg.control, bool):  # "no" would read as true, and the export would refuse its own file
        raise UserError(f"{source}: --control must be true or false, not {cfg.control!r}")
    check_note_range(cfg.transpose_range, source)  # refuse a bad --transpose-range before training
    if parameter_count(cfg, vocab_size=1000) > MAX_PARAMETERS:
        raise UserError(f"{source}: a model of --hidden-dim {cfg.hidden_dim} x --num-layers {cfg.num_layers} has more "
                        f"than {MAX_PARAMETERS:,} parameters, more than a CPU trains in reasonable time")


def check_unused_flags(cfg, given: set[str] | None) -> None:
    """Refuse a flag typed (given) that this config would ignore: a flag is never silently dropped."""
    given = given or set()
    if "min_count" in given and cfg.tokenizer != "abc":
        raise UserError(f"--min-count applies to --tokenizer abc only (the {cfg.tokenizer} tokenizer keeps every "
                        f"character it sees)")
    if "transpose_range" in given and not cfg.augment_key:
        raise UserError("--transpose-range bounds the transpositions of --augment-key, which is 0 here")
    if "warmup_steps" in given and cfg.schedule != "cosine":
        raise UserError(f"--warmup-steps warms up the cosine schedule only; --schedule is {cfg.schedule} here")
    if "dropout_mask" in given and not cfg.dropout:
        raise UserError("--dropout-mask chooses how --dropout draws its masks, and --dropout is 0 here")


def check_note_range(text: str, source: str) -> None:
    """A --transpose-range that reads as two notes, the lower one first (source: where the setting came from)."""
    try:
        low, high = parse_note_range(text)
    except ValueError as e:
        raise UserError(f"{source}: --transpose-range {e}") from None
    if low > high:
        raise UserError(f"{source}: --transpose-range {text}: its first note is above its second; give the lower one "
                        f"first")
    if low < 0 or high > 127:  # a transposed tune would hold notes no MIDI file can
        raise UserError(f"{source}: --transpose-range {text}: give notes among MIDI's notes, 0 to 127 (C,,,,, to "
                        f"g''''), not {low} to {high}")


def config_from_dict(config_class, values: dict, source: str = "checkpoint"):
    """The config a checkpoint stored, checked; keys that config_class does not have are dropped, and
    those a checkpoint may lack (BEFORE_ADDED) take the value a checkpoint without them was trained with."""
    if not isinstance(values, dict):
        raise UserError(f"{source}: its config is not a table of settings")
    known = {f.name for f in fields(config_class)}
    cfg = config_class(**{k: v for k, v in {**BEFORE_ADDED, **values}.items() if k in known})
    check_config(cfg, source)
    return cfg


HISTORY_FIGURES = {"epoch", "train_loss", "val_loss"}  # what a row must hold: the loss curve draws them


def check_checkpoint_fields(ckpt: dict, source: str) -> None:
    """A checkpoint's progress and tune types, of the kinds and in the ranges training writes them:
    a crafted one is refused here, in one line, never deep inside a training or an export."""
    for name in ("epoch", "step", "batches_done"):  # batches_done: only where the time budget cut an epoch
        if not (_is_int(ckpt.get(name, 0)) and ckpt.get(name, 0) >= 0):
            _refuse(source, name, ckpt[name], "a whole number, 0 or more")
    best = ckpt["best_val_loss"]
    if not (_is_number(best) and (math.isfinite(best) or best == math.inf)):
        _refuse(source, "best_val_loss", best, "a finite number (inf before any validation)")
    lr_scale = ckpt.get("lr_scale", 1.0)
    if not (_is_number(lr_scale) and 0 <= lr_scale <= 1):
        _refuse(source, "lr_scale", lr_scale, "a number from 0 to 1")
    history = ckpt.get("history", [])
    if not (isinstance(history, list) and all(_is_row(row) for row in history)):
        _refuse(source, "history", history, "a list of rows of numbers with " + ", ".join(sorted(HISTORY_FIGURES)))
    seconds = ckpt.get("seconds", 0.0)
    if not (_is_number(seconds) and 0 <= seconds < math.inf):
        _refuse(source, "seconds", seconds, "0 or more seconds")
    rng_state = ckpt.get("rng_state")
    if ckpt.get("batches_done", 0) and not (getattr(rng_state, "dtype", None) is not None
                                            and str(rng_state.dtype) == "torch.uint8" and rng_state.dim() == 1):
        _refuse(source, "rng_state", type(rng_state).__name__, "torch's generator state (torch.get_rng_state())")
    data = ckpt.get("data", {})
    if not (isinstance(data, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in data.items())):
        _refuse(source, "data", data, "the digests of its data, as text")
    types = ckpt.get("tune_types", [])
    if not (isinstance(types, (list, tuple)) and all(isinstance(t, str) for t in types)):
        _refuse(source, "tune_types", types, "a list of tune types as text")
    optimizer = ckpt.get("optimizer")
    for group in optimizer.get("param_groups", []) if isinstance(optimizer, dict) else []:
        if not _adam_settings(group):  # a --resume would train on with them: Adam with betas of 5 diverges
            shown = {k: group.get(k) for k in ("betas", "eps", "weight_decay")} if isinstance(group, dict) else group
            _refuse(source, "optimizer's settings", shown, "Adam's: betas from 0 to under 1, eps above 0, "
                                                           "weight_decay 0 or more")


def _adam_settings(group) -> bool:
    if not isinstance(group, dict):
        return False
    betas, eps, decay = group.get("betas"), group.get("eps"), group.get("weight_decay", 0.0)
    return (isinstance(betas, (list, tuple)) and len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas)
            and _is_number(eps) and 0 < eps < math.inf and _is_number(decay) and 0 <= decay < math.inf)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_row(row) -> bool:
    return isinstance(row, dict) and HISTORY_FIGURES <= row.keys() and all(_is_number(v) for v in row.values())


def _refuse(source: str, name: str, value, wanted: str) -> NoReturn:
    raise UserError(f"{source}: its {name} must be {wanted}, not {repr(value)[:40]}")


RESUME_MAY_CHANGE = ("epochs", "max_minutes", "patience", "device", "precision")  # the rest would make it another run


def _same(name: str, typed, stored) -> bool:
    """A setting typed again on --resume is the stored one: data paths as paths (./data/x.json, and its
    absolute spelling, are data/x.json)."""
    if name in ("train_data", "val_data") and "://" not in typed + stored:
        return os.path.abspath(typed) == os.path.abspath(stored)  # each from the folder the command runs in
    return typed == stored


def resumed_config(ckpt: dict, cfg, given: set[str] | None, source: str):
    """The checkpoint's settings, with those of RESUME_MAY_CHANGE that this command gives (given:
    the flags typed; None: every field of cfg). Any other given setting that differs is refused."""
    old = config_from_dict(type(cfg), ckpt["config"], source)
    given = {f.name for f in fields(cfg)} - {"out_dir"} if given is None else given - {"out_dir"}
    differ = [name for name in sorted(given - set(RESUME_MAY_CHANGE)) if not _same(name, getattr(cfg, name),
                                                                                  getattr(old, name))]
    if differ:
        raise UserError("--resume continues a run as it was set up, and these differ from its checkpoint: "
                        + ", ".join(f"--{n.replace('_', '-')} {getattr(cfg, n)} (it has {getattr(old, n)})"
                                    for n in differ) + "; start a new run with --out DIR instead")
    cfg = replace(old, out_dir=cfg.out_dir, **{n: getattr(cfg, n) for n in RESUME_MAY_CHANGE if n in given})
    if cfg.epochs < ckpt["epoch"]:
        raise UserError(f"--epochs {cfg.epochs}: {source} has already done {ckpt['epoch']} epochs")
    # the budget counts the run's sessions added up; one its own budget stopped has overrun that a little
    spent = ckpt.get("seconds", 0.0) / 60
    if "max_minutes" in given and cfg.max_minutes < min(spent, old.max_minutes):
        raise UserError(f"--max-minutes {cfg.max_minutes:g}: {source} has already trained for {spent:.2f} min; "
                        f"give more to go on")
    return cfg


def check_same_data(then: dict, now: dict, cfg, also: dict | None = None) -> None:
    """--resume reads the tunes the run began with: a file changed since would train on other tunes, and
    its validation loss would be compared with a best from other tunes. A checkpoint without digests
    cannot be checked, and is taken as it is; also: a digest of the same data that a checkpoint may hold
    instead (one that counted less of it)."""
    for name, digest in now.items():
        if then.get(name, digest) not in (digest, (also or {}).get(name)):
            raise UserError(f"--resume: {getattr(cfg, name)} holds other tunes than when the run began ({digest} now, "
                            f"{then[name]} then): restore it, or start afresh with --overwrite")


def stale_after(stale: int, improved: bool, whole: bool) -> int:
    """Early stopping's count after one more validation: the epochs since the loss last improved (an
    epoch the time budget cut short may improve it, but counts no epoch)."""
    return 0 if improved else stale + whole


def epochs_since_best(history: list[dict]) -> int:
    """stale_after, read back from a run's history."""
    best, stale = math.inf, 0
    for row in history:
        stale = stale_after(stale, row["val_loss"] < best, row.get("epoch_share", 1.0) == 1.0)
        best = min(best, row["val_loss"])
    return stale


def stored_config(cfg) -> dict:
    """The settings as a checkpoint keeps them: local data paths made absolute, so that --resume
    finds the data from any folder (a URL stays as typed)."""
    local = [name for name in ("train_data", "val_data") if "://" not in getattr(cfg, name)]
    return asdict(cfg) | {name: os.path.abspath(getattr(cfg, name)) for name in local}
