"""Small Stable-Diffusion-family pipelines built offline from the real diffusers/transformers classes.

Used by the tests (random weights), by the embedded world model (trained here) and by the
benchmarks (the real SD1.5 UNet architecture with random weights). Nothing is downloaded.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import torch

SPECIAL = ["<|startoftext|>", "<|endoftext|>"]


def _byte_symbols() -> list[str]:
    """Byte-level BPE's 256 printable stand-ins, in CLIP's vocabulary order.

    Printable bytes stand for themselves and come first; the rest map to ``chr(256 + n)``.
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    rest = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + n) for n in range(len(rest))]


def write_tiny_vocab(out_dir: str | Path) -> Path:
    """A character-level CLIP tokenizer (letters, digits, no merges) for random-weight tests."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789,.")
    vocab = {tok: i for i, tok in enumerate(SPECIAL + chars + [c + "</w>" for c in chars])}
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n")
    return out


def clip_bpe_source() -> Path:
    """Path of the real CLIP BPE merges shipped inside ``open_clip_torch`` (never imported)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip_torch is not installed (pip install --no-deps open_clip_torch)")
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    return path


def write_clip_vocab(out_dir: str | Path) -> Path:
    """Convert the real CLIP BPE (49,408 tokens) to ``vocab.json`` + ``merges.txt``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(clip_bpe_source(), "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    byte_syms = _byte_symbols()
    tokens = byte_syms + [s + "</w>" for s in byte_syms] + ["".join(m) for m in merges] + SPECIAL
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return out


def text_encoder(
    vocab_size: int,
    hidden: int,
    projection: int | None = None,
    seed: int = 0,
    layers: int = 2,
    heads: int = 2,
    intermediate: int | None = None,
):
    """A random ``CLIPTextModel`` (``CLIPTextModelWithProjection`` when ``projection`` is given)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate or hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        projection_dim=projection or hidden,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def autoencoder(
    channels: tuple[int, ...], latent_channels: int, sample_size: int, norm_groups: int | None = None
):
    """A random ``AutoencoderKL`` with one level per entry of ``channels``."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        layers_per_block=1,
        norm_num_groups=norm_groups or min(8, channels[0]),
        sample_size=sample_size,
    )


def sd_scheduler(prediction_type: str = "epsilon"):
    """DDIM with Stable Diffusion's scaled-linear betas and trailing timestep spacing."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
        timestep_spacing="trailing",
    )


def build_tiny_pipeline(
    kind: str = "sd",
    tokenizer_dir: str | Path | None = None,
    sample_size: int = 8,
    channels: tuple[int, ...] = (32, 64),
    text_hidden: int = 32,
    vae_channels: tuple[int, ...] = (16, 32),
    latent_channels: int = 4,
    prediction_type: str = "epsilon",
    seed: int = 0,
    text_layers: int = 2,
    text_heads: int = 2,
    attention_heads: int | tuple[int, ...] = 8,
    cross_attention_everywhere: bool = False,
):
    """A random-weight SD1.5-type (``kind="sd"``) or SDXL-type (``"sdxl"``) pipeline.

    By default the first (full-resolution) UNet level has no attention. With
    ``cross_attention_everywhere`` every level cross-attends to the text; the first level then
    uses cross-attention only (no self-attention over all latent pixels, which is the costly part).
    """
    from diffusers import (
        UNet2DConditionModel,
    )
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir), model_max_length=77)
    vocab = len(tok)
    unet_kw = _unet_kwargs(
        kind, sample_size, channels, text_hidden, latent_channels, attention_heads, cross_attention_everywhere
    )
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_kw)
    torch.manual_seed(seed + 1)
    vae = autoencoder(vae_channels, latent_channels, sample_size * 2 ** (len(vae_channels) - 1))
    te = (
        text_encoder(vocab, text_hidden, None, seed + 2, layers=text_layers, heads=text_heads)
        if kind == "sd"
        else None
    )
    return _assemble(kind, tok, te, vae, unet, sd_scheduler(prediction_type), text_hidden, seed)


def _assemble(kind: str, tok, te, vae, unet, sched, text_hidden: int, seed: int):
    """The SD1.5-type pipeline, or the SDXL-type one with its two text encoders."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if kind == "sd":
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=te,
            tokenizer=tok,
            unet=unet,
            scheduler=sched,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    te1 = text_encoder(len(tok), text_hidden, None, seed + 2)
    te2 = text_encoder(len(tok), text_hidden, text_hidden, seed + 3)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=tok,
        tokenizer_2=tok,
        unet=unet,
        scheduler=sched,
    )


def _unet_kwargs(
    kind: str,
    sample_size: int,
    channels: tuple[int, ...],
    text_hidden: int,
    latent_channels: int,
    attention_heads,
    cross_attention_everywhere: bool,
) -> dict:
    """``UNet2DConditionModel`` settings of :func:`build_tiny_pipeline`."""
    n = len(channels)
    if cross_attention_everywhere:
        down, up = ("CrossAttnDownBlock2D",) * n, ("CrossAttnUpBlock2D",) * n
    else:
        down = tuple(["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (n - 1))
        up = tuple(["CrossAttnUpBlock2D"] * (n - 1) + ["UpBlock2D"])
    kw = dict(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=channels,
        layers_per_block=1,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=text_hidden,
        attention_head_dim=attention_heads,  # diffusers' legacy name for the number of heads
        norm_num_groups=min(8, channels[0]),
    )
    if cross_attention_everywhere:
        kw["only_cross_attention"] = (True,) + (False,) * (n - 1)
    if kind == "sdxl":
        kw.update(
            cross_attention_dim=text_hidden * 2,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=text_hidden + 6 * 8,
            transformer_layers_per_block=1,
        )
    return kw
