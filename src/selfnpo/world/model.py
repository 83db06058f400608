"""The embedded default model: a tiny SD1.5-type pipeline trained on the procedural world.

``selfnpo pretrain`` reproduces it in three resumable phases: (1) the AutoencoderKL learns to
reconstruct 32x32 renders, (2) the CLIPTextModel (over the real CLIP BPE vocabulary) learns to
encode what a caption states: a linear read-out of its token states, through one learned
attention query per attribute, must recover the caption's labels; it is then frozen, as SD's
CLIP is, (3) the UNet is trained from scratch with the ``diffusion`` objective through the one
training loop, with caption dropout so that the unconditional prediction exists. Phases 1 and 2
run in their own short loops, checkpointed like every run. The shipped copy is stored in fp16.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import SelfNPOError
from ..io import atomic_dir, atomic_write_text, prepare_output
from ..training.checkpoint import load_latest, optimizer_from_flat, optimizer_to_flat, save_checkpoint
from ..training.config import opt
from .captions import RELATIONS, CaptionLabels, caption, caption_with_labels
from .render import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, TEXTURES, render_batch, sample_scene

UNET_HEADS = (2, 8, 8)
TEXT_HIDDEN = 64
TEXT_LAYERS = 3
TEXT_HEADS = 4


def shipped_model_dir() -> Path:
    """Folder of the trained world model inside the installed package."""
    return Path(str(resources.files("selfnpo.world") / "assets" / "world-model"))


def images_to_unit(images: np.ndarray) -> Tensor:
    """uint8 ``[N, H, W, 3]`` -> float ``[N, 3, H, W]`` in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def world_batch(rng: np.random.Generator, n: int, split: str = "train") -> tuple[list[str], np.ndarray]:
    """``n`` fresh renders of ``split`` and one caption each."""
    images, scenes = render_batch(rng, n, split)
    return [caption(s, rng) for s in scenes], images


def world_prompts(n: int, split: str, seed: int) -> list[str]:
    """Captions of ``n`` scenes of ``split`` (``heldout`` for evaluation prompts)."""
    rng = np.random.default_rng(seed)
    return [caption(sample_scene(rng, split), rng) for _ in range(n)]


class WorldSource:
    """Training source that renders fresh world scenes each step and encodes them with the VAE."""

    def __init__(self, model, split: str = "train") -> None:
        self.model, self.split = model, split

    def sample(self, g: torch.Generator, n: int) -> tuple[list[str], Tensor]:
        seed = int(torch.randint(2**62, (1,), generator=g, device=g.device).item())
        caps, images = world_batch(np.random.default_rng(seed), n, self.split)
        return caps, self.model.encode_images(images_to_unit(images)).to(g.device)


@dataclass
class PretrainConfig:
    """Train the embedded world model from scratch (VAE, text encoder, then UNet)."""

    output_dir: str = opt("runs/pretrain", "run folder; the finished pipeline is written to OUTPUT_DIR/model")
    recipe: str = opt(
        "v2",
        "preset for the settings below that are left at their defaults: v2 (the shipped model) or v3 "
        "(larger UNet and autoencoder, EMA weights, min-SNR weighting; docs/world.md)",
        choices=("v2", "v3"),
    )
    unet_channels: str = opt("32,64,64", "UNet block widths (comma-separated)")
    vae_channels: str = opt("16,32", "autoencoder block widths (comma-separated)")
    vae_steps: int = opt(3000, "autoencoder training steps")
    vae_cosine: bool = opt(False, "cosine learning-rate decay over the autoencoder steps")
    text_steps: int = opt(800, "text encoder training steps")
    unet_steps: int = opt(
        3000, "UNet training steps (constant lr: a shorter run is a prefix of a longer one)"
    )
    vae_batch_size: int = opt(16, "images per autoencoder step")
    text_batch_size: int = opt(128, "captions per text encoder step")
    batch_size: int = opt(32, "images per UNet step")
    vae_lr: float = opt(1e-3, "autoencoder learning rate")
    text_lr: float = opt(1e-3, "text encoder learning rate")
    unet_lr: float = opt(5e-4, "UNet learning rate")
    caption_dropout: float = opt(0.1, "probability of training on the empty prompt (unconditional)")
    ema_decay: float = opt(
        0.0,
        "EMA rate of the UNet weights, whose EMA is then the finished model (0 = no EMA: the last weights)",
    )
    snr_gamma: float = opt(0.0, "min-SNR-gamma loss weighting of the UNet phase (0 = off)")
    weak_steps: int = opt(
        0, "also keep the model at this UNet step as OUTPUT_DIR/weak-model (autoguidance; 0 = off)"
    )
    export: str = opt("", "also write the shipped form (UNet and VAE in fp16) to this folder")
    export_text_fp16: bool = opt(
        False, "--export also stores the text encoder's weights in fp16 (it still loads as fp32)"
    )
    checkpoint_every: int = opt(200, "steps between checkpoints")
    seed: int = opt(0, "random seed")
    device: str = opt("auto", "auto, cpu, cuda")
    resume: bool = opt(False, "continue an interrupted pretraining run")
    overwrite: bool = opt(False, "replace an existing run folder")

    # settings that a resumed run may change (the rest must be as saved)
    RESUMABLE_CHANGES = (
        "output_dir",
        "recipe",
        "unet_steps",
        "weak_steps",
        "export",
        "export_text_fp16",
        "checkpoint_every",
        "device",
        "resume",
        "overwrite",
    )
    RECIPES = {
        "v2": {},
        "v3": {
            "unet_channels": "48,96,96",
            "vae_channels": "32,64",
            "vae_steps": 2000,
            "vae_cosine": True,
            "vae_batch_size": 32,
            "unet_steps": 6000,
            "ema_decay": 0.999,
            "snr_gamma": 5.0,
            "weak_steps": 1000,
            "export_text_fp16": True,
        },
    }

    def resolved(self) -> PretrainConfig:
        """The recipe's settings, except where a setting was given explicitly (not at its default)."""
        preset = self.RECIPES[self.recipe]
        return replace(
            self, **{k: v for k, v in preset.items() if getattr(self, k) == getattr(type(self), k)}
        )

    def widths(self, name: str) -> tuple[int, ...]:
        """``unet_channels`` / ``vae_channels`` as integers."""
        try:
            out = tuple(int(x) for x in getattr(self, name).split(","))
        except ValueError:
            out = ()
        if not out or min(out) < 8 or any(w % 8 for w in out):
            raise SelfNPOError(f"--{name.replace('_', '-')} must be comma-separated multiples of 8")
        return out

    def validate(self) -> PretrainConfig:
        self.widths("unet_channels")
        self.widths("vae_channels")
        steps = (self.vae_steps, self.text_steps, self.unet_steps)
        if min(steps) < 1 or min(self.batch_size, self.vae_batch_size, self.text_batch_size) < 1:
            raise SelfNPOError("step counts and batch sizes must be >= 1")
        if not all(0 < lr < 1 for lr in (self.vae_lr, self.text_lr, self.unet_lr)):
            raise SelfNPOError("learning rates must be in (0, 1)")
        if not 0.0 <= self.ema_decay < 1.0:
            raise SelfNPOError("--ema-decay must be in [0, 1)")
        if not 0.0 <= self.snr_gamma < float("inf"):
            raise SelfNPOError("--snr-gamma must be a finite number >= 0")
        if self.resume and self.overwrite:
            raise SelfNPOError("--resume and --overwrite exclude each other")
        if self.checkpoint_every < 1:
            raise SelfNPOError("--checkpoint-every must be >= 1")
        if not 0 <= self.seed < 2**32:
            raise SelfNPOError("--seed must be in 0..4294967295")
        if not 0 <= self.caption_dropout <= 1:
            raise SelfNPOError("--caption-dropout must be in [0, 1]")
        return self


def build_world_pipeline(
    tokenizer_dir: Path,
    seed: int = 0,
    unet_channels: tuple[int, ...] = (32, 64, 64),
    vae_channels: tuple[int, ...] = (16, 32),
):
    """The untrained world pipeline (cross-attention at every UNet level)."""
    from ..models.tiny import build_tiny_pipeline

    return build_tiny_pipeline(
        "sd",
        tokenizer_dir,
        sample_size=16,
        channels=unet_channels,
        text_hidden=TEXT_HIDDEN,
        vae_channels=vae_channels,
        seed=seed,
        text_layers=TEXT_LAYERS,
        text_heads=TEXT_HEADS,
        attention_heads=UNET_HEADS,
        cross_attention_everywhere=True,
    )


def _resumable(ck: Path, params: list, opt_, g: torch.Generator) -> int:
    """Restore ``params``, optimiser and generator from the newest checkpoint in ``ck``; its step."""
    state = load_latest(ck)
    if state is None:
        return 0
    tensors, meta = state
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(tensors[f"p.{i}"])
    optimizer_from_flat(opt_, tensors, meta["optimizer"])
    g.set_state(tensors["rng"])
    return int(meta["step"])


def _save_phase(ck: Path, step: int, params: list, opt_, g: torch.Generator, loss: Tensor) -> None:
    t, js = optimizer_to_flat(opt_)
    t.update({f"p.{i}": p for i, p in enumerate(params)}, rng=g.get_state())
    save_checkpoint(ck, step, t, {"optimizer": js, "loss": float(loss.detach())}, keep=2)


def _vae_loss(vae, x: Tensor, g: torch.Generator) -> Tensor:
    post = vae.encode(x).latent_dist
    z = post.mean + post.std * torch.randn(post.mean.shape, generator=g, device=g.device)
    rec = vae.decode(z).sample
    return (rec - x).abs().mean() + ((rec - x) ** 2).mean() + 1e-6 * post.kl().mean()


def train_vae(pipe, cfg: PretrainConfig, run: Path, progress: bool) -> None:
    """Phase 1: the autoencoder (checkpointed; a resumed run continues exactly)."""
    from tqdm.auto import tqdm

    vae = pipe.vae.train()
    params = list(vae.parameters())
    opt_ = torch.optim.AdamW(params, lr=cfg.vae_lr, weight_decay=0.0)
    g = torch.Generator(vae.device).manual_seed(cfg.seed)
    ck = run / "vae"
    start = _resumable(ck, params, opt_, g)
    for step in tqdm(
        range(start, cfg.vae_steps),
        initial=start,
        total=cfg.vae_steps,
        desc="autoencoder",
        disable=not progress,
    ):
        seed = int(torch.randint(2**62, (1,), generator=g, device=g.device).item())
        _, images = world_batch(np.random.default_rng(seed), cfg.vae_batch_size, "any")
        loss = _vae_loss(vae, images_to_unit(images).to(vae.device), g)
        if cfg.vae_cosine:
            for group in opt_.param_groups:
                group["lr"] = cfg.vae_lr * 0.5 * (1.0 + math.cos(math.pi * step / cfg.vae_steps))
        opt_.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt_.step()
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.vae_steps:
            _save_phase(ck, step + 1, params, opt_, g, loss)
    vae.eval()


# What a caption states, slot by slot; the last class of each slot means "unstated" (or "no
# second object"), except for the object count.
_UNSTATED = "-"
LABEL_SLOTS: tuple[tuple[str, tuple[str, ...]], ...] = tuple(
    (f"{attr}{i}", (*values, _UNSTATED))
    for i in (0, 1)
    for attr, values in (("shape", SHAPES), ("colour", COLOURS), ("size", SIZES), ("position", POSITIONS))
) + (
    ("relation", (*RELATIONS, _UNSTATED)),
    ("background", (*BACKGROUNDS, _UNSTATED)),
    ("texture", (*TEXTURES, _UNSTATED)),
    ("count", ("1", "2")),
)


def label_targets(labels: CaptionLabels) -> list[int]:
    """Class index of every slot of ``LABEL_SLOTS`` for one caption's labels."""
    values: dict[str, str | None] = {
        "relation": labels.relation,
        "background": labels.background,
        "texture": labels.texture,
        "count": str(len(labels.objects)),
    }
    for i in (0, 1):
        o = labels.objects[i] if i < len(labels.objects) else None
        for attr in ("shape", "colour", "size", "position"):
            values[f"{attr}{i}"] = getattr(o, attr) if o is not None else None
    return [classes.index(values[name] or _UNSTATED) for name, classes in LABEL_SLOTS]


class LabelReadout(torch.nn.Module):
    """One learned attention query per slot over the token states, then a linear classifier.

    Deliberately weak (linear given the pooled state), so that the text encoder's own token
    states must carry each attribute in a form attention can pick out, as the UNet's does.
    """

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.queries = torch.nn.Parameter(torch.randn(len(LABEL_SLOTS), hidden) / hidden**0.5)
        self.key = torch.nn.Linear(hidden, hidden)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(hidden, len(c)) for _, c in LABEL_SLOTS)

    def forward(self, states: Tensor) -> list[Tensor]:
        """Token states ``[B, L, H]`` -> logits of every slot."""
        att = torch.einsum("sh,blh->bsl", self.queries, self.key(states)) / states.shape[-1] ** 0.5
        pooled = torch.einsum("bsl,blh->bsh", att.softmax(-1), states)
        return [head(pooled[:, k]) for k, head in enumerate(self.heads)]


def caption_batch(rng: np.random.Generator, n: int, split: str = "train") -> tuple[list[str], Tensor]:
    """``n`` fresh captions of ``split`` and their slot targets ``[n, len(LABEL_SLOTS)]``."""
    pairs = [caption_with_labels(sample_scene(rng, split), rng) for _ in range(n)]
    targets = torch.tensor([label_targets(lab) for _, lab in pairs])
    return [c for c, _ in pairs], targets


def _token_states(pipe, captions: list[str]) -> Tensor:
    """The text encoder's output as the pipeline computes it (padded to 77, no attention mask).

    Padding is done here, not by the tokenizer, whose padding settings would otherwise stick
    and be saved with the pipeline.
    """
    tok = pipe.tokenizer
    n = tok.model_max_length
    ids = [tok(c)["input_ids"][:n] for c in captions]
    ids = torch.tensor([i + [tok.pad_token_id] * (n - len(i)) for i in ids], device=pipe.text_encoder.device)
    return pipe.text_encoder(ids)[0]


def train_text_encoder(pipe, cfg: PretrainConfig, run: Path, progress: bool) -> dict[str, float]:
    """Phase 2: teach the text encoder what captions state, then freeze it; held-out slot accuracy."""
    from tqdm.auto import tqdm

    te = pipe.text_encoder.train()
    torch.manual_seed(cfg.seed + 3)
    readout = LabelReadout(te.config.hidden_size).to(te.device)
    params = list(te.parameters()) + list(readout.parameters())
    opt_ = torch.optim.AdamW(params, lr=cfg.text_lr, weight_decay=0.01)
    g = torch.Generator(te.device).manual_seed(cfg.seed + 2)
    ck = run / "text"
    start = _resumable(ck, params, opt_, g)
    for step in tqdm(
        range(start, cfg.text_steps),
        initial=start,
        total=cfg.text_steps,
        desc="text encoder",
        disable=not progress,
    ):
        seed = int(torch.randint(2**62, (1,), generator=g, device=g.device).item())
        caps, targets = caption_batch(np.random.default_rng(seed), cfg.text_batch_size)
        logits = readout(_token_states(pipe, caps))
        targets = targets.to(te.device)
        loss = sum(torch.nn.functional.cross_entropy(lg, targets[:, k]) for k, lg in enumerate(logits))
        opt_.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt_.step()
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.text_steps:
            _save_phase(ck, step + 1, params, opt_, g, loss)
    te.eval().requires_grad_(False)
    with torch.no_grad():
        caps, targets = caption_batch(np.random.default_rng(cfg.seed + 4), 512, "heldout")
        logits = readout(_token_states(pipe, caps))
    acc = {
        name: float((lg.argmax(-1).cpu() == targets[:, k]).float().mean())
        for k, (lg, (name, _)) in enumerate(zip(logits, LABEL_SLOTS, strict=True))
    }
    atomic_write_text(ck / "heldout_accuracy.json", json.dumps(acc, indent=2))
    return acc


@torch.no_grad()
def set_latent_scale(pipe, seed: int) -> float:
    """Scale latents to unit variance, as SD's ``scaling_factor`` does (computed on 512 renders)."""
    _, images = world_batch(np.random.default_rng(seed), 512, "any")
    lat = pipe.vae.encode(images_to_unit(images).to(pipe.vae.device)).latent_dist.mean
    scale = float(1.0 / lat.std())
    pipe.vae.register_to_config(scaling_factor=scale)
    return scale


def _prepare(cfg: PretrainConfig) -> Path:
    run = Path(cfg.output_dir)
    prepare_output(
        run,
        "pretrain",
        asdict(cfg),
        config_file="pretrain_config.json",
        may_change=PretrainConfig.RESUMABLE_CHANGES,
        defaults=PretrainConfig,
        overwrite=cfg.overwrite,
        resume=cfg.resume,
        legacy=lambda r: (r / "pretrain_config.json").is_file(),  # run folders of earlier versions
    )
    return run


def pretrain(cfg: PretrainConfig, progress: bool = True) -> Path:
    """All three phases; returns the finished diffusers folder ``OUTPUT_DIR/unet/model``."""
    from ..models.loading import load_pipeline, pick_device
    from ..models.sd import DiffusionModel
    from ..models.tiny import write_clip_vocab
    from ..training.config import TrainConfig
    from ..training.loop import train

    cfg = cfg.validate().resolved()
    run = _prepare(cfg)
    dev = pick_device(cfg.device)
    base = run / "base"
    if not (base / "model_index.json").is_file():
        tok = write_clip_vocab(run / "tokenizer")
        widths = cfg.widths("unet_channels"), cfg.widths("vae_channels")
        pipe = build_world_pipeline(tok, cfg.seed, *widths).to(dev)
        train_vae(pipe, cfg, run, progress)
        set_latent_scale(pipe, cfg.seed + 1)
        _record_reconstruction(pipe, run / "vae" / "reconstruction.json", cfg.seed + 5)
        train_text_encoder(pipe, cfg, run, progress)
        with atomic_dir(base) as tmp:
            pipe.save_pretrained(tmp)
    prompts = run / "train_prompts.txt"
    if not prompts.is_file():
        atomic_write_text(prompts, "\n".join(world_prompts(1000, "train", cfg.seed)) + "\n")
    weak = run / "weak-model"
    segments = [cfg.unet_steps]
    if 0 < cfg.weak_steps < cfg.unet_steps and not weak.is_dir() and _unet_step(run) < cfg.weak_steps:
        segments.insert(0, cfg.weak_steps)
    for steps in segments:  # a resumed run ends bit-identical to one uninterrupted run
        tc = TrainConfig(
            model=str(base),
            prompts=str(prompts),
            output_dir=str(run / "unet"),
            objective="diffusion",
            train="full",
            teacher="ema" if cfg.ema_decay > 0 else "frozen",
            ema_decay=cfg.ema_decay,
            snr_gamma=cfg.snr_gamma,
            lr=cfg.unet_lr,
            weight_decay=0.0,
            steps=steps,
            batch_size=cfg.batch_size,
            caption_dropout=cfg.caption_dropout,
            checkpoint_every=cfg.checkpoint_every,
            seed=cfg.seed,
            device=cfg.device,
            save_model=True,
            resume=(run / "unet" / "config.json").is_file(),
            log_every=50,
        )
        pipe = load_pipeline(str(base), device=cfg.device, dtype="fp32")
        train(tc, progress=progress, source=WorldSource(DiffusionModel(pipe)), pipe=pipe)
        if steps == cfg.weak_steps:
            _finish(run, cfg, weak)
    model = _finish(run, cfg, run / "model")
    if cfg.export:
        export_model(model, Path(cfg.export), text_fp16=cfg.export_text_fp16)
    return model


def _finish(run: Path, cfg: PretrainConfig, dest: Path) -> Path:
    """The finished pipeline: the EMA weights, or (without EMA) the last weights the loop saved."""
    if cfg.ema_decay > 0:
        return export_ema(run, dest)
    with atomic_dir(dest) as tmp:
        shutil.copytree(run / "unet" / "model", tmp, dirs_exist_ok=True)
    return dest


def _unet_step(run: Path) -> int:
    """Step of the newest UNet checkpoint of a pretraining run (0 if none)."""
    from ..training.checkpoint import list_checkpoints

    ckpts = list_checkpoints(run / "unet")
    return int(ckpts[-1].name.split("-")[-1]) if ckpts else 0


def ema_pipeline(run: Path, device: str = "cpu"):
    """The pipeline of a pretraining run with the UNet's EMA weights from its newest checkpoint."""
    from ..models.loading import load_pipeline

    pipe = load_pipeline(str(run / "base"), device=device, dtype="fp32")
    state = load_latest(run / "unet")
    if state is None:
        raise SelfNPOError(f"{run}: no UNet checkpoint yet")
    tensors, meta = state
    with torch.no_grad():
        for i, p in enumerate(pipe.unet.parameters()):
            p.copy_(tensors[f"teacher.{i}"])
    return pipe


def export_ema(run: Path, dest: Path) -> Path:
    """Write the EMA pipeline of ``run``'s newest UNet checkpoint to ``dest`` (fp32 diffusers folder)."""
    pipe = ema_pipeline(run)
    with atomic_dir(dest) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return dest


@torch.no_grad()
def _record_reconstruction(pipe, path: Path, seed: int) -> None:
    """Classifier alignment and per-attribute accuracy on 256 autoencoder round trips."""
    from .classifier import alignment, load_classifier, scene_accuracy

    rng = np.random.default_rng(seed)
    images, scenes = render_batch(rng, 256, "any")
    caps = [caption(sc, rng) for sc in scenes]
    x = images_to_unit(images).to(pipe.vae.device)
    rec = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample.clamp(-1, 1).cpu()
    clf = load_classifier()
    out = {"alignment": float(alignment(clf, rec, caps).float().mean())}
    out.update({k: float(v) for k, v in scene_accuracy(clf, rec, scenes).items()})
    atomic_write_text(path, json.dumps(out, indent=2))


def export_model(model_dir: Path, dest: Path, text_fp16: bool = False) -> None:
    """Copy a trained pipeline with the UNet and VAE stored in fp16 (the form shipped in the package).

    A plain ``from_pretrained(folder)`` must give one dtype throughout. transformers loads a model
    in the dtype its config names, so with ``text_fp16`` the text encoder's weights are stored in
    fp16 (half the size: its token table is most of the package) under a config that says float32;
    otherwise they stay fp32.
    """
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        str(model_dir), safety_checker=None, requires_safety_checker=False
    )
    pipe.unet.to(torch.float16)
    pipe.vae.to(torch.float16)
    if text_fp16:
        pipe.text_encoder.to(torch.float16)
    with atomic_dir(dest) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if text_fp16:
            path = Path(tmp) / "text_encoder" / "config.json"
            conf = json.loads(path.read_text())
            conf["dtype"] = "float32"
            if "torch_dtype" in conf:
                conf["torch_dtype"] = "float32"
            atomic_write_text(path, json.dumps(conf, indent=2) + "\n")
