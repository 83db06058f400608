"""HPSv2.1 (Wu et al., 2023): an open_clip ViT-H-14 fine-tuned on human preferences, as a transformers ``CLIPModel``.

The reference checkpoint ``HPS_v2.1_compressed.pt`` is a torch file ``{"state_dict": ...}`` in
open_clip's key names; it is read with ``weights_only=True`` and its keys are renamed at load
(:func:`convert_open_clip`). Score: ``<img / |img|, txt / |txt|>`` with no logit scale, as
``img_score.py`` computes it. Images go through the validation transform HPSv2 builds
(``ToTensor``, then ``ResizeMaxSize(224)`` on the float tensor: long side to 224, black padding;
OpenAI normalisation); prompts through the ViT-H-14 tokenizer
(``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``), 77 tokens.
"""

from __future__ import annotations

import re

import torch

from ..errors import SelfNPOError
from .clip_score import tokenize
from .common import (
    build_with_weights,
    clip_features,
    clip_pixels,
    load_pretrained,
    load_weights,
    resolve_file,
    unit,
)

_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}


def _tower(state: dict, prefix: str) -> int:
    """Number of residual blocks under ``prefix`` (``visual.transformer`` or ``transformer``)."""
    pat = re.compile(re.escape(prefix) + r"\.resblocks\.(\d+)\.")
    found = {int(m.group(1)) for k in state if (m := pat.match(k))}
    return max(found) + 1 if found else 0


def _blocks(state: dict, src: str, dst: str, n: int) -> dict:
    out = {}
    for i in range(n):
        s, d = f"{src}.resblocks.{i}", f"{dst}.encoder.layers.{i}"
        for a, b in _BLOCK.items():
            for p in ("weight", "bias"):
                out[f"{d}.{b}.{p}"] = state[f"{s}.{a}.{p}"]
        # nn.MultiheadAttention packs q, k, v in one in_proj; CLIP's attention keeps them apart.
        for p in ("weight", "bias"):
            q, k, v = state[f"{s}.attn.in_proj_{p}"].chunk(3, dim=0)
            out.update(
                {
                    f"{d}.self_attn.q_proj.{p}": q,
                    f"{d}.self_attn.k_proj.{p}": k,
                    f"{d}.self_attn.v_proj.{p}": v,
                }
            )
    return out


def clip_config(state: dict, vision_heads: int = 0, text_heads: int = 0, eos_token_id: int = 49407):
    """The ``CLIPConfig`` of an open_clip ViT state dict, read from its shapes (heads cannot be).

    Heads default to open_clip's ViT-H-14 (vision head width 80, text head width 64).
    """
    from transformers import CLIPConfig

    vw, pw = state["visual.conv1.weight"].shape[0], state["visual.conv1.weight"].shape[-1]
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    tw = state["ln_final.weight"].shape[0]
    vision = dict(
        hidden_size=vw,
        intermediate_size=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=_tower(state, "visual.transformer"),
        num_attention_heads=vision_heads or (vw // 80 if vw == 1280 else vw // 64),
        image_size=grid * pw,
        patch_size=pw,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )
    text = dict(
        vocab_size=state["token_embedding.weight"].shape[0],
        hidden_size=tw,
        intermediate_size=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=_tower(state, "transformer"),
        num_attention_heads=text_heads or tw // 64,
        max_position_embeddings=state["positional_embedding"].shape[0],
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        eos_token_id=eos_token_id,
        bos_token_id=eos_token_id - 1,
        pad_token_id=0,
    )
    return CLIPConfig(
        text_config=text, vision_config=vision, projection_dim=state["text_projection"].shape[1]
    )


def convert_open_clip(state: dict) -> dict:
    """open_clip CLIP keys -> transformers ``CLIPModel`` keys (projections transposed, qkv split)."""
    nv, nt = _tower(state, "visual.transformer"), _tower(state, "transformer")
    v, t = "vision_model", "text_model"
    out = {
        f"{v}.embeddings.class_embedding": state["visual.class_embedding"],
        f"{v}.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        f"{v}.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        f"{v}.pre_layrnorm.weight": state["visual.ln_pre.weight"],
        f"{v}.pre_layrnorm.bias": state["visual.ln_pre.bias"],
        f"{v}.post_layernorm.weight": state["visual.ln_post.weight"],
        f"{v}.post_layernorm.bias": state["visual.ln_post.bias"],
        "visual_projection.weight": state["visual.proj"].T.contiguous(),
        f"{t}.embeddings.token_embedding.weight": state["token_embedding.weight"],
        f"{t}.embeddings.position_embedding.weight": state["positional_embedding"],
        f"{t}.final_layer_norm.weight": state["ln_final.weight"],
        f"{t}.final_layer_norm.bias": state["ln_final.bias"],
        "text_projection.weight": state["text_projection"].T.contiguous(),
        "logit_scale": state["logit_scale"].reshape(()),
    }
    out.update(_blocks(state, "visual.transformer", v, nv))
    out.update(_blocks(state, "transformer", t, nt))
    return out


def open_clip_state(raw: dict, path) -> dict:
    """The model's tensors from an HPS checkpoint (``state_dict`` key, optional ``module.`` prefix)."""
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else raw
    if not isinstance(state, dict):
        raise SelfNPOError(f"{path}: expected a state dict, got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def clip_from_open_clip(
    state: dict, path, vision_heads: int = 0, text_heads: int = 0, eos_token_id: int = 49407
):
    """A transformers ``CLIPModel`` holding an open_clip state dict; bad checkpoints give one line."""
    from transformers import CLIPModel

    try:
        cfg = clip_config(state, vision_heads, text_heads, eos_token_id)
        converted = convert_open_clip(state)
    except KeyError as e:
        raise SelfNPOError(f"{path}: not an open_clip ViT checkpoint (missing {e.args[0]})") from None
    return build_with_weights(lambda: CLIPModel(cfg), converted, path, "an open_clip ViT")


class HPSv2:
    """``<img / |img|, txt / |txt|>`` of the converted HPS model."""

    def __init__(self, model, tokenizer) -> None:
        self.model, self.tokenizer = model, tokenizer

    @torch.no_grad()
    def __call__(self, images, prompts) -> torch.Tensor:
        pixels = clip_pixels(images, int(self.model.config.vision_config.image_size), mode="pad")
        ids, _ = tokenize(self.tokenizer, prompts, self.model.config.text_config.max_position_embeddings)
        # open_clip pads with 0 and masks causally only; the causal mask makes padding inert.
        img, txt = clip_features(self.model, pixels, ids)
        return (unit(img) * unit(txt)).sum(-1).cpu()


def load(cfg, device, dtype) -> HPSv2:
    from transformers import CLIPTokenizer

    path = resolve_file(cfg.hps_weights, "--hps-weights", "HPSv2.1 checkpoint")
    tok = load_pretrained(CLIPTokenizer, cfg.hps_tokenizer, "--hps-tokenizer", "HPSv2 (ViT-H-14) tokenizer")
    model = clip_from_open_clip(
        open_clip_state(load_weights(path), path), path, eos_token_id=tok.eos_token_id
    )
    return HPSv2(model.to(device, dtype), tok)
