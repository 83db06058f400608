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
    t = torch.tensor(np.array(im), dtype=torch.float32).permute(2, 0, 1)[None] / 255
    content = F.interpolate(t, size=(16, 32), mode="bicubic", antialias=True)[
        0
    ]  # torchvision's tensor resize
    torch.testing.assert_close(x[:, 8:24], common.normalize(content))
    # No clamping after the float resize, as in the reference (bicubic overshoots [0, 1] at edges).
    assert common.resize_max_pad(t[0], 32).shape == (3, 32, 32)


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


# ---------------------------------------------------------------- ImageReward: BLIP key names

WORDS = [
    "a",
    "red",
    "circle",
    "blue",
    "square",
    "at",
    "the",
    "top",
    ",",
    "with",
    "long",
    "tail",
    "of",
    "words",
]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert")
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return d


def _blip_state(vocab: int, seed=3, vw=24, tw=16, layers=2, patch=16, grid=2, positions=40):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    v, t = "blip.visual_encoder.", "blip.text_encoder."
    st = {
        v + "cls_token": r(1, 1, vw),
        v + "pos_embed": r(1, grid * grid + 1, vw),
        v + "patch_embed.proj.weight": r(vw, 3, patch, patch),
        v + "patch_embed.proj.bias": r(vw),
        v + "norm.weight": 1 + r(vw),
        v + "norm.bias": r(vw),
        t + "embeddings.word_embeddings.weight": r(vocab, tw),
        t + "embeddings.position_embeddings.weight": r(positions, tw),
        t + "embeddings.LayerNorm.weight": 1 + r(tw),
        t + "embeddings.LayerNorm.bias": r(tw),
        t + "embeddings.position_ids": torch.arange(positions)[None],
    }
    for i in range(layers):
        b = f"{v}blocks.{i}."
        for n, shape in [
            ("norm1", (vw,)),
            ("norm2", (vw,)),
            ("attn.qkv", (3 * vw, vw)),
            ("attn.proj", (vw, vw)),
            ("mlp.fc1", (2 * vw, vw)),
            ("mlp.fc2", (vw, 2 * vw)),
        ]:
            st[b + n + ".weight"] = (1 + r(*shape)) if n.startswith("norm") else r(*shape)
            st[b + n + ".bias"] = r(shape[0])
        b = f"{t}encoder.layer.{i}."
        for att, kv in (("attention", tw), ("crossattention", vw)):
            for n, cols in (("query", tw), ("key", kv), ("value", kv)):
                st[f"{b}{att}.self.{n}.weight"], st[f"{b}{att}.self.{n}.bias"] = r(tw, cols), r(tw)
            st[f"{b}{att}.output.dense.weight"], st[f"{b}{att}.output.dense.bias"] = r(tw, tw), r(tw)
            st[f"{b}{att}.output.LayerNorm.weight"], st[f"{b}{att}.output.LayerNorm.bias"] = 1 + r(tw), r(tw)
        st[b + "intermediate.dense.weight"], st[b + "intermediate.dense.bias"] = r(2 * tw, tw), r(2 * tw)
        st[b + "output.dense.weight"], st[b + "output.dense.bias"] = r(tw, 2 * tw), r(tw)
        st[b + "output.LayerNorm.weight"], st[b + "output.LayerNorm.bias"] = 1 + r(tw), r(tw)
    st.update({"mlp." + k: v for k, v in _aesthetic_state(dims=(tw, 12, 8, 6, 4, 1), seed=seed).items()})
    return st


def _attend(q, k, v, heads, bias=None):
    b, n, d = q.shape
    split = lambda x: x.reshape(b, -1, heads, d // heads).transpose(1, 2)  # noqa: E731
    a = split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // heads)
    if bias is not None:
        a = a + bias
    return (a.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, n, d)


@torch.no_grad()
def _blip_reward(st, pixels, ids, mask, heads=2):
    """ImageReward's ``score`` written out: BLIP ViT, BLIP BERT with cross-attention, MLP, standardise."""
    p = lambda k: st["blip." + k]  # noqa: E731
    lin = lambda x, k: F.linear(x, p(k + ".weight"), p(k + ".bias"))  # noqa: E731
    x = F.conv2d(
        pixels,
        p("visual_encoder.patch_embed.proj.weight"),
        p("visual_encoder.patch_embed.proj.bias"),
        stride=16,
    )
    x = x.flatten(2).transpose(1, 2)
    vw = x.shape[-1]
    x = torch.cat([p("visual_encoder.cls_token").expand(len(x), 1, vw), x], 1) + p("visual_encoder.pos_embed")
    ln6 = lambda x, k: F.layer_norm(x, (x.shape[-1],), p(k + ".weight"), p(k + ".bias"), eps=1e-6)  # noqa: E731
    for i in range(2):
        b = f"visual_encoder.blocks.{i}."
        q, k, v = lin(ln6(x, b + "norm1"), b + "attn.qkv").chunk(3, -1)
        x = x + lin(_attend(q, k, v, heads), b + "attn.proj")
        x = x + lin(F.gelu(lin(ln6(x, b + "norm2"), b + "mlp.fc1")), b + "mlp.fc2")
    img = ln6(x, "visual_encoder.norm")
    ln12 = lambda x, k: F.layer_norm(x, (x.shape[-1],), p(k + ".weight"), p(k + ".bias"), eps=1e-12)  # noqa: E731
    t = "text_encoder."
    h = (
        p(t + "embeddings.word_embeddings.weight")[ids]
        + p(t + "embeddings.position_embeddings.weight")[: ids.shape[1]]
    )
    h = ln12(h, t + "embeddings.LayerNorm")
    pad = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    for i in range(2):
        b = f"{t}encoder.layer.{i}."
        a = _attend(
            lin(h, b + "attention.self.query"),
            lin(h, b + "attention.self.key"),
            lin(h, b + "attention.self.value"),
            heads,
            pad,
        )
        h = ln12(h + lin(a, b + "attention.output.dense"), b + "attention.output.LayerNorm")
        c = b + "crossattention."
        a = _attend(lin(h, c + "self.query"), lin(img, c + "self.key"), lin(img, c + "self.value"), heads)
        h = ln12(h + lin(a, c + "output.dense"), c + "output.LayerNorm")
        h = ln12(
            h + lin(F.gelu(lin(h, b + "intermediate.dense")), b + "output.dense"), b + "output.LayerNorm"
        )
    r = h[:, 0]
    for i in (0, 2, 4, 6, 7):
        r = F.linear(r, st[f"mlp.layers.{i}.weight"], st[f"mlp.layers.{i}.bias"])
    return (r[:, 0] - imagereward.MEAN) / imagereward.STD


def test_imagereward_equals_blip_forward(bert_dir, tmp_path):
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(bert_dir)
    st = _blip_state(len(tok))
    path = tmp_path / "ImageReward.pt"
    torch.save(st, path)
    scorer = imagereward.build(common.load_weights(path), path, tok, vision_heads=2, text_heads=2)
    ims = _images(2, (40, 48))
    enc = tok(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    expect = _blip_reward(st, common.clip_pixels(ims, 32), enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(scorer(ims, PROMPTS), expect, atol=1e-5, rtol=1e-4)
    assert (enc["attention_mask"] == 0).any()  # padding is exercised


def test_imagereward_bad_checkpoints_one_line(bert_dir):
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(bert_dir)
    st = _blip_state(len(tok))
    with pytest.raises(SelfNPOError, match="missing blip.visual_encoder.norm.weight"):
        imagereward.build(
            {k: v for k, v in st.items() if k != "blip.visual_encoder.norm.weight"}, "ir.pt", tok, 2, 2
        )
    bad = dict(st, **{"blip.text_encoder.encoder.layer.1.output.dense.bias": torch.zeros(5)})
    with pytest.raises(SelfNPOError, match="does not fit"):
        imagereward.build(bad, "ir.pt", tok, 2, 2)
    with pytest.raises(SelfNPOError, match="no reward MLP head"):
        imagereward.build(
            {k: v for k, v in st.items() if not k.startswith("mlp.layers.7")}, "ir.pt", tok, 2, 2
        )


# ---------------------------------------------------------------- the command


def _generate_folder(path, prompts, seeds, image_seed):
    """A folder in the format selfnpo generate writes: 00000.png ... and images.jsonl."""
    path.mkdir(parents=True)
    ims = _images(len(prompts), (32, 32), image_seed)
    recs = []
    for i, (p, s, im) in enumerate(zip(prompts, seeds, ims, strict=True)):
        im.save(path / f"{i:05d}.png")
        recs.append({"index": i, "prompt": p, "seed": s, "file": f"{i:05d}.png"})
    (path / "images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


@pytest.fixture(scope="module")
def weights(clip_dir, clip_tok, bert_dir, tmp_path_factory):
    """All five rewards' files, tiny, each in its reference's format (heads = width // 64 as for the real ones)."""
    from transformers import BertTokenizer

    d = tmp_path_factory.mktemp("weights")
    torch.save(_aesthetic_state(), d / "aesthetic.pth")
    torch.save({"state_dict": _open_clip_state(len(clip_tok[0]), vw=64, tw=64)}, d / "hps.pt")
    torch.save(_blip_state(len(BertTokenizer.from_pretrained(bert_dir)), vw=64, tw=64), d / "ImageReward.pt")
    return [
        "--clip-model", str(clip_dir), "--pickscore-model", str(clip_dir), "--pickscore-tokenizer", str(clip_dir),
        "--aesthetic-clip", str(clip_dir), "--aesthetic-weights", str(d / "aesthetic.pth"),
        "--hps-weights", str(d / "hps.pt"), "--hps-tokenizer", str(clip_tok[1]),
        "--imagereward-weights", str(d / "ImageReward.pt"), "--imagereward-tokenizer", str(bert_dir),
    ]  # fmt: skip


ALL = "pickscore,hpsv2,imagereward,aesthetic,clip"


def test_score_command_paired(tmp_path, weights, clip_dir, capsys):
    prompts = ["a red circle", "blue square", "a long tail", "the top", "red words"]
    a = _generate_folder(tmp_path / "a", prompts, range(10, 15), 1)
    b = _generate_folder(tmp_path / "b", prompts, range(10, 15), 2)
    out = tmp_path / "scores"
    argv = ["score", "--images", a, "--baseline", b, "--output-dir", str(out), "--models", ALL]
    rc = cli.main([*argv, *weights, "--batch-size", "2", "--n-boot", "200"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "win rate" in captured.out
    rows = [json.loads(ln) for ln in (out / "scores.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in rows] == list(range(10, 15)) and [r["prompt"] for r in rows] == prompts
    header = (out / "scores.csv").read_text().splitlines()[0]
    assert header == "index,file,seed,prompt," + ALL
    model, tok = _clip(clip_dir)
    direct = PickScore(model, tok)([Image.open(tmp_path / "a" / r["file"]) for r in rows], prompts)
    torch.testing.assert_close(torch.tensor([r["pickscore"] for r in rows]), direct, atol=1e-5, rtol=1e-5)
    for name in ALL.split(",")[:-1]:  # not clip: random weights give cosines < 0, clamped to 0
        assert len({r[name] for r in rows}) > 1, name  # the scores depend on the image and prompt
    table = json.loads((out / "comparison.json").read_text())
    assert [t["reward"] for t in table] == ALL.split(",")
    base = [json.loads(ln) for ln in (out / "baseline_scores.jsonl").read_text().splitlines()]
    for t in table:
        diff = np.mean([r[t["reward"]] - q[t["reward"]] for r, q in zip(rows, base, strict=True)])
        assert t["diff"] == pytest.approx(diff) and t["diff_lo"] <= t["diff"] <= t["diff_hi"]
        assert 0 <= t["win_lo"] <= t["win_rate"] <= t["win_hi"] <= 1 and t["n"] == 5


def test_score_folder_against_itself_is_a_tie(tmp_path, clip_dir):
    from selfnpo.scoring.run import ScoreConfig, run_score

    a = _generate_folder(tmp_path / "a", ["a red circle", "blue square", "red"], [0, 1, 2], 1)
    cfg = ScoreConfig(
        images=a,
        baseline=a,
        output_dir=str(tmp_path / "o"),
        models="pickscore",
        pickscore_model=str(clip_dir),
        pickscore_tokenizer=str(clip_dir),
    )
    (t,) = run_score(cfg, progress=lambda s: None)["comparison"]
    assert (t["diff"], t["diff_lo"], t["diff_hi"], t["win_rate"]) == (0.0, 0.0, 0.0, 0.5)


def test_score_command_on_generate_output(tmp_path, tiny_sd, prompts_file, clip_dir, capsys):
    out = tmp_path / "gen"
    gen = ["generate", "--quiet", "--model", tiny_sd, "--prompts", prompts_file, "--steps", "2"]
    assert cli.main([*gen, "--output-dir", str(out)]) == 0
    argv = ["score", "--quiet", "--images", str(out), "--output-dir", str(tmp_path / "s"), "--models", "clip"]
    assert cli.main([*argv, "--clip-model", str(clip_dir)]) == 0, capsys.readouterr().err
    lines = (tmp_path / "s" / "scores.csv").read_text().splitlines()
    assert len(lines) == 5 and lines[1].startswith("0,00000.png,0,a red circle,")


def _err(capsys, *argv):
    rc = cli.main(["score", "--quiet", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    return err


def test_score_command_errors_one_line(tmp_path, clip_dir, weights, capsys):
    a = _generate_folder(tmp_path / "a", ["red", "blue"], [0, 1], 1)
    b = _generate_folder(tmp_path / "b", ["red", "blue"], [0, 2], 2)
    out = ["--output-dir", str(tmp_path / "o")]
    assert "differ at image 1" in _err(
        capsys, "--images", a, "--baseline", b, "--models", "clip", *out, *weights
    )
    assert "no images.jsonl" in _err(capsys, "--images", str(tmp_path), "--models", "clip", *out, *weights)
    assert "unknown --models" in _err(capsys, "--images", a, "--models", "fid", *out)
    # Offline with the default hub names: one line naming every download.
    err = _err(capsys, "--images", a, *out)
    for what in (
        "PickScore_v1",
        "HPS_v2.1_compressed.pt",
        "ImageReward.pt",
        "sac+logos+ava1-l14-linearMSE.pth",
    ):
        assert what in err
    evil = tmp_path / "evil.pth"
    torch.save({"layers.0.weight": torch.zeros(1), "x": _NotWeights()}, evil)
    err = _err(
        capsys, "--images", a, "--models", "aesthetic", *out, *weights, "--aesthetic-weights", str(evil)
    )
    assert "refusing to unpickle" in err


def _meta(**shapes):
    return {k: torch.empty(*s, device="meta") for k, s in shapes.items()}


def test_real_checkpoint_shapes_give_the_reference_architectures():
    """ViT-H-14 (HPSv2) and BLIP ViT-L + BERT-base (ImageReward) read from full-size shapes, on meta tensors."""
    oc = {"visual.conv1.weight": (1280, 3, 14, 14), "visual.positional_embedding": (257, 1280),
          "ln_final.weight": (1024,), "token_embedding.weight": (49408, 1024), "positional_embedding": (77, 1024),
          "text_projection": (1024, 1024), "visual.transformer.resblocks.0.mlp.c_fc.weight": (5120, 1280),
          "transformer.resblocks.0.mlp.c_fc.weight": (4096, 1024)}  # fmt: skip
    oc.update({f"visual.transformer.resblocks.{i}.ln_1.weight": (1280,) for i in range(32)})
    oc.update({f"transformer.resblocks.{i}.ln_1.weight": (1024,) for i in range(24)})
    cfg = hps.clip_config(_meta(**oc))
    v, t = cfg.vision_config, cfg.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.image_size, v.patch_size) == (
        1280,
        32,
        16,
        224,
        14,
    )
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.vocab_size, cfg.projection_dim) == (
        1024,
        24,
        16,
        49408,
        1024,
    )
    assert v.hidden_act == t.hidden_act == "gelu"
    v, t = "blip.visual_encoder.", "blip.text_encoder."
    br = {v + "cls_token": (1, 1, 1024), v + "patch_embed.proj.weight": (1024, 3, 16, 16), v + "pos_embed": (1, 197, 1024),
          v + "blocks.0.mlp.fc1.weight": (4096, 1024), t + "embeddings.word_embeddings.weight": (30524, 768),
          t + "encoder.layer.0.crossattention.self.key.weight": (768, 1024),
          t + "encoder.layer.0.intermediate.dense.weight": (3072, 768),
          t + "embeddings.position_embeddings.weight": (512, 768)}  # fmt: skip
    br.update({f"{v}blocks.{i}.norm1.weight": (1024,) for i in range(24)})
    br.update({f"{t}encoder.layer.{i}.output.dense.weight": (768, 3072) for i in range(12)})
    vc, tc = imagereward.configs(_meta(**br))
    assert (vc.hidden_size, vc.num_hidden_layers, vc.num_attention_heads, vc.image_size, vc.patch_size) == (
        1024,
        24,
        16,
        224,
        16,
    )
    assert (tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads, tc.encoder_hidden_size) == (
        768,
        12,
        12,
        1024,
    )


def test_stale_comparison_is_removed(tmp_path, clip_dir):
    from selfnpo.scoring.run import ScoreConfig, run_score

    a = _generate_folder(tmp_path / "a", ["red", "blue"], [0, 1], 1)
    out = tmp_path / "o"
    kw = dict(images=a, output_dir=str(out), models="clip", clip_model=str(clip_dir))
    run_score(ScoreConfig(baseline=a, **kw), progress=lambda s: None)
    assert (out / "comparison.json").is_file()
    run_score(ScoreConfig(**kw), progress=lambda s: None)
    assert sorted(p.name for p in out.iterdir()) == ["score_config.json", "scores.csv", "scores.jsonl"]


def test_batch_size_and_long_prompts_do_not_change_scores(tmp_path, weights):
    """Equal scores for any batch size; prompts beyond 77 (CLIP) or 35 (BLIP) tokens are truncated."""
    from selfnpo.scoring.run import ScoreConfig, run_score

    prompts = ["red " * 60, "a blue square", "a circle at the top " * 10]
    a = _generate_folder(tmp_path / "a", prompts, [0, 1, 2], 4)
    opts = {k.lstrip("-").replace("-", "_"): v for k, v in zip(weights[::2], weights[1::2], strict=True)}
    runs = [
        run_score(ScoreConfig(images=a, output_dir=str(tmp_path / f"o{b}"), models=ALL, batch_size=b, **opts),
                  progress=lambda s: None)["rows"]
        for b in (1, 3)
    ]  # fmt: skip
    for name in ALL.split(","):
        np.testing.assert_allclose(
            [r[name] for r in runs[0]], [r[name] for r in runs[1]], rtol=1e-5, atol=1e-5
        )


def test_unreadable_inputs_one_line(tmp_path, clip_dir, capsys):
    a = _generate_folder(tmp_path / "a", ["red", "blue"], [0, 1], 1)
    (tmp_path / "a" / "00001.png").write_bytes(b"not a png")
    args = [
        "--images",
        a,
        "--models",
        "clip",
        "--clip-model",
        str(clip_dir),
        "--output-dir",
        str(tmp_path / "o"),
    ]
    assert "00001.png: unreadable image" in _err(capsys, *args)
    (tmp_path / "a" / "images.jsonl").write_bytes(b"\xff\xfe")
    assert "images.jsonl: unreadable" in _err(capsys, *args)
