"""Loading diffusers pipelines from a local folder or a hub id, with one-line errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import SelfNPOError

SUPPORTED = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    "WanPipeline": "wan",
    "CogVideoXPipeline": "cogvideox",
}


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when present, else MPS, else CPU."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def check_device(device: str = "auto") -> torch.device:
    """The device ``device`` names, refusing unknown names and devices this machine does not have."""
    try:
        dev = pick_device(device)
    except (RuntimeError, ValueError):
        raise SelfNPOError(f"--device {device!r}: unknown device; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise SelfNPOError(f"--device {device!r}: not supported; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SelfNPOError(f"--device {device}: no CUDA GPU is available here (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SelfNPOError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type == "mps" and not (
        getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    ):
        raise SelfNPOError(f"--device {device}: MPS is not available here")
    return dev


def _check_safetensors(model: str) -> None:
    """Refuse a local model folder whose weights exist only as pickle files (.bin, .pt, .ckpt)."""
    root = Path(model)
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2"):
        d = root / sub
        if not d.is_dir():
            continue
        names = [p.name for p in d.iterdir()]
        if any(n.endswith(".safetensors") for n in names):
            continue
        pickles = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        if pickles:
            raise SelfNPOError(
                f"{d}: weights only as pickle ({pickles[0]}); selfnpo loads safetensors only "
                "(convert the model with save_pretrained(..., safe_serialization=True))"
            )


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` -> fp16 on CUDA/MPS (inference), fp32 on CPU."""
    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    if dtype not in table:
        raise SelfNPOError(f"unknown dtype {dtype!r}; use auto, fp32, fp16 or bf16")
    return table[dtype]


_COMPONENTS = {
    "StableDiffusionPipeline": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "StableDiffusionXLPipeline": (
        "unet",
        "vae",
        "text_encoder",
        "tokenizer",
        "text_encoder_2",
        "tokenizer_2",
        "scheduler",
    ),
}


def _class_name(model: str) -> str:
    index = Path(model) / "model_index.json"
    if not index.is_file():
        raise SelfNPOError(f"{model}: not a diffusers model folder (no model_index.json)")
    try:
        spec = json.loads(index.read_text())
        name = spec["_class_name"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise SelfNPOError(f"{index}: unreadable model_index.json ({e})") from None
    missing = [c for c in _COMPONENTS.get(name, ()) if not (isinstance(spec.get(c), list) and spec[c][0])]
    if missing:
        raise SelfNPOError(
            f"{index}: names {name} but has no {missing[0]} (a model_index.json of another pipeline?)"
        )
    return name


def resolve_model_class(model: str) -> str:
    """Pipeline class name for a local folder or hub id, refusing unsupported ones."""
    if os.path.isdir(model):
        name = _class_name(model)
        _check_safetensors(model)
    elif os.path.exists(model) or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise SelfNPOError(f"{model}: no such model folder")
    else:
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            raise SelfNPOError(
                f"{model}: looks like a hub id but HF_HUB_OFFLINE is set; pass a local model folder"
            )
        from huggingface_hub import hf_hub_download

        try:
            name = json.loads(Path(hf_hub_download(model, "model_index.json")).read_text())["_class_name"]
        except Exception as e:  # noqa: BLE001 - any hub failure becomes one line
            raise SelfNPOError(
                f"{model}: cannot fetch model_index.json from the hub ({type(e).__name__})"
            ) from None
    if name not in SUPPORTED:
        raise SelfNPOError(
            f"{model}: pipeline class {name} is not supported (supported: {', '.join(SUPPORTED)})"
        )
    return name


def load_pipeline(model: str, device: str = "auto", dtype: str = "auto"):
    """Load a pipeline of a supported family (:data:`SUPPORTED`), without its safety checker.

    Models of a supported class that cannot take an offset (FLUX.1-schnell, two-expert Wan 2.2)
    are refused in one line after loading.
    """
    import diffusers

    name = resolve_model_class(model)
    dev = check_device(device)
    from packaging.version import Version

    key = "dtype" if Version(diffusers.__version__) >= Version("0.36") else "torch_dtype"
    kwargs: dict = {key: pick_dtype(dtype, dev)}
    if name == "StableDiffusionPipeline":
        kwargs.update(safety_checker=None, requires_safety_checker=False, feature_extractor=None)
    try:
        pipe = getattr(diffusers, name).from_pretrained(model, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, AttributeError, ImportError) as e:
        if "DefaultCPUAllocator" in str(e):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SelfNPOError(
            f"{model}: cannot load the pipeline as {name} ({msg[:200]}); does model_index.json name "
            "the right pipeline?"
        ) from None
    pipe.set_progress_bar_config(disable=True)
    from . import check_supported

    check_supported(pipe)
    return pipe.to(dev)
