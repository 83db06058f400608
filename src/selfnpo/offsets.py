"""Weight offsets: ``theta + alpha * eta + beta * delta`` (Diffusion-NPO eq. 10 / Self-NPO eq. 7).

LoRA offsets live as named peft adapters inside the one network; their contribution is set by
scaling each adapter (:func:`adapter_scales`), so no second copy of the network is needed.
Full-weight offsets are tensors added on the fly through ``torch.func.functional_call``
(:func:`full_delta_call`), which leaves the module's own parameters untouched.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .errors import SelfNPOError
from .io import atomic_dir, atomic_path

FULL_DELTA_FORMAT = "selfnpo.full_delta.v1"


def lora_layers(module: nn.Module | list[nn.Module], adapter: str) -> list[nn.Module]:
    """Every peft LoRA layer of ``module`` (or of a list of layers found before) that holds ``adapter``."""
    from peft.tuners.lora import LoraLayer

    mods = module if isinstance(module, list) else module.modules()
    return [m for m in mods if isinstance(m, LoraLayer) and adapter in m.scaling]


def _set_active(layer: nn.Module, active: list[str]) -> None:
    """``layer.set_adapter(active)`` without its side effect of flipping ``requires_grad``."""
    grads = {n: p.requires_grad for n, p in layer.named_parameters()}
    layer.set_adapter(active)
    for n, p in layer.named_parameters():
        p.requires_grad_(grads.get(n, False))


def activate_adapters(module: nn.Module, names: list[str]) -> None:
    """Make ``names`` active in every LoRA layer, keeping adapters that are already active.

    Scales are left as they are; callers set them per forward with :func:`adapter_scales`.
    """
    from peft.tuners.lora import LoraLayer

    for m in module.modules():
        if isinstance(m, LoraLayer):
            present = [n for n in names if n in m.scaling]
            if present:
                _set_active(m, [a for a in m.active_adapters if a not in present] + present)


def deactivate_adapters(module: nn.Module, names: list[str]) -> None:
    """Remove ``names`` from the active adapters of every LoRA layer (others stay active)."""
    from peft.tuners.lora import LoraLayer

    for m in module.modules():
        if isinstance(m, LoraLayer) and any(n in m.active_adapters for n in names):
            _set_active(m, [a for a in m.active_adapters if a not in names])


@contextlib.contextmanager
def adapter_scales(module: nn.Module | list[nn.Module], scales: Mapping[str, float]) -> Iterator[None]:
    """Temporarily multiply named LoRA adapters' scalings by ``scales``; restores them exactly.
    ``module``: a network, or the list of its LoRA layers (:func:`all_lora_layers`).

    Scale 0 gives the network without that adapter, bit for bit (its output is added times 0).
    """
    saved: list[tuple[dict, str, float]] = []
    for name, s in scales.items():
        for layer in lora_layers(module, name):
            saved.append((layer.scaling, name, layer.scaling[name]))
            layer.scaling[name] = layer.scaling[name] * s
    try:
        yield
    finally:
        for table, name, value in reversed(saved):
            table[name] = value


BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


def mixed_batch_ready(layers: list[nn.Module], names: set[str], allowed: set[str]) -> bool:
    """Whether these LoRA layers can all run peft's mixed-batch forward for ``names``: unmerged,
    no DoRA among them, and no active adapter outside ``allowed`` (a mixed batch applies only the
    one adapter named per sample, so any other active adapter would be dropped)."""
    for m in layers:
        if not hasattr(m, "_mixed_batch_forward") or m.merged:
            return False
        if any(m.use_dora.get(n, False) for n in names) or set(m.active_adapters) - allowed:
            return False
    return True


def all_lora_layers(module: nn.Module) -> list[nn.Module]:
    """Every peft LoRA layer of ``module`` (one walk over its modules)."""
    from peft.tuners.lora import LoraLayer

    return [m for m in module.modules() if isinstance(m, LoraLayer)]


@contextlib.contextmanager
def per_sample_adapters(layers: list[nn.Module], names: list[str]) -> Iterator[None]:
    """Run these LoRA layers with adapter ``names[i]`` for sample ``i`` (peft's mixed-batch
    inference; ``"__base__"``: no adapter), at each adapter's current scaling."""

    def hook(mod, args, kwargs):
        return args, {**kwargs, "adapter_names": names}

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


_ADAPTER_MARKS = (
    ".lora_A.",
    ".lora_B.",
    ".lora_embedding_A.",
    ".lora_embedding_B.",
    ".lora_magnitude_vector.",
)


def is_adapter_param(name: str) -> bool:
    """Whether ``name`` (a parameter or state-dict key) belongs to a peft LoRA adapter."""
    return any(m in name for m in _ADAPTER_MARKS)


def canonical_params(module: nn.Module) -> dict[str, tuple[str, Tensor]]:
    """Parameters by their name in the plain model -> (current name, tensor).

    peft wraps a LoRA-carrying layer, renaming ``to_q.weight`` to ``to_q.base_layer.weight``;
    full-weight offsets always use the plain names, so they apply with or without LoRAs loaded.
    """
    return {n.replace(".base_layer.", "."): (n, p) for n, p in module.named_parameters()}


def full_delta_call(module: nn.Module, deltas: list[tuple[Mapping[str, Tensor], float]], *args, **kw):
    """Call ``module`` with parameters ``theta + sum_i c_i * delta_i`` (nothing is modified)."""
    current = canonical_params(module)
    merged: dict[str, Tensor] = {}
    for delta, c in deltas:
        if c == 0:
            continue
        for k, d in delta.items():
            name, p = current[k]
            base = merged.get(name, p)
            merged[name] = base + c * d.to(base.device, base.dtype)
    if not merged:
        return module(*args, **kw)
    return torch.func.functional_call(module, merged, args, kw, strict=False)


# ---- files ----------------------------------------------------------------------------------
def save_full_delta(path: str | Path, delta: Mapping[str, Tensor], meta: Mapping[str, str]) -> None:
    """Write a full-weight offset (parameter name -> tensor) as safetensors, atomically."""
    md = {"format": FULL_DELTA_FORMAT, **{k: str(v) for k, v in meta.items()}}
    tensors = {k: v.detach().contiguous().cpu() for k, v in delta.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=md)


def offset_kind(path: str | Path) -> str:
    """``"lora"`` or ``"full"`` for an offset file (or a folder holding one)."""
    p = resolve_offset_file(path)
    try:
        with safe_open(str(p), "pt") as f:
            md = f.metadata() or {}
            keys = list(f.keys())
    except Exception as e:  # noqa: BLE001 - any parse failure is a corrupt file
        raise SelfNPOError(f"{p}: not a readable safetensors file ({type(e).__name__})") from None
    if md.get("format") == FULL_DELTA_FORMAT:
        return "full"
    if any("lora" in k for k in keys):
        return "lora"
    raise SelfNPOError(f"{p}: neither a diffusers LoRA nor a selfnpo full-weight offset")


def resolve_offset_file(path: str | Path) -> Path:
    """A file path, or the one offset file inside a folder written by ``selfnpo train``."""
    p = Path(path)
    if p.is_dir():
        for name in ("pytorch_lora_weights.safetensors", "full_delta.safetensors"):
            if (p / name).is_file():
                return p / name
        raise SelfNPOError(f"{p}: folder holds no pytorch_lora_weights.safetensors or full_delta.safetensors")
    if not p.is_file():
        raise SelfNPOError(f"{p}: offset file not found")
    if p.suffix != ".safetensors":
        raise SelfNPOError(f"{p}: offsets must be .safetensors files (pickle files are never loaded)")
    return p


def check_lora_family(path: str | Path, pipe) -> None:
    """One-line error for a diffusers LoRA written for another family's network.

    Files of diffusers' own format prefix the network's keys with ``unet.`` or ``transformer.``;
    one holding only the other network's keys would otherwise load as nothing at all.
    """
    p = resolve_offset_file(path)
    with safe_open(str(p), "pt") as f:
        keys = list(f.keys())
    want = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    other = "transformer" if want == "unet" else "unet"
    if not any(k.startswith(want + ".") for k in keys) and any(k.startswith(other + ".") for k in keys):
        raise SelfNPOError(
            f"{p}: LoRA of a model with a {other}, but {type(pipe).__name__} has a {want} (another model family)"
        )
    from .models import family

    meta = p.parent / "selfnpo_offset.json"
    saved = json.loads(meta.read_text()).get("family") if meta.is_file() else None
    if saved is not None and saved != family(pipe):
        raise SelfNPOError(
            f"{p}: offset trained on a {saved} model, but {type(pipe).__name__} is {family(pipe)} (another model family)"
        )
    if want == "transformer":  # every transformer family's keys start alike: check the layers they name
        _check_lora_layers(p, keys, pipe.transformer)


def _check_lora_layers(p: Path, keys: list[str], net: nn.Module) -> None:
    """Refuse a ``transformer.`` LoRA naming layers ``net`` lacks, or of other input widths."""
    import re

    modules = dict(net.named_modules())
    with safe_open(str(p), "pt") as f:
        for k in keys:
            m = re.match(r"transformer\.(.+?)\.lora(?:_A|\.down)\.weight$", k)
            if m is None:
                continue
            layer = modules.get(m.group(1))
            width = getattr(getattr(layer, "base_layer", layer), "in_features", None)
            if layer is None or (width is not None and f.get_slice(k).get_shape()[-1] != width):
                raise SelfNPOError(
                    f"{p}: LoRA layer {m.group(1)!r} is missing from or does not fit this {type(net).__name__} "
                    "(another model family)"
                )


def load_full_delta(path: str | Path, unet: nn.Module) -> dict[str, Tensor]:
    """Read a full-weight offset and check it against ``unet``'s parameter names and shapes."""
    p = resolve_offset_file(path)
    delta = load_file(str(p))
    params = {k: t for k, (_, t) in canonical_params(unet).items()}
    for k, v in delta.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise SelfNPOError(f"{p}: offset {k!r} holds NaN or infinite values; refusing to use it")
        if k not in params:
            raise SelfNPOError(f"{p}: offset holds {k!r}, which this model does not have (wrong model?)")
        if tuple(v.shape) != tuple(params[k].shape):
            raise SelfNPOError(
                f"{p}: offset {k!r} has shape {tuple(v.shape)}, model has {tuple(params[k].shape)}"
            )
    return delta


def save_lora(pipe, unet: nn.Module, adapter: str, out_dir: str | Path, meta: Mapping[str, object]) -> Path:
    """Save one peft adapter of ``unet`` as a diffusers LoRA folder (``load_lora_weights`` reads it).

    ``unet`` is the pipeline's denoising network; a transformer (SD3, ...) is saved through the
    family's ``transformer_lora_layers`` with peft's key names, as diffusers' own training
    scripts save it, a UNet through ``unet_lora_layers`` in diffusers' key names.
    """
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=adapter)
    name = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    if name == "unet":
        state = convert_state_dict_to_diffusers(state)
    from .models import family

    meta = {"family": family(pipe), **meta}
    config = unet.peft_config[adapter].to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    layers = {f"{name}_lora_layers": state, f"{name}_lora_adapter_metadata": config}
    with atomic_dir(out_dir) as tmp:
        type(pipe).save_lora_weights(tmp, **layers)
        (Path(tmp) / "selfnpo_offset.json").write_text(json.dumps(dict(meta), indent=2, default=str))
    return Path(out_dir) / "pytorch_lora_weights.safetensors"
