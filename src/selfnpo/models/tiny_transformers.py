"""Tiny random-weight pipelines of the transformer families (SD3, Flux, Wan, CogVideoX), for tests
and benchmarks; sizes follow diffusers' own pipeline tests. The UNet families are in
:mod:`selfnpo.models.tiny`, whose text encoder and autoencoder builders these reuse."""

from __future__ import annotations

from pathlib import Path

import torch

from .tiny import autoencoder, text_encoder


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
    from transformers import CLIPTokenizer

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
    te3 = _tiny_t5(vocab, 32, seed + 4) if with_t5 else None
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
    return CogVideoXPipeline(
        tokenizer=tok,
        text_encoder=_tiny_t5(len(tok), 32, seed + 3),
        vae=vae,
        transformer=transformer,
        scheduler=_cogvideox_scheduler(),
    )


def _cogvideox_scheduler():
    """CogVideoX-2b's zero-terminal-SNR v-prediction DDIM scheduler."""
    from diffusers import CogVideoXDDIMScheduler

    return CogVideoXDDIMScheduler(
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
