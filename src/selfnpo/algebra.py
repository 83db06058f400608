"""Offset algebra on the weights themselves: ``theta + sum_i s_i * offset_i`` as dense tensors.

Diffusion-NPO eq. 10 gives the negative branch ``theta + alpha * eta + beta * delta``. At sampling
time :class:`~selfnpo.npo.NPOGuidance` applies it without touching the weights (LoRA adapter
scales, ``functional_call`` for full deltas). This module makes the same sum explicit:

- :func:`lora_delta` turns a diffusers LoRA into the dense ``W' - W`` it applies to each UNet
  parameter (peft's ``scale * B @ A``), keyed like a selfnpo full-weight offset;
- :func:`apply_deltas` / :func:`remove_deltas` add / subtract a weighted sum of offsets in place;
- :func:`merge_offsets` writes a standalone diffusers folder with the offsets merged in, which
  loads with plain ``from_pretrained`` (e.g. the negative-branch model, for other tools).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import SelfNPOError
from .io import atomic_dir, check_writable_parent, write_marker
from .offsets import canonical_params, load_full_delta, offset_kind, resolve_offset_file
from .options import opt

Delta = Mapping[str, Tensor]  # plain-model parameter name -> dense offset of the same shape
_TMP_ADAPTER = "selfnpo_algebra"


def _lora_loader(unet: nn.Module) -> tuple[type, str]:
    """The diffusers pipeline class whose LoRA loader matches the network, and the network's
    name in LoRA files (``unet`` for SD1.5/SDXL-type UNets, ``transformer`` for the others)."""
    import diffusers
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    transformers = {
        "SD3Transformer2DModel": "StableDiffusion3Pipeline",
        "FluxTransformer2DModel": "FluxPipeline",
        "WanTransformer3DModel": "WanPipeline",
        "CogVideoXTransformer3DModel": "CogVideoXPipeline",
    }
    if type(unet).__name__ in transformers:
        return getattr(diffusers, transformers[type(unet).__name__]), "transformer"
    sdxl = getattr(unet.config, "addition_embed_type", None) == "text_time"
    return (StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline), "unet"


def _drop_adapter(unet: nn.Module, had_peft: bool) -> None:
    """Remove the temporary adapter; a UNet that had no LoRA before gets its plain layers back."""
    if not had_peft:
        unet.unload_lora()
    elif _TMP_ADAPTER in getattr(unet, "peft_config", {}):
        unet.delete_adapters(_TMP_ADAPTER)


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


@torch.no_grad()
def _load_tmp_adapter(loader, net_name: str, unet: nn.Module, state, alphas, meta) -> None:
    """Load a LoRA state dict into ``unet`` as the temporary adapter, the way its family's loader does."""
    with _quiet("diffusers.loaders.peft"):  # it logs the whole error too; ours is one line
        if net_name == "unet":
            loader.load_lora_into_unet(
                state, network_alphas=alphas, unet=unet, adapter_name=_TMP_ADAPTER, metadata=meta
            )
        else:
            extra = {"network_alphas": alphas} if loader.__name__ == "FluxPipeline" else {}
            loader.load_lora_into_transformer(
                state, transformer=unet, adapter_name=_TMP_ADAPTER, metadata=meta, **extra
            )


def lora_delta(lora_file: str | Path, unet: nn.Module) -> dict[str, Tensor]:
    """The dense offset a diffusers LoRA applies at scale 1: ``{param name: scale * B @ A}`` (fp32, CPU).

    diffusers reads the file (any format its ``load_lora_weights`` accepts) into ``unet`` as a
    temporary peft adapter; peft's ``get_delta_weight`` gives each layer's ``W' - W``; then the
    adapter is removed again. Names are the plain model's (``...to_q.weight``).
    """
    from peft.tuners.lora import LoraLayer

    path = resolve_offset_file(lora_file)
    loader, net_name = _lora_loader(unet)
    try:
        loaded = loader.lora_state_dict(str(path), return_lora_metadata=True)
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        raise SelfNPOError(f"{path}: not a readable diffusers LoRA ({_first_line(e)})") from None
    state, alphas, meta = loaded if len(loaded) == 3 else (loaded[0], None, loaded[1])
    if any(not k.startswith(net_name + ".") for k in state):
        raise SelfNPOError(
            f"{path}: LoRA holds layers outside the {net_name} (a text encoder, or another model family); "
            "not supported"
        )
    wanted = {k.split(".lora")[0] for k in state}  # one entry per LoRA-carrying module
    had_peft = bool(getattr(unet, "peft_config", None))
    try:
        _load_tmp_adapter(loader, net_name, unet, state, alphas, meta)
        layers = {
            n: m for n, m in unet.named_modules() if isinstance(m, LoraLayer) and _TMP_ADAPTER in m.scaling
        }
        if len(layers) != len(wanted):
            raise SelfNPOError(
                f"{path}: LoRA fits {len(layers)} of its {len(wanted)} layers in this model (another model?)"
            )
        if any(m.use_dora.get(_TMP_ADAPTER, False) for m in layers.values()):
            raise SelfNPOError(f"{path}: DoRA offsets are not a weight sum; not supported")
        delta = {f"{n}.weight": m.get_delta_weight(_TMP_ADAPTER).float().cpu() for n, m in layers.items()}
        if not all(torch.isfinite(d).all() for d in delta.values()):
            raise SelfNPOError(f"{path}: LoRA holds NaN or infinite weights; refusing to use it")
        return delta
    except (ValueError, KeyError, RuntimeError) as e:
        why = "shapes differ, another model?" if "size mismatch" in str(e) else _first_line(e)
        raise SelfNPOError(f"{path}: LoRA does not fit this model ({why})") from None
    finally:
        _drop_adapter(unet, had_peft)


def offset_delta(path: str | Path, unet: nn.Module) -> dict[str, Tensor]:
    """The dense offset of a LoRA or a selfnpo full-weight offset (file or run folder), checked
    against ``unet``'s parameter names and shapes."""
    if offset_kind(path) == "full":
        return {k: v.float() for k, v in load_full_delta(path, unet).items()}
    return lora_delta(path, unet)


def _weighted_sum(unet: nn.Module, terms: Sequence[tuple[Delta, float]]) -> dict[str, Tensor]:
    """``{current param name: sum_i s_i * delta_i}`` in fp32, checked before anything is changed."""
    current = canonical_params(unet)
    total: dict[str, Tensor] = {}
    for delta, s in terms:
        for k, d in delta.items():
            if k not in current:
                raise SelfNPOError(f"offset holds {k!r}, which this model does not have (wrong model?)")
            name, p = current[k]
            if tuple(d.shape) != tuple(p.shape):
                raise SelfNPOError(f"offset {k!r} has shape {tuple(d.shape)}, model has {tuple(p.shape)}")
            if s != 0:
                term = float(s) * d.to(p.device, torch.float32)
                total[name] = total[name] + term if name in total else term
    return total


@torch.no_grad()
def _add(unet: nn.Module, total: Mapping[str, Tensor], sign: float) -> None:
    params = dict(unet.named_parameters())
    for name, d in total.items():
        p = params[name]
        p.copy_((p.float() + sign * d).to(p.dtype))


def apply_deltas(unet: nn.Module, terms: Sequence[tuple[Delta, float]]) -> None:
    """``theta <- theta + sum_i s_i * delta_i`` in place (fp32 sum, stored in the weights' dtype).

    Terms with ``s_i = 0`` are skipped, so all-zero scales leave the weights bit for bit.
    """
    _add(unet, _weighted_sum(unet, terms), 1.0)


def remove_deltas(unet: nn.Module, terms: Sequence[tuple[Delta, float]]) -> None:
    """The inverse of :func:`apply_deltas` with the same terms (exact up to one rounding per weight)."""
    _add(unet, _weighted_sum(unet, terms), -1.0)


def merge_offsets(
    model_dir: str | Path,
    offsets: Sequence[tuple[str | Path, float]],
    out_dir: str | Path,
    dtype: str = "fp32",
) -> Path:
    """Write ``theta + sum_i s_i * offset_i`` as a standalone diffusers folder at ``out_dir``.

    The sum is taken in fp32; the saved weights are cast to ``dtype``. Refuses an existing
    ``out_dir``; the folder appears whole or not at all.
    """
    from .models.loading import load_pipeline, pick_dtype
    from .models.sd import denoiser_network

    out = Path(out_dir)
    if out.exists() or out.is_symlink():
        raise SelfNPOError(f"{out}: exists; merging never overwrites, choose a new --output-dir")
    check_writable_parent(out)
    if not offsets:
        raise SelfNPOError("no offsets to merge; pass --offsets PATH[:SCALE],...")
    torch_dtype = pick_dtype(dtype, torch.device("cpu"))
    kinds = [offset_kind(p) for p, _ in offsets]  # missing or unreadable files fail before loading
    pipe = load_pipeline(str(model_dir), device="cpu", dtype="fp32")
    net = denoiser_network(pipe)
    terms = [(offset_delta(p, net), float(s)) for p, s in offsets]
    apply_deltas(net, terms)
    pipe.to(dtype=torch_dtype)
    record = {
        "formula": "theta + sum_i scale_i * offset_i",
        "base_model": str(model_dir),
        "offsets": [
            {"path": str(resolve_offset_file(p)), "kind": k, "scale": float(s)}
            for (p, s), k in zip(offsets, kinds, strict=True)
        ],
        "dtype": dtype,
    }
    with atomic_dir(out) as tmp:
        write_marker(tmp, "merge")
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "selfnpo_merge.json").write_text(json.dumps(record, indent=2))
    return out


def parse_offsets(spec: str) -> list[tuple[str, float]]:
    """``"PATH[:SCALE],PATH[:SCALE]"`` -> [(path, scale)]; a missing scale means 1."""
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        path, _, scale = item.rpartition(":")
        try:
            pair = (path, float(scale)) if path else (item, 1.0)
        except ValueError:
            pair = (item, 1.0)  # a ':' that is part of the path
        if not math.isfinite(pair[1]) or abs(pair[1]) > 100:
            raise SelfNPOError(f"--offsets {item!r}: the scale must be a finite number in [-100, 100]")
        out.append(pair)
    if not out:
        raise SelfNPOError("--offsets is required: PATH[:SCALE],... (e.g. runs/npo/offset:-1)")
    return out


@dataclass
class MergeConfig:
    """Merge weight offsets into a standalone diffusers model: theta + sum_i scale_i * offset_i."""

    model: str = opt("", "diffusers model folder (any supported family, docs/models.md)")
    offsets: str = opt(
        "",
        "comma-separated PATH[:SCALE] (LoRA or full-delta safetensors, file or run offset folder); "
        "scale 1 when left out, e.g. 'dpo/offset:0.5,npo/offset:1' for alpha=0.5, beta=1",
    )
    output_dir: str = opt("", "new folder for the merged model (never overwritten)")
    dtype: str = opt(
        "fp32", "dtype of the saved weights (the sum is taken in fp32)", choices=("fp32", "fp16", "bf16")
    )

    def validate(self) -> MergeConfig:
        if not self.model:
            raise SelfNPOError("--model is required")
        if not self.output_dir:
            raise SelfNPOError("--output-dir is required")
        parse_offsets(self.offsets)
        return self
