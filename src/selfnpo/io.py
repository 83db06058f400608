"""Atomic file writes and careful reads: nothing is ever left half written where it is read."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Collection, Iterator
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
    try:
        yield tmp_path
        # mkstemp makes 0600, and some writers replace the file: give it the umask's permissions
        os.chmod(tmp_path, 0o666 & ~_umask())
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


def remove_stale_temps(folder: str | Path) -> None:
    """Delete temporaries (``.NAME.*.tmp``, never read) that a killed writer left in ``folder``."""
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
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the folder normal permissions
    old = path.parent / f".{path.name}.old"
    try:
        yield tmp
        mask = _umask()
        for f in tmp.rglob("*"):
            if f.is_file():
                os.chmod(f, 0o666 & ~mask)
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
            elif f.is_dir():
                os.chmod(f, 0o777 & ~mask)
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- folders selfnpo writes ---------------------------------------------------------------------
MARKER = ".selfnpo-run"  # in every folder selfnpo creates; holds the kind of folder
LOCK = ".selfnpo-lock"


def folder_kind(path: str | Path) -> str | None:
    """The kind of selfnpo folder ``path`` is (``train``, ``generate``, ...), or None."""
    with contextlib.suppress(OSError, UnicodeDecodeError):
        return (Path(path) / MARKER).read_text(encoding="utf-8").strip() or None
    return None


def write_marker(folder: str | Path, kind: str) -> None:
    """Mark ``folder`` as written by selfnpo (the only mark that lets ``--overwrite`` remove it)."""
    atomic_write_text(Path(folder) / MARKER, kind + "\n")


def _in_use(folder: Path) -> bool:
    """Whether another process holds the lock of ``folder`` (see :func:`lock_dir`)."""
    import fcntl

    lock = folder / LOCK
    if not lock.is_file():
        return False
    try:
        with open(lock, "a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def lock_dir(folder: str | Path):
    """Hold an exclusive lock on ``folder`` until the returned file is closed (a second selfnpo
    process on the same folder fails at once instead of writing beside the first)."""
    import fcntl

    folder = Path(folder)
    f = open(folder / LOCK, "a")  # noqa: SIM115 - the caller closes it
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise SelfNPOError(f"{folder}: in use by another selfnpo process; wait for it to finish") from None
    return f


RESUMABLE = ("train", "generate", "sweep", "pretrain")


def check_output_dir(
    path: str | Path,
    kind: str,
    *,
    overwrite: bool = False,
    resume: bool = False,
    legacy: Callable[[Path], bool] | None = None,
    flag: str = "--output-dir",
) -> bool:
    """Whether ``path`` holds a folder that may be resumed or replaced; refuses everything else.

    The one rule for every folder selfnpo writes: an absent or empty folder is free; a folder
    that carries selfnpo's marker of the same ``kind`` (or, for folders written before the marker
    existed, that ``legacy`` recognises) may be resumed or, with ``overwrite``, replaced; anything
    else is refused and never removed. Nothing is changed here.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SelfNPOError(f"{path}: exists and is not a folder; choose another {flag}")
    if path.parent.exists() and not path.parent.is_dir():
        raise SelfNPOError(f"{path}: cannot write the output folder ({path.parent} is not a folder)")
    try:
        if not (path.is_dir() and any(path.iterdir())):
            return False
    except OSError as e:
        raise SelfNPOError(f"{path}: cannot read the folder ({e.strerror})") from None
    found = folder_kind(path)
    ours = found == kind or (found is None and legacy is not None and legacy(path))
    if not ours:
        what = f"holds a selfnpo {found} folder, not a {kind} one" if found else "was not written by selfnpo"
        raise SelfNPOError(f"{path}: exists and {what}; refusing to touch it (choose another {flag})")
    if not (resume or overwrite):
        hint = "--resume to continue it or --overwrite" if kind in RESUMABLE else "--overwrite"
        raise SelfNPOError(f"{path}: exists; pass {hint} to replace it")
    if _in_use(path):
        raise SelfNPOError(f"{path}: in use by another selfnpo process; wait for it to finish")
    return True


def claim_output_dir(
    path: str | Path,
    kind: str,
    *,
    overwrite: bool = False,
    resume: bool = False,
    legacy: Callable[[Path], bool] | None = None,
    flag: str = "--output-dir",
) -> bool:
    """Create and mark ``path`` for a ``kind`` job; True when an existing folder is resumed.

    Applies :func:`check_output_dir`; with ``overwrite`` an existing selfnpo folder of this kind
    is removed: call it only after the new settings are validated, so a typo never costs it.
    """
    path = Path(path)
    if check_output_dir(path, kind, overwrite=overwrite, resume=resume, legacy=legacy, flag=flag):
        if resume:
            if folder_kind(path) is None:
                write_marker(path, kind)
            return True
        shutil.rmtree(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        write_marker(path, kind)
    except OSError as e:
        raise SelfNPOError(f"{path}: cannot write the output folder ({e.strerror})") from None
    return False


def _saved_config(file: Path) -> dict:
    try:
        saved = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(saved, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as e:
        raise SelfNPOError(f"{file}: damaged, cannot resume ({e})") from None
    return saved


def resume_mismatch(
    saved: dict,
    config: dict,
    may_change: Collection[str] = (),
    paths: Collection[str] = (),
    defaults: dict | None = None,
) -> str | None:
    """The one resume rule: which setting of ``config`` differs from the ``saved`` one, or None.

    All but ``may_change`` must be as saved. One ``saved`` lacks (added later) counts as in
    ``defaults``, else is trusted; ``paths`` compare as files; ``NAME_sha256`` hashes file NAME.
    """
    defaults = defaults or {}
    for k, new in config.items():
        if k in may_change or (k not in saved and k not in defaults):
            continue
        old = saved[k] if k in saved else defaults[k]
        if k in paths and isinstance(old, str) and isinstance(new, str) and old and new:
            if os.path.realpath(old) == os.path.realpath(new):
                continue
        if old != new:
            if k.endswith("_sha256"):
                name = k[: -len("_sha256")]
                return f"{name} (the file --{name.replace('_', '-')} changed since the folder was made)"
            return f"{k} (--{k.replace('_', '-')} was {old!r}, now {new!r})"
    return None


def prepare_output(
    path: str | Path,
    kind: str,
    config: dict | None = None,
    *,
    config_file: str = "",
    may_change: Collection[str] = (),
    paths: Collection[str] = (),
    defaults: type | dict | None = None,
    overwrite: bool = False,
    resume: bool = False,
    legacy: Callable[[Path], bool] | None = None,
    flag: str = "--output-dir",
) -> bool:
    """Prepare the output folder of every command; True when an existing folder is resumed.

    Folders follow :func:`check_output_dir`. Without ``config_file`` the job writes its folder
    whole at the end (:func:`atomic_dir`) and it is only checked; else it is claimed and
    ``config`` saved there, and a resume must pass :func:`resume_mismatch` (``defaults``: a
    dataclass or dict) or fails with a one-line error naming the setting.
    """
    path = Path(path)
    if not config_file:
        check_output_dir(path, kind, overwrite=overwrite, legacy=legacy, flag=flag)
        check_writable_parent(path, flag)
        return False
    resuming = claim_output_dir(path, kind, overwrite=overwrite, resume=resume, legacy=legacy, flag=flag)
    file = path / config_file
    if resuming and file.is_file():
        if isinstance(defaults, type):
            defaults = {f.name: f.default for f in dataclasses.fields(defaults)}
        why = resume_mismatch(_saved_config(file), config or {}, may_change, paths, defaults)
        if why:
            raise SelfNPOError(f"{path}: cannot resume: {why}; the folder holds different settings")
        remove_stale_temps(path)
        return True
    try:
        atomic_write_text(file, json.dumps(config or {}, indent=2))
    except OSError as e:
        raise SelfNPOError(f"{path}: cannot write the output folder ({e.strerror})") from None
    return resuming


def check_writable_parent(path: str | Path, flag: str = "--output-dir") -> None:
    """Refuse, before any work, an output ``path`` whose nearest existing parent is unwritable."""
    parent = Path(path).absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise SelfNPOError(f"{parent}: not a folder; choose another {flag}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SelfNPOError(f"{parent}: not writable; choose another {flag}")


@contextlib.contextmanager
def removed_on_failure(path: str | Path, fresh: bool, keep: Callable[[Path], bool] = lambda p: False):
    """Remove the folder ``path`` this job created (``fresh``) if the job fails before ``keep``
    says it holds something worth resuming, so the corrected command can run again as it is.
    An interrupt (Ctrl-C, SIGTERM) keeps it for ``--resume``."""
    try:
        yield
    except Exception:
        p = Path(path)
        if fresh and folder_kind(p) is not None and not keep(p):
            shutil.rmtree(p, ignore_errors=True)
        raise


def _read_prompt_text(p: Path) -> str:
    """The text of a prompt file, a FIFO or /dev/stdin, with one-line errors."""
    import stat

    try:
        st = p.stat()
    except FileNotFoundError:
        raise SelfNPOError(f"{p}: prompt file not found") from None
    except OSError as e:
        raise SelfNPOError(f"{p}: cannot read prompt file ({e.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise SelfNPOError(f"{p}: is a directory, not a prompt file")
    if stat.S_ISREG(st.st_mode) and st.st_size > MAX_PROMPT_FILE_BYTES:
        raise SelfNPOError(f"{p}: prompt file is larger than the limit of {MAX_PROMPT_FILE_BYTES:,} bytes")
    try:
        with open(p, "rb") as f:  # also a FIFO or /dev/stdin: read up to the limit
            data = f.read(MAX_PROMPT_FILE_BYTES + 1)
    except OSError as e:
        raise SelfNPOError(f"{p}: cannot read prompt file ({e.strerror})") from None
    if len(data) > MAX_PROMPT_FILE_BYTES:
        raise SelfNPOError(f"{p}: prompt file is larger than the limit of {MAX_PROMPT_FILE_BYTES:,} bytes")
    try:
        return data.decode("utf-8-sig")  # a UTF-8 byte-order mark is accepted
    except UnicodeDecodeError as e:
        raise SelfNPOError(f"{p}: prompt file is not UTF-8 (byte {e.start})") from None


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file (one per line), a TSV with a ``Prompt`` column, or JSONL.

    JSONL lines need a ``prompt``, ``text`` or ``caption`` field holding a string. The suffix is
    matched in any case (``.TSV``, ``.JSONL``). Raises :class:`SelfNPOError` naming the file (and
    line) for missing, unreadable, non-UTF-8, oversized, malformed or empty files.
    """
    p = Path(path)
    text = _read_prompt_text(p)
    lines = [ln.strip() for ln in text.splitlines()]
    suffix = p.suffix.lower()
    prompts: list[str] = []
    if suffix == ".jsonl":
        for i, ln in enumerate(lines, 1):
            if not ln:
                continue
            try:
                rec = json.loads(ln)
                value = next(rec[k] for k in ("prompt", "text", "caption") if k in rec)
            except (ValueError, StopIteration, TypeError):
                raise SelfNPOError(f"{p}:{i}: expected a JSON object with a 'prompt' field") from None
            if not isinstance(value, str):
                raise SelfNPOError(f"{p}:{i}: the prompt must be a string, not {json.dumps(value)[:40]}")
            prompts.append(value)
    elif suffix == ".tsv":
        raw = text.splitlines()
        head = [c.strip() for c in raw[0].split("\t")] if raw else []
        if "Prompt" not in head:
            cols = ", ".join(repr(c) for c in head) or "none"
            raise SelfNPOError(f"{p}: a .tsv prompt file needs a 'Prompt' column (found columns {cols})")
        col = head.index("Prompt")
        for i, ln in enumerate(raw[1:], 2):
            if not ln.strip():
                continue
            cells = ln.split("\t")
            if len(cells) <= col:
                raise SelfNPOError(
                    f"{p}:{i}: row has {len(cells)} column(s), the 'Prompt' column is number {col + 1}"
                )
            prompts.append(cells[col].strip())
    else:
        prompts = [ln for ln in lines if ln]
    prompts = [q for q in prompts if q.strip()]
    if not prompts:
        raise SelfNPOError(f"{p}: prompt file holds no prompts")
    return prompts
