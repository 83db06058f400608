"""NPO guidance for an existing diffusers pipeline, without forking the pipeline.

The conditional branch runs with ``theta + eta`` and the unconditional / negative-prompt branch
with ``theta + alpha * eta + beta * delta`` (Diffusion-NPO eq. 10). diffusers' SD and SDXL
pipelines evaluate classifier-free guidance as one UNet call on ``cat([negative, positive])``;
while attached, :class:`NPOGuidance` keeps that one call and picks the LoRA adapter per sample
(peft's mixed-batch inference) where each branch is the base plus at most one LoRA offset, and
otherwise (full-weight deltas, DoRA, two offsets in one branch, other active adapters) splits
the call in two and runs each half with its own weights. Pipelines that make separate
conditional and unconditional calls (Flux's true CFG, Wan) name them through
``transformer.cache_context("cond" / "uncond")``; while attached, that method is wrapped so the
call made inside ``"uncond"`` runs with the negative weights. The user's pipeline, schedulers,
LoRAs and other components stay as they are.

Example::

    pipe = StableDiffusionPipeline.from_pretrained(...)
    with NPOGuidance(pipe, negative="runs/selfnpo/offset", beta=1.0):
        images = pipe(prompts, guidance_scale=7.5).images
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
from torch import Tensor

from .errors import SelfNPOError
from .models import check_supported
from .models.sd import denoiser_network
from .offsets import (
    BASE,
    activate_adapters,
    adapter_scales,
    all_lora_layers,
    check_lora_family,
    deactivate_adapters,
    full_delta_call,
    load_full_delta,
    mixed_batch_ready,
    offset_kind,
    per_sample_adapters,
    resolve_offset_file,
)

ETA, DELTA = "selfnpo_eta", "selfnpo_delta"


# keyword arguments that are per position, not per sample, whatever their first size
# (CogVideoX's rotary tables [positions, dim], Flux's position ids)
_UNBATCHED = ("image_rotary_emb", "txt_ids", "img_ids")


def _split(obj, n: int, half: int):
    """The ``half``-th half (0 = negative, 1 = positive) of every batch-``n`` tensor in ``obj``."""
    if isinstance(obj, Tensor) and obj.ndim > 0 and obj.shape[0] == n:
        return obj[half * (n // 2) : (half + 1) * (n // 2)]
    if isinstance(obj, Mapping):
        return {k: _split(v, n, half) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and obj and all(isinstance(v, Tensor) for v in obj):
        return type(obj)(_split(v, n, half) for v in obj)
    return obj


class NPOGuidance:
    """Attach NPO guidance to a diffusers SD/SDXL pipeline (a context manager, or attach/detach).

    Args:
        pipe: the user's pipeline; its UNet is used in place (no copy).
        negative: the negative offset delta (a diffusers LoRA file/folder or a selfnpo full delta).
        positive: an optional positive offset eta (e.g. a Diffusion-DPO LoRA), same formats.
        alpha: share of eta in the negative branch.
        beta: scale of delta in the negative branch (0 = plain CFG with theta + alpha*eta).
        rule: an optional guidance rule ``rule(uncond, cond, t, g, x_t) -> guided`` in the network's
            output space (see :mod:`selfnpo.compare.hook`); the positive half handed back to the
            pipeline is ``uncond + (guided - uncond) / g``, so the pipeline's own
            ``uncond + g (cond - uncond)`` equals ``guided`` (to float rounding).
        mode: ``"auto"`` (one batched call where it applies, else two), ``"single"`` (one call or
            an error) or ``"split"`` (always two calls). ``last_call`` tells which one ran.
    """

    def __init__(
        self,
        pipe,
        negative=None,
        positive=None,
        alpha: float = 0.0,
        beta: float = 1.0,
        rule=None,
        mode: str = "auto",
    ) -> None:
        import math

        if mode not in ("auto", "single", "split"):
            raise ValueError(f"mode must be auto, single or split, not {mode!r}")
        check_supported(pipe)
        self.pipe, self.unet = pipe, denoiser_network(pipe)
        self.alpha, self.beta = float(alpha), float(beta)
        if not (math.isfinite(self.alpha) and math.isfinite(self.beta)):
            raise SelfNPOError(f"alpha and beta must be finite numbers (got {alpha}, {beta})")
        self.rule, self.mode = rule, mode
        self.last_call: str | None = None  # "single", "split" or "plain" (identical branches)
        self._lora_layers: list | None = None
        self._full: dict[str, dict[str, Tensor]] = {}
        self._lora: list[str] = []
        self._lora_files: dict[str, str] = {}
        self._loaded = False
        self._orig = None
        self._inside = False
        self._context: str | None = None  # the cache-context name of the current call, if any
        self._orig_cache_context = None
        for name, src in ((ETA, positive), (DELTA, negative)):
            if src is not None:
                self._prepare(name, src)
        if self._lora_files:
            self._load_loras()  # fails here, not inside the user's with block, if a LoRA does not fit
            self._unload_loras()  # the pipeline is unchanged until attached

    def _prepare(self, name: str, src) -> None:
        path = resolve_offset_file(src)
        if offset_kind(path) == "full":
            delta = load_full_delta(path, self.unet)
            dev, dt = self.unet.device, self.unet.dtype
            self._full[name] = {k: v.to(dev, dt) for k, v in delta.items()}
            return
        check_lora_family(path, self.pipe)
        self._lora_files[name] = str(path)
        self._lora.append(name)

    def _load_loras(self) -> None:
        """Load the LoRA offsets as adapters of the user's UNet (inactive until attached); remembers
        what the UNet looked like so that :meth:`_unload_loras` can restore it exactly."""
        if self._loaded:
            return
        present = set(getattr(self.unet, "peft_config", None) or {})
        clash = present & set(self._lora_files)
        if clash:
            raise SelfNPOError(
                f"the pipeline already holds adapter {sorted(clash)[0]!r} (another NPOGuidance attached?)"
            )
        self._had_peft = bool(present)
        self._user_active = self._active_adapters()  # loading a LoRA may switch the user's off
        self._wrapped = set(self._user_active)
        self._loaded = True
        for name, path in self._lora_files.items():
            try:
                self.pipe.load_lora_weights(path, adapter_name=name)
            except (ValueError, KeyError, RuntimeError) as e:
                self._unload_loras()
                msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                raise SelfNPOError(f"{path}: LoRA does not fit this model ({msg})") from None
        self._check_finite()
        deactivate_adapters(self.unet, self._lora)  # active only while attached
        self._restore_active(self._user_active, [])

    def _check_finite(self) -> None:
        """Refuse a LoRA offset whose weights hold NaN or inf (it would give black images)."""
        for n, p in self.unet.named_parameters():
            name = next((a for a in self._lora if f".{a}." in n), None)
            if name is not None and not torch.isfinite(p).all():
                self._unload_loras()
                raise SelfNPOError(
                    f"{self._lora_files[name]}: the offset holds NaN or infinite weights; refusing to use it"
                )

    def _unload_loras(self) -> None:
        """Delete the adapters this object loaded and give back the layers peft wrapped for them:
        the UNet's modules, state_dict keys, and the user's own adapters (with their scales and
        active set) are as before."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        if not self._loaded:
            return
        self._loaded = False
        mine = [n for n in self._lora if n in (getattr(self.unet, "peft_config", None) or {})]
        if not self._had_peft:
            if getattr(self.unet, "peft_config", None):
                self.unet.unload_lora()
            return
        if mine:
            deactivate_adapters(self.unet, mine)
            self.unet.delete_adapters(mine)
        self._restore_active(self._user_active, mine)
        for n, m in list(self.unet.named_modules()):
            if isinstance(m, BaseTunerLayer) and n not in self._wrapped and n:
                parent, _, child = n.rpartition(".")
                setattr(self.unet.get_submodule(parent) if parent else self.unet, child, m.get_base_layer())

    def _active_adapters(self) -> dict[str, list[str]]:
        from peft.tuners.tuners_utils import BaseTunerLayer

        return {
            n: list(m.active_adapters) for n, m in self.unet.named_modules() if isinstance(m, BaseTunerLayer)
        }

    def _restore_active(self, active: dict[str, list[str]], removed: list[str]) -> None:
        """peft's delete_adapter may switch layers to another adapter; keep the user's active set."""
        from .offsets import _set_active

        for n, m in self.unet.named_modules():
            if n in active:
                want = [a for a in active[n] if a not in removed]
                if list(m.active_adapters) != want:
                    _set_active(m, want)

    # ---- the two branches ----------------------------------------------------------------------
    def branch_weights(self, negative: bool) -> dict[str, float]:
        """Coefficients of the loaded offsets in one branch: eta 1 and delta 0 in the positive
        branch, eta ``alpha`` and delta ``beta`` in the negative one."""
        w = {ETA: self.alpha, DELTA: self.beta} if negative else {ETA: 1.0, DELTA: 0.0}
        return {k: v for k, v in w.items() if k in self._lora or k in self._full}

    def _call(self, weights: dict[str, float], args, kwargs):
        lora = {k: v for k, v in weights.items() if k in self._lora}
        full = [(self._full[k], c) for k, c in weights.items() if k in self._full]
        with adapter_scales(self.unet, lora):
            self._inside = True
            try:
                return full_delta_call(self.unet, full, *args, **kwargs)
            finally:
                self._inside = False

    def _forward(self, *args, **kwargs):
        # UNets are called as (sample, timestep, ...), SD3's transformer with keywords only
        if self._inside:
            return self._orig(*args, **kwargs)
        if self._context in ("cond", "uncond"):  # one branch per call ("cond_uncond" is batched)
            return self._separate_call(args, kwargs)
        pos_w, neg_w = self.branch_weights(False), self.branch_weights(True)
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        n = sample.shape[0]
        cfg_on = self._batched_cfg() and n % 2 == 0
        cfg_on = cfg_on and kwargs.get("skip_layers") is None  # SD3's skip-layer pass: conditional only
        if not cfg_on or (pos_w == neg_w and self.rule is None):
            # identical branches: one batched call, as diffusers does
            self.last_call = "plain"
            return self._call(pos_w, args, kwargs)
        tuple_out = kwargs.get("return_dict", True) is False
        out = None
        if pos_w == neg_w:
            self.last_call = "plain"
            out = self._call(pos_w, args, kwargs)
        elif self.mode != "split":
            out = self._single_call(pos_w, neg_w, n, args, kwargs)
        if out is not None:
            neg, pos = (out[0] if tuple_out else out.sample).chunk(2)
        else:
            self.last_call = "split"
            outs = []
            for half, w in ((0, neg_w), (1, pos_w)):
                a = [_split(x, n, half) for x in args]
                kw = {k: (v if k in _UNBATCHED else _split(v, n, half)) for k, v in kwargs.items()}
                outs.append(self._call(w, a, kw))
            out = outs[0]
            neg, pos = (o[0] if tuple_out else o.sample for o in outs)
        if self.rule is not None:
            timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
            pos = self._ruled_positive(neg, pos, _split(sample, n, 1), _split(timestep, n, 1))
        both = torch.cat([neg, pos])
        return (both,) if tuple_out else type(out)(sample=both)

    def _branch_adapters(self, pos_w: dict[str, float], neg_w: dict[str, float]) -> tuple[str, str] | None:
        """``(negative, positive)`` adapter names when each branch is the base plus at most one
        LoRA offset and a mixed batch can run them; None where the call must be split."""
        if any(c != 0 for w in (pos_w, neg_w) for k, c in w.items() if k in self._full):
            return None  # full-weight deltas change the weights themselves, for the whole batch
        pick = []
        for w in (neg_w, pos_w):
            on = [k for k, c in w.items() if k in self._lora and c != 0]
            if len(on) > 1:
                return None
            pick.append(on[0] if on else BASE)
        if pick[0] == pick[1]:  # one adapter at two different scales
            return None
        if not mixed_batch_ready(self._layers(), set(pick) - {BASE}, set(self._lora)):
            return None
        return pick[0], pick[1]

    def _layers(self) -> list:
        """The UNet's LoRA layers, found once per attach (a walk over ~1,000 modules costs ~ms,
        which a GPU step would notice)."""
        if self._lora_layers is None:
            self._lora_layers = all_lora_layers(self.unet)
        return self._lora_layers

    def _single_call(self, pos_w, neg_w, n: int, args, kwargs):
        """CFG's one batched call with the negative half on its offset and the positive half on
        its own (peft's per-sample adapter selection); None where that cannot apply."""
        names = self._branch_adapters(pos_w, neg_w)
        if names is None:
            if self.mode == "single":
                raise SelfNPOError(
                    "NPO guidance cannot run as one call here (a full-weight delta, DoRA, two "
                    "offsets in one branch or other active adapters); use mode='auto'"
                )
            return None
        neg, pos = names
        scales = {k: w[k] for k, w in ((neg, neg_w), (pos, pos_w)) if k != BASE}
        per_sample = [neg] * (n // 2) + [pos] * (n // 2)
        layers = self._layers()
        with adapter_scales(layers, scales), per_sample_adapters(layers, per_sample):
            self._inside = True
            try:
                out = self._orig(*args, **kwargs)
            except ValueError:  # a LoRA layer saw another batch size than CFG's (peft checks it)
                if self.mode == "single":
                    raise
                return None
            finally:
                self._inside = False
        self.last_call = "single"
        return out

    def _batched_cfg(self) -> bool:
        """Whether the pipeline is running CFG now; pipelines without ``do_classifier_free_guidance``
        (CogVideoX) decide it as ``guidance_scale > 1``, which they keep as ``_guidance_scale``."""
        on = getattr(self.pipe, "do_classifier_free_guidance", None)
        if on is None:
            on = float(getattr(self.pipe, "_guidance_scale", None) or 1.0) > 1.0
        return bool(on)

    def _separate_call(self, args, kwargs):
        """One branch of a pipeline that calls the network once per branch: the call inside
        ``cache_context("uncond")`` gets the negative weights, any other the positive ones."""
        if self.rule is not None:
            raise SelfNPOError(
                f"guidance rules need one batched CFG call; {type(self.pipe).__name__} makes separate calls"
            )
        return self._call(self.branch_weights(self._context == "uncond"), args, kwargs)

    @contextlib.contextmanager
    def _named_call(self, name: str, **kw):
        """Stands in for ``transformer.cache_context`` while attached: records the branch name."""
        prev, self._context = self._context, name
        try:
            with self._orig_cache_context(name, **kw):
                yield
        finally:
            self._context = prev

    def _ruled_positive(self, neg: Tensor, pos: Tensor, x_t: Tensor, timestep) -> Tensor:
        """The positive half for which the pipeline's ``neg + g (pos' - neg)`` is ``rule(neg, pos)``."""
        g = float(self.pipe.guidance_scale)
        guided = self.rule(neg, pos, timestep, g, x_t)
        return (neg.float() + (guided.float() - neg.float()) / g).to(pos.dtype)

    # ---- attach / detach -------------------------------------------------------------------------
    def attach(self) -> NPOGuidance:
        if self._orig is None:
            self._load_loras()
            activate_adapters(self.unet, self._lora)
            self._lora_layers = None  # loading wrapped layers: find them again on the next call
            self._orig = self.unet.forward
            self.unet.forward = self._forward
            if hasattr(self.unet, "cache_context") and "cache_context" not in vars(self.unet):
                self._orig_cache_context = self.unet.cache_context
                self.unet.cache_context = self._named_call
        return self

    def detach(self) -> None:
        """Restore the pipeline exactly: its own forward, and no adapter or wrapped layer of ours."""
        if self._orig is not None:
            self.unet.forward = self._orig
            self._orig = None
            if self._orig_cache_context is not None:
                del self.unet.cache_context  # the class's own method again
                self._orig_cache_context = None
            deactivate_adapters(self.unet, self._lora)
            self._unload_loras()

    def __enter__(self) -> NPOGuidance:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()
