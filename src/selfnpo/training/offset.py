"""The trained offset (student) and its teacher, as LoRA adapters or full weights.

LoRA: the student and the EMA teacher are two adapters of the same UNet, so no second copy of
the network exists; the teacher pass sets the student's scale to 0 and the student pass sets the
teacher's to 0. The EMA is taken over the LoRA factors. ``teacher = frozen`` is the EMA with
decay 1 (the teacher adapter stays at its initial value, which is the base model since LoRA's
B starts at zero). Full weights: the teacher is a separate copy (the authors' set-up) and the
offset is ``student - base``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor, nn

from ..conditioning import Cond
from ..errors import SelfNPOError
from ..models.sd import DiffusionModel
from ..objectives.base import get_spec
from ..offsets import activate_adapters, adapter_scales, is_adapter_param, save_full_delta, save_lora

STUDENT, TEACHER = "selfnpo_student", "selfnpo_teacher"


class TrainableOffset:
    """Owns which parameters train, how the student and teacher predict, and how the offset is saved."""

    def __init__(self, model: DiffusionModel, cfg) -> None:
        self.model, self.cfg = model, cfg
        self.mode = cfg.train
        frozen = cfg.teacher == "frozen" or get_spec(cfg.objective).reference
        self.decay = 1.0 if frozen else cfg.ema_decay
        unet = model.unet
        unet.requires_grad_(False)
        if self.mode == "lora":
            self._setup_lora(unet)
        else:
            self.teacher_net = copy.deepcopy(unet).requires_grad_(False).eval()
            # the offset is student - base; a frozen teacher *is* the base, so no third copy
            self.base = (
                None
                if self.decay >= 1.0
                else {k: v.detach().cpu().clone() for k, v in unet.state_dict().items()}
            )
            # all base weights train; adapters the user loaded (a style LoRA) stay as they are
            for n, prm in unet.named_parameters():
                prm.requires_grad_(not is_adapter_param(n))
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()  # diffusers checkpoints gradients only in training mode; SD UNets have no dropout
        # what the student's passes run through: the UNet, or the wrapper accelerate puts around
        # it for several processes (set by the training loop); ``model.unet`` stays the UNet
        self.net: nn.Module = unet
        self.params = [p for p in unet.parameters() if p.requires_grad]
        self._pairs = self._ema_pairs()

    def _setup_lora(self, unet: nn.Module) -> None:
        from peft import LoraConfig

        targets = [t.strip() for t in self.cfg.lora_targets.split(",") if t.strip()]
        alpha = self.cfg.lora_alpha or float(self.cfg.lora_rank)
        lc = LoraConfig(
            r=self.cfg.lora_rank,
            lora_alpha=alpha,
            init_lora_weights="gaussian",
            target_modules=targets,
        )
        if not targets:
            raise SelfNPOError("--lora-targets must name at least one UNet module")
        try:
            unet.add_adapter(lc, adapter_name=STUDENT)
        except (ValueError, KeyError, TypeError) as e:
            msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise SelfNPOError(
                f"--lora-targets {self.cfg.lora_targets!r} does not fit this UNet ({msg})"
            ) from None
        unet.add_adapter(copy.deepcopy(lc), adapter_name=TEACHER)
        activate_adapters(unet, [STUDENT, TEACHER])
        for n, p in unet.named_parameters():
            p.requires_grad_(f".{STUDENT}." in n)
        named = dict(unet.named_parameters())
        with torch.no_grad():
            for n, p in named.items():
                if f".{STUDENT}." in n:
                    named[n.replace(f".{STUDENT}.", f".{TEACHER}.")].copy_(p)

    def _ema_pairs(self) -> list[tuple[Tensor, Tensor]]:
        unet = self.model.unet
        if self.mode == "lora":
            named = dict(unet.named_parameters())
            return [
                (named[n.replace(f".{STUDENT}.", f".{TEACHER}.")], p)
                for n, p in named.items()
                if f".{STUDENT}." in n
            ]
        return list(zip(self.teacher_net.parameters(), unet.parameters(), strict=True))

    # ---- predictions -------------------------------------------------------------------------
    def student(self, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
        if self.mode == "lora":
            with adapter_scales(self.model.unet, {TEACHER: 0.0}):
                return self.model.predict(x, t, cond, unet=self.net)
        return self.model.predict(x, t, cond, unet=self.net)

    @torch.no_grad()
    def teacher(self, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
        if self.mode == "lora":
            with adapter_scales(self.model.unet, {STUDENT: 0.0}):
                return self.model.predict(x, t, cond, unet=_teacher_net(self.net))
        return self.model.predict(x, t, cond, unet=self.teacher_net)

    @torch.no_grad()
    def update_teacher(self) -> None:
        """``teacher <- decay * teacher + (1 - decay) * student``."""
        if self.decay >= 1.0:
            return
        for tp, sp in self._pairs:
            tp.lerp_(sp.detach().to(tp.dtype), 1.0 - self.decay)

    def sq_norm(self) -> Tensor:
        """``||W - W_0||^2`` of the trained offset, differentiable (R0 eq. 3.3).

        LoRA: the sum over layers of ``||scale * B @ A||_F^2`` of the student adapter, computed
        as ``scale^2 * sum((B^T B) * (A A^T))`` (rank-sized matrices). Full weights: the sum of
        ``(p - base)^2``; a frozen teacher is the base.
        """
        from ..offsets import lora_layers

        unet = getattr(self.model.unet, "module", self.model.unet)  # unwrap a DDP wrapper
        total = torch.zeros((), device=self.model.device)
        if self.mode == "lora":
            for layer in lora_layers(unet, STUDENT):
                a = layer.lora_A[STUDENT].weight.flatten(1).float()  # [r, in * k * k]
                b = layer.lora_B[STUDENT].weight.flatten(1).float()  # [out, r]
                total = total + layer.scaling[STUDENT] ** 2 * ((b.T @ b) * (a @ a.T)).sum()
            return total
        if self.base is None:
            pairs = zip(unet.parameters(), self.teacher_net.parameters(), strict=True)
        else:
            pairs = ((p, self.base[n]) for n, p in unet.named_parameters())
        for p, base in pairs:
            total = total + ((p.float() - base.to(p.device, torch.float32)) ** 2).sum()
        return total

    # ---- state ---------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, Tensor]:
        out = {f"student.{i}": p for i, p in enumerate(self.params)}
        if self.decay < 1.0:
            out.update({f"teacher.{i}": tp for i, (tp, _) in enumerate(self._pairs)})
        return out

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        for i, p in enumerate(self.params):
            p.copy_(tensors[f"student.{i}"])
        if self.decay < 1.0:
            for i, (tp, _) in enumerate(self._pairs):
                tp.copy_(tensors[f"teacher.{i}"])

    def save(self, out_dir: Path, meta: dict) -> Path:
        """Write the negative offset: a diffusers LoRA folder, or ``full_delta.safetensors``."""
        unet = self.model.unet
        if self.mode == "lora":
            return save_lora(self.model.pipe, unet, STUDENT, out_dir, meta)
        cur = unet.state_dict()
        base = self.base if self.base is not None else self.teacher_net.state_dict()
        # saved under the plain model's names (peft renames a LoRA-carrying layer's weights), so
        # the offset applies with or without adapters loaded; loaded adapters are not part of it
        delta = {
            k.replace(".base_layer.", "."): cur[k].detach().cpu().float() - base[k].cpu().float()
            for k in base
            if cur[k].is_floating_point() and not is_adapter_param(k)
        }
        path = Path(out_dir) / "full_delta.safetensors"
        save_full_delta(path, delta, meta)
        return path


def _teacher_net(net: nn.Module) -> nn.Module:
    """The network for no-grad teacher passes: past a DDP wrapper (its weights are whole in every
    process, and a pass that is never backpropagated needs neither its gradient sync nor its
    per-call hooks); any other wrapper (FSDP, DeepSpeed) is kept, since its forward gathers
    sharded weights."""
    from torch.nn.parallel import DistributedDataParallel

    return net.module if isinstance(net, DistributedDataParallel) else net
