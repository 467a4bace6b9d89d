"""
corpus: reading and writing collections of tunes, torch-free.

Holds:
- load_tunes: the "abc notation" texts of an IrishMAN-format JSON list of records (any path
  or URL pandas opens, hf://datasets/... included), of an .abc tunebook, or of a folder of
  them; tunes that are not music, and records that hold no tune, are skipped and counted in one
  note; load_records: the same with each tune's "control code" ("" where the record has none or
  one that is not text, and for tunebooks);
- read_file (a tunebook or a JSON file), read_irishman_json, read_text: the readers, each failure
  one clear line (UserError);
- write_irishman_json: tunes as IrishMAN records.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

from abc_form import is_control_code
from abc_music import header_field, read_tunebook, readable_lengths
from cli import UserError, first_line, note_line
from safe_write import folder_files, write_atomic


def load_tunes(path: str) -> list[str]:
    """The "abc notation" texts of a collection (load_records without the codes)."""
    return [tune for _, tune in load_records(path)]


def load_records(path: str) -> list[tuple[str, str]]:
    """(control code, abc notation) of each tune of a collection; "" where there is no code.

    path: an IrishMAN-format JSON list of {"control code", "abc notation"} records (any
    path pandas can open, hf://datasets/... included), an .abc tunebook, or a folder of them
    (its .abc and .json files, in its subfolders too).
    Tunes of a tunebook that are not music (no K: line, no notes, several voices), and JSON
    records without a tune, are skipped, and counted in one line that says why.
    """
    if not path.strip():
        raise UserError("an empty path names no data: give a file, a folder or a URL")
    p = Path(path)
    if "://" in path and p.suffix.lower() == ".abc":
        raise UserError(f"{path}: a tunebook (.abc) is read from a local file or folder; only JSON comes by URL")
    if "://" not in path and not p.exists():
        made = (" (`make data-large` writes it)" if p.name == "large.json" else " (`make data` writes the corpus "
                "there)") if p.parent.name == "data" else ""
        raise UserError(f"{path}: no such file or folder{made}")
    if "://" not in path and p.exists() and not (p.is_dir() or p.is_file() or p.is_fifo()):  # /dev/zero: endless
        raise UserError(f"{path}: a device, not a file or a folder of tunes")
    folder = p.is_dir()
    files = folder_files(p) if folder else [path]
    records, why = [], []
    for file in files:
        found, skipped = read_file(str(file))
        records += found
        if skipped:
            why.append(f"{file.name}: {skipped}" if folder else skipped)
    if not records:
        kinds = " (a folder is read for its .abc and .json files)" if folder else ""
        raise UserError(f"{path}: no tunes found" + (f" ({'; '.join(why)})" if why else kinds))
    if why:
        note_line(f"{path}: {len(records)} tunes read, {'; '.join(why)}")
    return records


def read_file(path: str) -> tuple[list[tuple[str, str]], str]:
    """The records of one tunebook (.abc) or IrishMAN JSON file, and what was left out and why."""
    if Path(path).suffix.lower() != ".abc":
        return read_irishman_json(path)
    tunes, skipped = read_tunebook(read_text(Path(path)))
    why = f"{skipped} tunes skipped: several voices, no K: line, not music, or a length that reads as none"
    return [("", t) for t in tunes], why if skipped else ""


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # a BOM (Windows Notepad's) would hide the first X: line
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _code_lines(code: str) -> str:
    """A control code as its lines, the last one ended too: the tune's X: line follows it."""
    code = _lines(code)
    return code + "\n" if code and not code.endswith("\n") else code


def _lines(text: str) -> str:
    """Windows (\\r\\n) and old Mac (\\r) line breaks as \\n, as a tunebook's are when it is read as text."""
    return re.sub(r"\r\n?", "\n", text)


def read_irishman_json(path: str) -> tuple[list[tuple[str, str]], str]:
    """(control code, abc notation) of each record that holds a tune, and what was left out and why
    ("" when nothing was)."""
    items = _json_list(path)
    fields = dict.fromkeys(key for item in items if isinstance(item, dict) for key in item)  # in order, once each
    if fields and "abc notation" not in fields:
        raise UserError(f"{path}: records have no \"abc notation\" field (found: {', '.join(map(str, fields))})")
    records, skipped, odd_codes, not_codes = [], Counter(), 0, 0
    for item in items:
        problem = _not_a_tune(item)
        if problem:
            skipped[problem] += 1
            continue
        # a code that is not text, or not a code, is read as none, as if absent: the tune is still good,
        # and a --control model computes its code from the tune (musicrnn.load_collection)
        code = item.get("control code")
        odd_codes += code is not None and not isinstance(code, str)
        code = _code_lines(code) if isinstance(code, str) else ""
        valid = is_control_code(code)
        not_codes += bool(code.strip()) and not valid
        records.append((code if valid else "", _lines(item["abc notation"])))
    why = []
    if skipped:
        why.append(f"{sum(skipped.values())} records skipped: " + ", ".join(f"{n} {r}" for r, n in skipped.items()))
    if odd_codes:
        why.append(f'{odd_codes} "control code" not text, read as none')
    if not_codes:
        why.append(f'{not_codes} "control code" not a code (S:, B:, E: lines in order), read as none')
    return records, "; ".join(why)


def _not_a_tune(item) -> str:
    """Why a JSON list's entry holds no tune ("" when it holds one)."""
    if not isinstance(item, dict):
        return "not a {...} record"
    tune = item.get("abc notation")
    if "abc notation" not in item:
        return 'no "abc notation"'
    if not isinstance(tune, str):
        return '"abc notation" not text'
    if not tune.strip():
        return '"abc notation" empty'
    if header_field(tune, "K") is None:  # as a tunebook's tunes: without a key line it is not read as music
        return "no K: line"
    return "" if readable_lengths(tune) else "a length that reads as none (L:1/0, A/0)"


def _json_list(path: str) -> list:
    """The entries of the JSON list at path (any path pandas opens); anything else is one UserError."""
    import pandas as pd  # only this reader needs it; import costs ~0.5 s

    try:  # typ="series" keeps each record as written; convert_axes=False keeps a JSON object's keys as text
        items = pd.read_json(path, typ="series", dtype=False, convert_axes=False, encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason})") from None
    except FileNotFoundError:  # a remote path (memory://, s3://, ...) with nothing there
        raise UserError(f"{path}: no such file") from None
    except ValueError as e:  # pandas' word for text that is not JSON
        reason = first_line(e)
        if reason.startswith("Protocol not known"):  # fsspec's, for a URL scheme it has no reader for
            raise UserError(f"{path}: cannot be read ({reason})") from None
        raise UserError(f"{path}: not an IrishMAN JSON list of records ({reason})") from None
    except Exception as e:  # fsspec, the hub and their HTTP clients raise many kinds: all mean "cannot read it"
        raise UserError(f"{path}: cannot be read ({first_line(e)})") from None
    if not isinstance(items.index, pd.RangeIndex):  # a JSON list is numbered; an object's keys are text
        raise UserError(f"{path}: not an IrishMAN JSON list of records (it holds one JSON object, "
                        f"not a list of records [{{...}}, ...])")
    return list(items)


def collection_digest(tunes: list[str], codes: list[str] | None = None) -> str:
    """A fingerprint of the tunes (and codes) a run reads, in order: --resume compares it, so that a
    data file changed since the run began is refused, never trained or validated on unnoticed."""
    digest = hashlib.sha256()
    for text in [*tunes, *(codes or [])]:
        digest.update(text.encode("utf-8", "surrogatepass") + b"\x00")
    return f"{len(tunes)} tunes, sha256 {digest.hexdigest()[:16]}"


def write_irishman_json(path: Path, tunes: list[str], codes: list[str] | None = None, overwrite: bool = True) -> None:
    """IrishMAN records: each tune with its control code (abc_form.control_code), or "" without codes.
    Without overwrite, a file that appeared at path meanwhile is left as it is (safe_write)."""
    write_atomic(path, irishman_json(tunes, codes), overwrite)


def irishman_json(tunes: list[str], codes: list[str] | None = None) -> bytes:
    """The text of an IrishMAN JSON file of these tunes (and their codes)."""
    records = [{"control code": code, "abc notation": t} for t, code in zip(tunes, codes or [""] * len(tunes))]
    return json.dumps(records, ensure_ascii=False, indent=0).encode("utf-8")
