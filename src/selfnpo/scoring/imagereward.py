"""ImageReward (Xu et al., 2023): BLIP's ViT and cross-attending BERT, then an MLP on the [CLS] state.

The reference checkpoint ``ImageReward.pt`` is a torch state dict (read with ``weights_only=True``)
with keys ``blip.visual_encoder.*`` (a timm-style ViT-L/16), ``blip.text_encoder.*`` (BLIP's
``med.py`` BERT with cross-attention to the image tokens) and ``mlp.layers.{0,2,4,6,7}.*``.
They are renamed to transformers' ``BlipVisionModel`` and ``BlipTextModel`` (whose text keys are
BLIP's own). Score: ``(MLP(h_cls) - 0.16717362830052426) / 1.0333394966054072`` as the reference's
``score``; images ``Resize(224, BICUBIC)``, ``CenterCrop(224)``, OpenAI normalisation; prompts
through the ``bert-base-uncased`` tokenizer, padded and truncated to 35 tokens.
"""

from __future__ import annotations

import re

import torch

from ..errors import SelfNPOError
from .aesthetic import mlp_layers
from .common import build_with_weights, clip_pixels, load_pretrained, load_weights, resolve_file

MEAN, STD = 0.16717362830052426, 1.0333394966054072
MAX_TOKENS = 35

_VIT_BLOCK = {
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def _count(state: dict, pattern: str) -> int:
    pat = re.compile(pattern)
    found = {int(m.group(1)) for k in state if (m := pat.match(k))}
    return max(found) + 1 if found else 0


def convert_vit(state: dict) -> dict:
    """BLIP ``visual_encoder.*`` (timm ViT) -> ``BlipVisionModel`` keys."""
    s = "blip.visual_encoder."
    out = {
        "embeddings.class_embedding": state[s + "cls_token"],
        "embeddings.position_embedding": state[s + "pos_embed"],
        "embeddings.patch_embedding.weight": state[s + "patch_embed.proj.weight"],
        "embeddings.patch_embedding.bias": state[s + "patch_embed.proj.bias"],
        "post_layernorm.weight": state[s + "norm.weight"],
        "post_layernorm.bias": state[s + "norm.bias"],
    }
    for i in range(_count(state, re.escape(s) + r"blocks\.(\d+)\.")):
        for a, b in _VIT_BLOCK.items():
            for p in ("weight", "bias"):
                out[f"encoder.layers.{i}.{b}.{p}"] = state[f"{s}blocks.{i}.{a}.{p}"]
    return out


def convert_text(state: dict) -> dict:
    """BLIP ``text_encoder.*`` -> ``BlipTextModel`` keys (the same names; buffers dropped)."""
    s = "blip.text_encoder."
    return {k[len(s) :]: v for k, v in state.items() if k.startswith(s) and not k.endswith("position_ids")}


def configs(state: dict, vision_heads: int = 0, text_heads: int = 0):
    """``BlipVisionConfig`` and ``BlipTextConfig`` read from the shapes (heads: width // 64 unless given)."""
    from transformers import BlipTextConfig, BlipVisionConfig

    v, t = "blip.visual_encoder.", "blip.text_encoder."
    vw = state[v + "cls_token"].shape[-1]
    patch = state[v + "patch_embed.proj.weight"].shape[-1]
    grid = round((state[v + "pos_embed"].shape[1] - 1) ** 0.5)
    vision = BlipVisionConfig(
        hidden_size=vw,
        intermediate_size=state[v + "blocks.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=_count(state, re.escape(v) + r"blocks\.(\d+)\."),
        num_attention_heads=vision_heads or vw // 64,
        image_size=grid * patch,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=1e-6,  # BLIP's ViT: LayerNorm(eps=1e-6)
    )
    words = state[t + "embeddings.word_embeddings.weight"]
    layer = t + "encoder.layer.0."
    text = BlipTextConfig(
        vocab_size=words.shape[0],
        hidden_size=words.shape[1],
        encoder_hidden_size=state[layer + "crossattention.self.key.weight"].shape[1],
        intermediate_size=state[layer + "intermediate.dense.weight"].shape[0],
        num_hidden_layers=_count(state, re.escape(t) + r"encoder\.layer\.(\d+)\."),
        num_attention_heads=text_heads or words.shape[1] // 64,
        max_position_embeddings=state[t + "embeddings.position_embeddings.weight"].shape[0],
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        bos_token_id=None,
        sep_token_id=None,
        pad_token_id=0,
    )
    return vision, text


class ImageReward:
    """``(MLP(BERT(prompt | ViT(image))[:, 0]) - mean) / std``."""

    def __init__(self, vision, text, chain, tokenizer) -> None:
        self.vision, self.text, self.tokenizer = vision, text, tokenizer
        self.chain = [(w.to(vision.device), b.to(vision.device)) for w, b in chain]

    @torch.no_grad()
    def __call__(self, images, prompts) -> torch.Tensor:
        dev, dtype = self.vision.device, next(self.vision.parameters()).dtype
        pixels = clip_pixels(images, int(self.vision.config.image_size)).to(dev, dtype)
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state  # [B, 1 + N, Dv]
        tok = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
        )
        hidden = self.text(
            input_ids=tok["input_ids"].to(dev),
            attention_mask=tok["attention_mask"].to(dev),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=dev),
        ).last_hidden_state
        x = hidden[:, 0].float()
        for w, b in self.chain:
            x = x @ w.T + b
        return ((x[:, 0] - MEAN) / STD).cpu()


def build(state: dict, path, tokenizer, vision_heads: int = 0, text_heads: int = 0) -> ImageReward:
    """An :class:`ImageReward` from a reference state dict; bad checkpoints give one line."""
    from transformers import BlipTextModel, BlipVisionModel

    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    try:
        vcfg, tcfg = configs(state, vision_heads, text_heads)
        vit, bert = convert_vit(state), convert_text(state)
    except KeyError as e:
        raise SelfNPOError(f"{path}: not an ImageReward checkpoint (missing {e.args[0]})") from None
    vision = build_with_weights(lambda: BlipVisionModel(vcfg), vit, path, "ImageReward's BLIP ViT")
    text = build_with_weights(
        lambda: BlipTextModel(tcfg, add_pooling_layer=False), bert, path, "ImageReward's BLIP BERT"
    )
    head = {k.removeprefix("mlp."): v for k, v in state.items() if k.startswith("mlp.")}
    chain = mlp_layers(head, path, tcfg.hidden_size)
    return ImageReward(
        vision.eval().requires_grad_(False), text.eval().requires_grad_(False), chain, tokenizer
    )


def load(cfg, device, dtype) -> ImageReward:
    from transformers import BertTokenizer

    path = resolve_file(cfg.imagereward_weights, "--imagereward-weights", "ImageReward checkpoint")
    tok = load_pretrained(
        BertTokenizer, cfg.imagereward_tokenizer, "--imagereward-tokenizer", "ImageReward (BERT) tokenizer"
    )
    raw = load_weights(path)
    model = build(raw.get("state_dict", raw), path, tok)
    model.vision.to(device, dtype)
    model.text.to(device, dtype)
    model.chain = [(w.to(device), b.to(device)) for w, b in model.chain]
    return model
