"""
cli: command-line plumbing shared by musicrnn.py, infer_onnx.py and export.py. Torch-free.

Holds:
- dataclass_flags: one flag per field of a config dataclass, its help taken from the
  field's own comment and its group from the comment line above, so each setting is
  documented once, in the dataclass;
- dataclass_from_args: the dataclass back from the parsed flags;
- positive_int, positive_float: argparse types that refuse what makes no sense, in words.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import tokenize


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def field_comments(cls) -> tuple[dict[str, str], dict[str, str]]:
    """({field: its trailing comment}, {field: the group comment above it}) of a dataclass."""
    comments, groups, group, name = {}, {}, "options", None
    for tok in tokenize.generate_tokens(io.StringIO(inspect.getsource(cls)).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and name is None:
            name = tok.string  # the first name on a line inside the class body
        elif tok.type == tokenize.COMMENT:
            if name is None and tok.start[1] == 4:
                group = tok.string.lstrip("# ").strip()
            elif name is not None:
                comments[name], groups[name] = tok.string.lstrip("# ").strip(), group
        if tok.type in (tokenize.NEWLINE, tokenize.NL):
            name = None
    return comments, groups


def dataclass_flags(parser: argparse.ArgumentParser, cls, choices: dict | None = None,
                    types: dict | None = None, flag_names: dict | None = None) -> None:
    """One --flag per field of cls, in argument groups as the dataclass's comments group them.

    The type comes from types (an argparse type that checks the range) or the annotation;
    every flag defaults to None, so dataclass_from_args keeps only what the user gave.
    """
    comments, groups = field_comments(cls)
    defaults, choices, types, flag_names = cls(), choices or {}, types or {}, flag_names or {}
    sections = {}
    for f in dataclasses.fields(cls):
        title = groups.get(f.name, "options")
        if title not in sections:
            sections[title] = parser.add_argument_group(title)
        kind = types.get(f.name) or {"int": int, "float": float, "str": str}[f.type.split(" ")[0]]
        flag = "--" + flag_names.get(f.name, f.name.replace("_", "-"))
        sections[title].add_argument(flag, dest=f.name, type=kind, choices=choices.get(f.name), default=None,
                           help=f"{comments.get(f.name, '')} (default: {getattr(defaults, f.name)})")


def dataclass_from_args(cls, args: argparse.Namespace):
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}
    return cls(**given)
