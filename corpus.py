"""
corpus: reading and writing collections of tunes, torch-free.

Holds:
- load_tunes: the "abc notation" texts of an IrishMAN-format JSON list of records (any path
  or URL pandas opens, hf://datasets/... included), of an .abc tunebook, or of a folder of
  them; tunes that are not music are skipped and counted; load_records: the same with each
  tune's "control code" ("" where the record has none, and for tunebooks);
- read_irishman_json, read_text: the two readers, each failure one clear line (UserError);
- write_irishman_json: tunes as IrishMAN records.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from abc_music import read_tunebook
from cli import UserError, first_line
from safe_write import write_atomic


def load_tunes(path: str) -> list[str]:
    """The "abc notation" texts of a collection (load_records without the codes)."""
    return [tune for _, tune in load_records(path)]


def load_records(path: str) -> list[tuple[str, str]]:
    """(control code, abc notation) of each tune of a collection; "" where there is no code.

    path: an IrishMAN-format JSON list of {"control code", "abc notation"} records (any
    path pandas can open, hf://datasets/... included), an .abc tunebook, or a folder of them.
    Tunes of a tunebook that are not music (no K: line, no notes, several voices) are
    skipped, and counted in one line.
    """
    p = Path(path)
    if "://" not in path and not p.exists():
        made = " (`make data` writes the corpus there)" if p.parent.name == "data" else ""
        raise UserError(f"{path}: no such file or folder{made}")
    if p.is_dir() or p.suffix.lower() == ".abc":
        tunes, skipped = read_tunebooks(p)
        records = [("", t) for t in tunes]
    else:
        records, skipped = read_irishman_json(path), 0
    why = f"{skipped} tunes skipped: several voices, no K: line, or not music" if skipped else ""
    if not records:
        raise UserError(f"{path}: no tunes found" + (f" ({why})" if why else ""))
    if skipped:
        print(f"note: {path}: {len(records)} tunes read, {why}", file=sys.stderr)
    return records


def read_tunebooks(path: Path) -> tuple[list[str], int]:
    """The tunes of an .abc tunebook or of every one in a folder, and how many were skipped."""
    tunes, skipped = [], 0
    for book in sorted(path.rglob("*.abc")) if path.is_dir() else [path]:
        found, missed = read_tunebook(read_text(book))
        tunes.extend(found)
        skipped += missed
    return tunes, skipped


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_irishman_json(path: str) -> list[tuple[str, str]]:
    import pandas as pd  # only this reader needs it; import costs ~0.5 s

    try:
        df = pd.read_json(path, dtype=False)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason})") from None
    except FileNotFoundError:  # a remote path (memory://, s3://, ...) with nothing there
        raise UserError(f"{path}: no such file") from None
    except ValueError as e:  # pandas' word for text that is not the JSON it expects
        reason = first_line(e)
        if reason.startswith("Protocol not known"):  # fsspec's, for a URL scheme it has no reader for
            raise UserError(f"{path}: cannot be read ({reason})") from None
        if "must pass an index" in reason:
            reason = "it holds one JSON object, not a list of records [{...}, ...]"
        raise UserError(f"{path}: not an IrishMAN JSON list of records ({reason})") from None
    except Exception as e:  # fsspec, the hub and their HTTP clients raise many kinds: all mean "cannot read it"
        raise UserError(f"{path}: cannot be read ({first_line(e)})") from None
    if df.empty:
        return []
    if "abc notation" not in df.columns:
        raise UserError(f"{path}: records have no \"abc notation\" field (found: {', '.join(map(str, df.columns))})")
    codes = df["control code"] if "control code" in df.columns else [""] * len(df)
    return [(c if isinstance(c, str) else "", t) for c, t in zip(codes, df["abc notation"])
            if isinstance(t, str) and t.strip()]


def write_irishman_json(path: Path, tunes: list[str], codes: list[str] | None = None) -> None:
    """IrishMAN records: each tune with its control code (abc_form.control_code), or "" without codes."""
    records = [{"control code": code, "abc notation": t} for t, code in zip(tunes, codes or [""] * len(tunes))]
    write_atomic(path, json.dumps(records, ensure_ascii=False, indent=0).encode("utf-8"))
