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


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` -> fp16 on CUDA/MPS (inference), fp32 on CPU."""
    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    if dtype not in table:
        raise SelfNPOError(f"unknown dtype {dtype!r}; use auto, fp32, fp16 or bf16")
    return table[dtype]


def _class_name(model: str) -> str:
    index = Path(model) / "model_index.json"
    if not index.is_file():
        raise SelfNPOError(f"{model}: not a diffusers model folder (no model_index.json)")
    try:
        return json.loads(index.read_text())["_class_name"]
    except (ValueError, KeyError) as e:
        raise SelfNPOError(f"{index}: unreadable model_index.json ({e})") from None


def resolve_model_class(model: str) -> str:
    """Pipeline class name for a local folder or hub id, refusing unsupported ones."""
    if os.path.isdir(model):
        name = _class_name(model)
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
    dev = pick_device(device)
    from packaging.version import Version

    key = "dtype" if Version(diffusers.__version__) >= Version("0.36") else "torch_dtype"
    kwargs: dict = {key: pick_dtype(dtype, dev)}
    if name == "StableDiffusionPipeline":
        kwargs.update(safety_checker=None, requires_safety_checker=False, feature_extractor=None)
    try:
        pipe = getattr(diffusers, name).from_pretrained(model, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SelfNPOError(f"{model}: cannot load the pipeline ({msg[:200]})") from None
    pipe.set_progress_bar_config(disable=True)
    from . import check_supported

    check_supported(pipe)
    return pipe.to(dev)
