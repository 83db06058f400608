"""Atomic file writes and careful reads: nothing is ever left half written where it is read."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import SelfNPOError

MAX_PROMPT_FILE_BYTES = 64 * 1024 * 1024


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; on success rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


def remove_stale_temps(folder: str | Path) -> None:
    """Delete temporaries (``.NAME.*.tmp``) that a killed writer left in ``folder``.

    They are never read (a reader only sees renamed, complete files); this only reclaims space.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return
    for p in folder.glob(".*.tmp"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` as a whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = path.parent / f".{path.name}.old"
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file (one per line), a TSV with a ``Prompt`` column, or JSONL.

    JSONL lines need a ``prompt``, ``text`` or ``caption`` field. Raises :class:`SelfNPOError`
    for missing, unreadable, non-UTF-8, oversized or empty files.
    """
    import json

    p = Path(path)
    if not p.is_file():
        raise SelfNPOError(f"{p}: prompt file not found")
    if p.stat().st_size > MAX_PROMPT_FILE_BYTES:
        raise SelfNPOError(f"{p}: prompt file is larger than the limit of {MAX_PROMPT_FILE_BYTES:,} bytes")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SelfNPOError(f"{p}: prompt file is not UTF-8 (byte {e.start})") from None
    except OSError as e:
        raise SelfNPOError(f"{p}: cannot read prompt file ({e.strerror})") from None
    lines = [ln.strip() for ln in text.splitlines()]
    if p.suffix == ".jsonl":
        prompts = []
        for i, ln in enumerate(lines, 1):
            if not ln:
                continue
            try:
                rec = json.loads(ln)
                prompts.append(str(next(rec[k] for k in ("prompt", "text", "caption") if k in rec)))
            except (ValueError, StopIteration, TypeError):
                raise SelfNPOError(f"{p}:{i}: expected a JSON object with a 'prompt' field") from None
    elif p.suffix == ".tsv" and lines and "\t" in lines[0]:
        head = lines[0].split("\t")
        col = head.index("Prompt") if "Prompt" in head else 0
        prompts = [ln.split("\t")[col] for ln in lines[1:] if ln]
    else:
        prompts = [ln for ln in lines if ln]
    prompts = [q for q in prompts if q.strip()]
    if not prompts:
        raise SelfNPOError(f"{p}: prompt file holds no prompts")
    return prompts
