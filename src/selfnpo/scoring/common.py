"""What every reward model shares: weight files, pretrained folders, and CLIP-style preprocessing.

Preprocessing follows the references' torchvision pipelines on PIL images, written with PIL and
numpy: ``Resize(n, BICUBIC)`` on the short side (long side ``int(n * long / short)``), then
``CenterCrop(n)`` with torchvision's rounding, then ``ToTensor`` and ``Normalize``; or, for HPSv2,
``ToTensor`` first and then open_clip's ``ResizeMaxSize`` (long side to ``n`` on the float tensor,
zero padding) and ``Normalize``, in the order HPSv2's transform has them.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import SelfNPOError

# OpenAI CLIP's normalisation; open_clip, PickScore, HPSv2 and BLIP/ImageReward all use it.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def _looks_local(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or os.path.exists(spec)


def resolve_file(spec: str, flag: str, what: str) -> Path:
    """A local weight file, or ``owner/repo/path/in/repo`` fetched from the hub (unless offline)."""
    if not spec:
        raise SelfNPOError(f"{what}: pass {flag} FILE")
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    parts = spec.split("/", 2)
    if _looks_local(spec) or len(parts) < 3:
        raise SelfNPOError(f"{spec}: {what} weight file not found (pass {flag} FILE)")
    repo, name = "/".join(parts[:2]), parts[2]
    hint = f"{what}: download {name} from https://huggingface.co/{repo} and pass {flag} FILE"
    if _offline():
        raise SelfNPOError(f"{hint} (offline)")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, name))
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one line
        raise SelfNPOError(f"{hint} ({type(e).__name__})") from None


def load_weights(path: str | Path) -> dict:
    """A state dict from safetensors, or from a torch file with ``weights_only=True`` (never a full unpickle)."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[-1][:160] if str(e).strip() else ""
        raise SelfNPOError(
            f"{path}: not a plain weights file; refusing to unpickle arbitrary objects ({first})"
        ) from None
    except (OSError, RuntimeError, ValueError, EOFError) as e:
        msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise SelfNPOError(f"{path}: unreadable weight file ({msg})") from None


def load_pretrained(cls, spec: str, flag: str, what: str, **kw):
    """``cls.from_pretrained(spec)`` for a local folder or hub id; failures become one line."""
    if not spec:
        raise SelfNPOError(f"{what}: pass {flag} FOLDER")
    local = _looks_local(spec)
    if local and not os.path.isdir(os.path.expanduser(spec)):
        raise SelfNPOError(f"{spec}: no such folder ({what}, {flag})")
    try:
        return cls.from_pretrained(os.path.expanduser(spec) if local else spec, **kw)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        if local:
            msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise SelfNPOError(f"{spec}: cannot load {what} ({msg})") from None
        raise SelfNPOError(
            f"{what}: download {spec} (e.g. `hf download {spec} --local-dir DIR`) and pass {flag} DIR"
            + (" (offline)" if _offline() else "")
        ) from None


def build_with_weights(make, weights: dict, path, what: str):
    """``make()`` built without allocating (meta tensors), then given ``weights`` (strict, by assignment).

    Saves building a random model of reference size only to overwrite it. Buffers the checkpoint
    does not hold (``position_ids``) are made here. A mismatch is one line naming the first problem.
    """
    with torch.device("meta"):
        model = make()
    try:
        model.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as e:
        first = " ".join(str(e).strip().splitlines()[1:2]).strip()[:200]
        raise SelfNPOError(f"{path}: does not fit {what} ({first})") from None
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            owner, _, attr = name.rpartition(".")
            if not attr.endswith("position_ids"):
                raise SelfNPOError(f"{path}: {what} needs buffer {name}, which the checkpoint lacks")
            ids = torch.arange(buf.shape[-1]).expand(buf.shape).clone()
            model.get_submodule(owner).register_buffer(attr, ids, persistent=False)
    return model.eval().requires_grad_(False)


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision ``Resize(size, BICUBIC)`` then ``CenterCrop(size)`` on a PIL image."""
    w, h = image.size
    if w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    image = image.resize(new, Image.BICUBIC)
    left = int(round((new[0] - size) / 2.0))
    top = int(round((new[1] - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def resize_max_pad(x: torch.Tensor, size: int) -> torch.Tensor:
    """open_clip ``ResizeMaxSize(size)`` as HPSv2 applies it, *after* ``ToTensor``: [3, H, W] in [0, 1].

    The long side goes to ``size`` by torchvision's tensor resize (bicubic, antialiased, on floats:
    no uint8 rounding, no clamping), then zero padding (black) centred.
    """
    h, w = x.shape[-2:]
    scale = size / max(h, w)
    new = (round(h * scale), round(w * scale))
    if new != (h, w):
        x = F.interpolate(x[None], size=new, mode="bicubic", align_corners=False, antialias=True)[0]
    top, left = (size - new[0]) // 2, (size - new[1]) // 2
    return F.pad(x, (left, size - new[1] - left, top, size - new[0] - top), value=0.0)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """``ToTensor``: [3, H, W] float32 in [0, 1]."""
    x = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def normalize(x: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """``Normalize``: (x - mean) / std per channel of [..., 3, H, W]."""
    m = torch.tensor(mean, dtype=x.dtype)[:, None, None]
    return (x - m) / torch.tensor(std, dtype=x.dtype)[:, None, None]


def to_pixels(image: Image.Image, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """``ToTensor`` + ``Normalize``: [3, H, W] float32."""
    return normalize(to_tensor(image), mean, std)


def clip_pixels(images, size: int, mode: str = "crop") -> torch.Tensor:
    """A batch [B, 3, size, size] of RGB images, preprocessed as CLIP (``crop``: PIL resize and
    centre crop) or as HPSv2's open_clip validation transform (``pad``: tensor resize, padding)."""
    if mode == "pad":
        return torch.stack([normalize(resize_max_pad(to_tensor(im), size)) for im in images])
    return torch.stack([to_pixels(resize_center_crop(im.convert("RGB"), size)) for im in images])


def unit(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (in float32)."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def clip_features(model, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask=None):
    """Projected image and text embeddings of a transformers ``CLIPModel`` (not normalised)."""
    dtype = next(model.parameters()).dtype
    vision = model.vision_model(pixel_values=pixels.to(model.device, dtype)).pooler_output
    if attention_mask is not None:
        attention_mask = attention_mask.to(model.device)
    text = model.text_model(input_ids=input_ids.to(model.device), attention_mask=attention_mask).pooler_output
    return model.visual_projection(vision), model.text_projection(text)
