"""Reward models on tiny random weights written in each reference's own format.

Every conversion runs, and each score equals an independent computation on the same weights:
open_clip's forward (``nn.MultiheadAttention``) for HPSv2, a hand-written BLIP ViT + BERT for
ImageReward, ``CLIPModel.forward`` for PickScore and CLIP score, an ``nn.Sequential`` for the
aesthetic MLP.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from selfnpo import cli
from selfnpo.errors import SelfNPOError
from selfnpo.scoring import common, hps, imagereward
from selfnpo.scoring.aesthetic import Aesthetic, mlp_layers
from selfnpo.scoring.clip_score import ClipScore
from selfnpo.scoring.pickscore import PickScore

PROMPTS = ["a red circle", "a blue square at the top, with a long tail of words"]
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789,.")


def _images(n=2, size=(40, 48), seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def clip_tok(tmp_path_factory):
    """A character-level CLIP tokenizer in CLIP's id order (<|endoftext|> is the largest id)."""
    from transformers import CLIPTokenizer

    d = tmp_path_factory.mktemp("cliptok")
    tokens = CHARS + [c + "</w>" for c in CHARS] + ["<|startoftext|>", "<|endoftext|>"]
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (d / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt")), d


@pytest.fixture(scope="module")
def clip_dir(clip_tok, tmp_path_factory):
    """A tiny random CLIPModel + tokenizer saved with save_pretrained (PickScore / CLIP score format)."""
    from transformers import CLIPConfig, CLIPModel

    tok, _ = clip_tok
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            eos_token_id=tok.eos_token_id,
            bos_token_id=tok.bos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    d = tmp_path_factory.mktemp("clip")
    CLIPModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _clip(clip_dir):
    from transformers import CLIPModel, CLIPTokenizer

    return CLIPModel.from_pretrained(clip_dir).eval(), CLIPTokenizer.from_pretrained(clip_dir)


def test_preprocessing_matches_clip_image_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    for size in [(40, 48), (64, 36), (32, 32)]:
        ims = _images(2, size)
        ref = torch.as_tensor(np.stack(proc(images=ims)["pixel_values"]))
        torch.testing.assert_close(common.clip_pixels(ims, 32), ref, atol=1e-5, rtol=0)


def test_resize_max_pad_pads_with_black():
    im = _images(1, (40, 20))[0]
    x = common.clip_pixels([im], 32, mode="pad")[0]  # 32 x 16 content, 8 rows of padding above and below
    black = -torch.tensor(common.CLIP_MEAN) / torch.tensor(common.CLIP_STD)
    torch.testing.assert_close(x[:, :8].mean((1, 2)), black)
    torch.testing.assert_close(x[:, 24:].mean((1, 2)), black)
    torch.testing.assert_close(x[:, 8:24], common.to_pixels(im.resize((32, 16), Image.BICUBIC)))


def test_pickscore_and_clip_score_equal_clip_forward(clip_dir):
    model, tok = _clip(clip_dir)
    ims = _images()
    inputs = tok(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=common.clip_pixels(ims, 32),
        ).logits_per_image.diagonal()
    torch.testing.assert_close(PickScore(model, tok)(ims, PROMPTS), logits, atol=1e-5, rtol=1e-5)
    cos = logits / model.logit_scale.exp()
    torch.testing.assert_close(
        ClipScore(model, tok)(ims, PROMPTS), (100 * cos).clamp_min(0), atol=1e-4, rtol=1e-5
    )


def _aesthetic_state(dims=(16, 12, 8, 6, 4, 1), seed=1):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i, (a, b) in zip((0, 2, 4, 6, 7), zip(dims[:-1], dims[1:], strict=True), strict=True):
        state[f"layers.{i}.weight"] = torch.randn(b, a, generator=g) / math.sqrt(a)
        state[f"layers.{i}.bias"] = torch.randn(b, generator=g)
    return state


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_aesthetic_equals_reference_mlp(clip_dir, tmp_path, fmt):
    from safetensors.torch import save_file

    model, _ = _clip(clip_dir)
    state = _aesthetic_state()
    path = tmp_path / f"aesthetic.{fmt}"
    (torch.save if fmt == "pth" else save_file)(state, str(path))
    scorer = Aesthetic(model, mlp_layers(common.load_weights(path), path, 16))
    ref = torch.nn.Module()  # the reference MLP: self.layers = nn.Sequential(...)
    ref.layers = torch.nn.Sequential(
        torch.nn.Linear(16, 12),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(12, 8),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(8, 6),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(6, 4),
        torch.nn.Linear(4, 1),
    )
    ref.load_state_dict(state)
    ref.eval()
    ims = _images()
    with torch.no_grad():
        e = model.get_image_features(pixel_values=common.clip_pixels(ims, 32))
        e = getattr(e, "pooler_output", e)
        expect = ref.layers(e / e.norm(dim=-1, keepdim=True))[:, 0]
    torch.testing.assert_close(scorer(ims, PROMPTS), expect, atol=1e-5, rtol=1e-5)


def test_aesthetic_bad_shapes_one_line(tmp_path):
    state = _aesthetic_state(dims=(20, 12, 8, 6, 4, 1))
    with pytest.raises(SelfNPOError, match="expected"):
        mlp_layers(state, "x.pth", 16)
    del state["layers.7.bias"]
    with pytest.raises(SelfNPOError, match="missing layers.7.bias"):
        mlp_layers(state, "x.pth", 20)


# ---------------------------------------------------------------- HPSv2: open_clip key names


def _open_clip_state(vocab: int, seed=2, vw=32, tw=24, embed=16, layers=2, patch=8, grid=4, ctx=77):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    st = {
        "visual.conv1.weight": r(vw, 3, patch, patch),
        "visual.class_embedding": r(vw),
        "visual.positional_embedding": r(grid * grid + 1, vw),
        "visual.ln_pre.weight": 1 + r(vw),
        "visual.ln_pre.bias": r(vw),
        "visual.ln_post.weight": 1 + r(vw),
        "visual.ln_post.bias": r(vw),
        "visual.proj": r(vw, embed),
        "token_embedding.weight": r(vocab, tw),
        "positional_embedding": r(ctx, tw),
        "ln_final.weight": 1 + r(tw),
        "ln_final.bias": r(tw),
        "text_projection": r(tw, embed),
        "logit_scale": torch.tensor(math.log(100.0)),
    }
    for pre, w in (("visual.transformer", vw), ("transformer", tw)):
        for i in range(layers):
            b = f"{pre}.resblocks.{i}"
            st.update(
                {
                    f"{b}.ln_1.weight": 1 + r(w),
                    f"{b}.ln_1.bias": r(w),
                    f"{b}.attn.in_proj_weight": r(3 * w, w),
                    f"{b}.attn.in_proj_bias": r(3 * w),
                    f"{b}.attn.out_proj.weight": r(w, w),
                    f"{b}.attn.out_proj.bias": r(w),
                    f"{b}.ln_2.weight": 1 + r(w),
                    f"{b}.ln_2.bias": r(w),
                    f"{b}.mlp.c_fc.weight": r(4 * w, w),
                    f"{b}.mlp.c_fc.bias": r(4 * w),
                    f"{b}.mlp.c_proj.weight": r(w, 4 * w),
                    f"{b}.mlp.c_proj.bias": r(w),
                }
            )
    return st


def _oc_tower(x, st, pre, heads, mask=None):
    """open_clip's residual attention blocks, with nn.MultiheadAttention as open_clip uses."""
    w = x.shape[-1]
    i = 0
    while f"{pre}.resblocks.{i}.ln_1.weight" in st:
        p = lambda n: st[f"{pre}.resblocks.{i}.{n}"]  # noqa: E731, B023
        attn = torch.nn.MultiheadAttention(w, heads, batch_first=True)
        attn.load_state_dict(
            {
                "in_proj_weight": p("attn.in_proj_weight"),
                "in_proj_bias": p("attn.in_proj_bias"),
                "out_proj.weight": p("attn.out_proj.weight"),
                "out_proj.bias": p("attn.out_proj.bias"),
            }
        )
        h = F.layer_norm(x, (w,), p("ln_1.weight"), p("ln_1.bias"))
        x = x + attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        h = F.layer_norm(x, (w,), p("ln_2.weight"), p("ln_2.bias"))
        x = x + F.linear(
            F.gelu(F.linear(h, p("mlp.c_fc.weight"), p("mlp.c_fc.bias"))),
            p("mlp.c_proj.weight"),
            p("mlp.c_proj.bias"),
        )
        i += 1
    return x


@torch.no_grad()
def _open_clip_hps(st, pixels, tokens, heads=2):
    """HPSv2's score by open_clip's own forward: diag(unit(img) @ unit(txt).T)."""
    x = (
        F.conv2d(pixels, st["visual.conv1.weight"], stride=st["visual.conv1.weight"].shape[-1])
        .flatten(2)
        .transpose(1, 2)
    )
    vw = x.shape[-1]
    x = (
        torch.cat([st["visual.class_embedding"].expand(x.shape[0], 1, vw), x], 1)
        + st["visual.positional_embedding"]
    )
    x = _oc_tower(
        F.layer_norm(x, (vw,), st["visual.ln_pre.weight"], st["visual.ln_pre.bias"]),
        st,
        "visual.transformer",
        heads,
    )
    img = (
        F.layer_norm(x[:, 0], (vw,), st["visual.ln_post.weight"], st["visual.ln_post.bias"])
        @ st["visual.proj"]
    )
    n, tw = tokens.shape[1], st["ln_final.weight"].shape[0]
    causal = torch.full((n, n), float("-inf")).triu(1)
    t = _oc_tower(
        st["token_embedding.weight"][tokens] + st["positional_embedding"][:n],
        st,
        "transformer",
        heads,
        causal,
    )
    t = F.layer_norm(t, (tw,), st["ln_final.weight"], st["ln_final.bias"])
    txt = t[torch.arange(len(tokens)), tokens.argmax(-1)] @ st["text_projection"]
    return (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)


def _open_clip_tokens(tok, prompts, ctx=77):
    """open_clip's tokenizer output: [sot] ids [eot], zero padded to the context length."""
    out = torch.zeros(len(prompts), ctx, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids = tok(p)["input_ids"][:ctx]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def test_hps_conversion_equals_open_clip_forward(clip_tok, tmp_path):
    tok, _ = clip_tok
    st = _open_clip_state(len(tok))
    path = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in st.items()}}, path)
    raw = common.load_weights(path)
    model = hps.clip_from_open_clip(hps.open_clip_state(raw, path), path, 2, 2, tok.eos_token_id)
    ims = _images(2, (48, 32))
    got = hps.HPSv2(model, tok)(ims, PROMPTS)
    expect = _open_clip_hps(st, common.clip_pixels(ims, 32, mode="pad"), _open_clip_tokens(tok, PROMPTS))
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-4)


def test_hps_bad_checkpoints_one_line(clip_tok, tmp_path):
    tok, _ = clip_tok
    st = _open_clip_state(len(tok))
    broken = {k: v for k, v in st.items() if k != "visual.ln_post.bias"}
    with pytest.raises(SelfNPOError, match="missing visual.ln_post.bias"):
        hps.clip_from_open_clip(broken, "hps.pt", 2, 2)
    wrong = dict(st, **{"transformer.resblocks.1.mlp.c_fc.weight": torch.zeros(7, 24)})
    with pytest.raises(SelfNPOError, match="does not fit"):
        hps.clip_from_open_clip(wrong, "hps.pt", 2, 2)


class _NotWeights:
    pass


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": _NotWeights()}, path)
    with pytest.raises(SelfNPOError, match="refusing to unpickle") as e:
        common.load_weights(path)
    assert "\n" not in str(e.value)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(SelfNPOError, match="junk.pt"):
        common.load_weights(tmp_path / "junk.pt")


def test_offline_hub_names_what_to_download(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        SelfNPOError, match=r"download HPS_v2.1_compressed.pt from https://huggingface.co/xswu/HPSv2"
    ):
        common.resolve_file("xswu/HPSv2/HPS_v2.1_compressed.pt", "--hps-weights", "HPSv2.1")
    from transformers import CLIPModel

    with pytest.raises(SelfNPOError, match=r"download openai/clip-vit-large-patch14 .* --clip-model"):
        common.load_pretrained(
            CLIPModel, "openai/clip-vit-large-patch14", "--clip-model", "CLIP", local_files_only=True
        )
