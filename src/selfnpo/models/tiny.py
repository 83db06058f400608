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
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir), model_max_length=77)
    vocab = len(tok)
    n = len(channels)
    if cross_attention_everywhere:
        down, up = ("CrossAttnDownBlock2D",) * n, ("CrossAttnUpBlock2D",) * n
    else:
        down = tuple(["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (n - 1))
        up = tuple(["CrossAttnUpBlock2D"] * (n - 1) + ["UpBlock2D"])
    unet_kw = dict(
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
        unet_kw["only_cross_attention"] = (True,) + (False,) * (n - 1)
    if kind == "sdxl":
        unet_kw.update(
            cross_attention_dim=text_hidden * 2,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=text_hidden + 6 * 8,
            transformer_layers_per_block=1,
        )
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_kw)
    torch.manual_seed(seed + 1)
    vae = autoencoder(vae_channels, latent_channels, sample_size * 2 ** (len(vae_channels) - 1))
    sched = sd_scheduler(prediction_type)
    if kind == "sd":
        te = text_encoder(vocab, text_hidden, None, seed + 2, layers=text_layers, heads=text_heads)
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
    te1 = text_encoder(vocab, text_hidden, None, seed + 2)
    te2 = text_encoder(vocab, text_hidden, text_hidden, seed + 3)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=tok,
        tokenizer_2=tok,
        unet=unet,
        scheduler=sched,
    )


def build_tiny_sd3_pipeline(
    tokenizer_dir: str | Path,
    sample_size: int = 8,
    seed: int = 0,
    shift: float = 3.0,
    with_t5: bool = True,
):
    """A random-weight ``StableDiffusion3Pipeline`` (sizes from diffusers' own SD3 pipeline tests).

    Two CLIP encoders with projections (pooled width 2 x 32) and a two-layer ``T5EncoderModel``.
    The hub's tiny T5 tokenizer is not available offline, so every text encoder uses the
    character-level CLIP tokenizer of :func:`write_tiny_vocab` (T5's ids are then CLIP ids; the
    encoder's vocabulary is sized to match).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer, T5Config, T5EncoderModel

    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir), model_max_length=77)
    vocab = len(tok)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=1,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    )
    te1 = text_encoder(vocab, 32, 32, seed + 2)
    te2 = text_encoder(vocab, 32, 32, seed + 3)
    te3 = None
    if with_t5:
        torch.manual_seed(seed + 4)
        te3 = T5EncoderModel(
            T5Config(
                vocab_size=vocab,
                d_model=32,
                d_kv=8,
                d_ff=37,
                num_layers=2,
                num_heads=4,
                pad_token_id=vocab - 1,
            )
        )
    torch.manual_seed(seed + 1)
    vae = autoencoder((16, 32), 4, sample_size * 2, norm_groups=8)
    vae.register_to_config(shift_factor=0.0609, scaling_factor=1.5035)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        vae=vae,
        text_encoder=te1,
        tokenizer=tok,
        text_encoder_2=te2,
        tokenizer_2=tok,
        text_encoder_3=te3,
        tokenizer_3=tok if with_t5 else None,
    )


def _tiny_t5(vocab: int, d_model: int, seed: int):
    """A two-layer random ``T5EncoderModel`` over the character-level CLIP vocabulary."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(
        T5Config(
            vocab_size=vocab,
            d_model=d_model,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            pad_token_id=vocab - 1,
        )
    )


def build_tiny_flux_pipeline(tokenizer_dir: str | Path, seed: int = 0, guidance_embeds: bool = True):
    """A random-weight ``FluxPipeline`` (sizes from diffusers' own Flux pipeline tests).

    ``guidance_embeds=False`` gives a FLUX.1-schnell-type (timestep-distilled) model. The T5
    tokenizer is the character-level CLIP one, as in :func:`build_tiny_sd3_pipeline`.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir), model_max_length=77)
    vocab = len(tok)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance_embeds,
    )
    te = text_encoder(vocab, 32, None, seed + 2)
    te2 = _tiny_t5(vocab, 32, seed + 3)
    torch.manual_seed(seed + 1)
    vae = autoencoder((8, 16), 1, 16, norm_groups=1)  # 1 latent channel: 2x2 packing gives 4
    vae.register_to_config(shift_factor=0.0609, scaling_factor=1.5035)
    sched = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15
    )
    return FluxPipeline(
        scheduler=sched,
        text_encoder=te,
        tokenizer=tok,
        text_encoder_2=te2,
        tokenizer_2=tok,
        transformer=transformer,
        vae=vae,
        image_encoder=None,
        feature_extractor=None,
    )


def build_tiny_wan_pipeline(tokenizer_dir: str | Path, seed: int = 0, two_experts: bool = False):
    """A random-weight ``WanPipeline`` (sizes from diffusers' own Wan pipeline tests), with
    Wan 2.1's flow UniPC scheduler. ``two_experts`` adds a ``transformer_2`` (Wan 2.2 A14B type)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir), model_max_length=77)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )

    def transformer(s: int):
        torch.manual_seed(s)
        return WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=16,
            out_channels=16,
            text_dim=32,
            freq_dim=256,
            ffn_dim=32,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        )

    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanPipeline(
        tokenizer=tok,
        text_encoder=_tiny_t5(len(tok), 32, seed + 3),
        vae=vae,
        scheduler=sched,
        transformer=transformer(seed),
        transformer_2=transformer(seed + 5) if two_experts else None,
        boundary_ratio=0.875 if two_experts else None,
    )


def build_tiny_cogvideox_pipeline(tokenizer_dir: str | Path, seed: int = 0, rotary: bool = True):
    """A random-weight ``CogVideoXPipeline`` (sizes from diffusers' own CogVideoX pipeline tests)
    with CogVideoX's own zero-terminal-SNR v-prediction DDIM scheduler (CogVideoX-2b's settings);
    ``rotary`` gives the 5B type's 3-D rotary position embeddings."""
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir), model_max_length=77)
    torch.manual_seed(seed)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,  # 3-D rotary embeddings need head_dim / 8 * 3 even
        in_channels=4,
        out_channels=4,
        time_embed_dim=2,
        text_embed_dim=32,
        num_layers=1,
        sample_width=2,
        sample_height=2,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=226,  # the pipeline's default prompt length
        use_rotary_positional_embeddings=rotary,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    sched = CogVideoXDDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        set_alpha_to_one=True,
        snr_shift_scale=3.0,
        timestep_spacing="trailing",
    )
    return CogVideoXPipeline(
        tokenizer=tok,
        text_encoder=_tiny_t5(len(tok), 32, seed + 3),
        vae=vae,
        transformer=transformer,
        scheduler=sched,
    )
