"""
checkpoint_files: reading a musicrnn checkpoint back, and refusing in one line what is not one.

Holds:
- load_checkpoint: a checkpoint dict, loaded with weights_only=True (never unpickling code), its
  keys and progress fields checked (settings.check_checkpoint_fields);
- checkpoint_mismatch: a checkpoint whose parts do not fit the model or the optimizer, as one line;
- check_finite: NaN or infinite weights refused.
The lesson (musicrnn.py) writes checkpoints (save_checkpoint) and calls these to read them.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import warnings
import zipfile

import torch
from torch import nn

import cli
from cli import UserError
from settings import check_checkpoint_fields

CHECKPOINT_KEYS = {"model", "config", "vocab", "optimizer", "epoch", "step", "best_val_loss"}


def load_checkpoint(path: str, device: torch.device | str = "cpu") -> dict:
    """Load a checkpoint dict. Refuses anything that is not one: never unpickles code."""
    cli.check_model_file(path, "checkpoint", "best.pt", " (`make train` writes it)" if path == "runs/best.pt" else "")
    if not os.access(path, os.R_OK):  # zipfile.is_zipfile would call it "not a zip file"
        raise UserError(f"{path}: permission denied")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path}: not a musicrnn checkpoint (not a PyTorch zip file)")
    try:
        with warnings.catch_warnings():  # torch's own warnings would come before our one line
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path}: not a musicrnn checkpoint (it holds Python objects, and loading those "
                        f"would run code; musicrnn loads tensors and plain values only)") from None
    except Exception as e:  # truncated zip, foreign format: all the same to a user
        raise UserError(f"{path}: not a readable musicrnn checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or not CHECKPOINT_KEYS <= ckpt.keys():
        raise UserError(f"{path}: not a musicrnn checkpoint (missing {sorted(CHECKPOINT_KEYS - set(ckpt or {}))})"
                        if isinstance(ckpt, dict) else f"{path}: not a musicrnn checkpoint")
    check_checkpoint_fields(ckpt, path)  # epoch, step, history, ...: refused here if not as training writes them
    return ckpt


def check_finite(model: nn.Module, path: str) -> None:
    """Refuse NaN or infinite weights (a training that diverged, a crafted file): their outputs are too."""
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise UserError(f"{path}: its weights are not finite (NaN or inf in {', '.join(bad[:3])}); "
                        f"use a checkpoint of a training that did not diverge")


def real_weights(state: dict) -> dict:
    """A state dict whose tensors are real numbers, as every weight of ours is; a crafted one (complex,
    integer) raises TypeError, which checkpoint_mismatch words, where loading would cast it with a warning."""
    odd = [name for name, t in state.items() if not (torch.is_tensor(t) and t.is_floating_point())]
    if odd:
        raise TypeError(f"weights that are not real numbers: {', '.join(odd[:3])}")
    return state


@contextlib.contextmanager
def checkpoint_mismatch(path: str):
    """A checkpoint whose parts do not fit musicrnn's model or optimizer: one line, no traceback."""
    try:
        yield
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError, AttributeError) as e:
        raise UserError(f"{path}: checkpoint does not match musicrnn's model ({cli.first_line(e, 120)})") from None
