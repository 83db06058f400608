"""Checkpoints: one safetensors file of tensors plus JSON, each written as a whole folder atomically.

A checkpoint folder appears under its final name only once complete, so a kill at any moment
leaves the previous checkpoint loadable; a damaged one is reported and the previous one used.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..io import atomic_dir

log = logging.getLogger(__name__)


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-able rest."""
    sd = opt.state_dict()
    tensors, rest = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"optim.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                rest[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": rest}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], js: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, k = key.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
    for key, v in js["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": js["param_groups"]})


def save_checkpoint(run_dir: Path, step: int, tensors: dict[str, Tensor], meta: dict, keep: int) -> Path:
    """Write ``checkpoints/step-XXXXXXXX`` atomically and prune all but the last ``keep``."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:08d}"
    with atomic_dir(final) as tmp:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
            str(tmp / "state.safetensors"),
        )
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, default=str))
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def load_latest(run_dir: Path) -> tuple[dict[str, Tensor], dict] | None:
    """Newest checkpoint that reads back whole; damaged ones are named in a warning and skipped."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            meta = json.loads((ckpt / "meta.json").read_text())
            tensors = load_file(str(ckpt / "state.safetensors"))
            return tensors, meta
        except Exception as e:  # noqa: BLE001 - any damage means: try the previous one
            log.warning("checkpoint %s is damaged (%s); trying the previous one", ckpt, type(e).__name__)
    return None
