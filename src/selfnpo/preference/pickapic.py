"""Convert a local copy of the public Pick-a-Pic dataset into a ``selfnpo.pairs.v1`` folder.

Pick-a-Pic (v1/v2) is distributed as parquet shards with, per row, ``caption``, the two images
as encoded bytes ``jpg_0`` / ``jpg_1`` and the human labels ``label_0`` / ``label_1`` (1 / 0 for
a preference, 0.5 / 0.5 for a tie). As in Diffusion-DPO, ties are dropped. Reading parquet needs
``pyarrow`` (``pip install selfnpo[pickapic]``). Nothing is downloaded.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from ..errors import SelfNPOError
from ..io import atomic_dir, prepare_output, write_marker
from ..options import opt
from .pairs import FORMAT, PairRecord, write_pairs

COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")


@dataclass
class PickapicConfig:
    """Convert local Pick-a-Pic parquet shards into a preference pair folder."""

    input: str = opt("", "a Pick-a-Pic parquet file or a folder of them (searched recursively)")
    output_dir: str = opt("pairs-pickapic", "output pair folder")
    max_pairs: int = opt(0, "stop after this many pairs (0 = all)")
    overwrite: bool = opt(False, "replace an existing output folder")


def _shards(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        if files:
            return files
        raise SelfNPOError(f"{path}: no .parquet files in the folder")
    raise SelfNPOError(f"{path}: Pick-a-Pic input not found")


def _suffix(data: bytes) -> str:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return ".png" if im.format == "PNG" else ".jpg"
    except Exception as e:  # noqa: BLE001
        raise SelfNPOError(f"an image in the Pick-a-Pic input is not readable ({type(e).__name__})") from None


def convert_pickapic(cfg: PickapicConfig) -> Path:
    """Write preferred/dispreferred images and ``pairs.jsonl``; returns the ``pairs.jsonl`` path."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SelfNPOError("reading Pick-a-Pic needs pyarrow: pip install 'selfnpo[pickapic]'") from None
    if not cfg.input:
        raise SelfNPOError("--input is required")
    if cfg.max_pairs < 0:
        raise SelfNPOError("--max-pairs must be >= 0")
    out = Path(cfg.output_dir)
    shards = _shards(Path(cfg.input))
    legacy = lambda o: (o / "pairs_meta.json").is_file()  # noqa: E731 - folders of earlier versions
    prepare_output(out, "pairs", overwrite=cfg.overwrite, legacy=legacy)
    records: list[PairRecord] = []
    ties = 0
    with atomic_dir(out) as tmp:
        write_marker(tmp, "pairs")
        (tmp / "images").mkdir()
        for shard in shards:
            try:
                table = pq.read_table(shard)
            except Exception as e:  # noqa: BLE001
                raise SelfNPOError(f"{shard}: not a readable parquet file ({type(e).__name__})") from None
            missing = [c for c in COLUMNS if c not in table.column_names]
            if missing:
                raise SelfNPOError(f"{shard}: not the Pick-a-Pic layout (no column {missing[0]!r})")
            cols = {c: table.column(c).to_pylist() for c in COLUMNS}
            for cap, j0, j1, lab0 in zip(*(cols[c] for c in COLUMNS), strict=True):
                if cfg.max_pairs and len(records) >= cfg.max_pairs:
                    break
                if lab0 is None or float(lab0) == 0.5 or not cap:
                    ties += 1
                    continue
                win, lose = (j0, j1) if float(lab0) > 0.5 else (j1, j0)
                k = len(records)
                names = [f"images/{k:07d}_{s}{_suffix(b)}" for s, b in (("w", win), ("l", lose))]
                (tmp / names[0]).write_bytes(win)
                (tmp / names[1]).write_bytes(lose)
                records.append(PairRecord(str(cap), names[0], names[1]))
        if not records:
            raise SelfNPOError(f"{cfg.input}: no labelled, untied pairs found")
        write_pairs(tmp, records)
        meta = {"format": FORMAT, "source": "pickapic", "config": asdict(cfg), "pairs": len(records)}
        meta["ties_or_unlabelled_dropped"] = ties
        (tmp / "pairs_meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return out / "pairs.jsonl"
