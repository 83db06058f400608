"""A guidance rule of :mod:`selfnpo.guidance_rules`, bound to a pipeline's network output space.

:class:`NPOGuidance` hands the rule the raw outputs of the negative and positive branch (eps, v or
x0, as the scheduler's ``prediction_type`` says), the timestep and the noisy input ``x_t``. Each
rule runs in the space its paper defines it in, and the result is converted back:

| rule | space |
|---|---|
| ``cfg``, ``guidance_interval`` | the network's own output (both are affine, so any space gives the same) |
| ``cfg_rescale`` | the network's own output, as diffusers' ``guidance_rescale`` does |
| ``apg`` | the denoised estimate x0 (Sadat et al., Algorithm 1) |
| ``cfg_zero_star`` | the flow velocity ``eps - x0`` of the same point (Fan et al. define it on flows) |

``x_t`` is the UNet input, which is the variance-preserving state ``alpha_t x0 + sigma_t eps`` for
every diffusers SD scheduler (Euler-type schedulers scale their state back before the UNet).
The interval's bounds are on the noise level ``sigma_t / alpha_t`` (EDM's sigma, the paper's clock).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import guidance_rules
from ..param import to_eps, to_x0
from ..schedules import alpha_sigma

# rule -> (function, argument names in positional order, defaults)
RULES: dict[str, tuple[str, tuple[str, ...], tuple[float, ...]]] = {
    "cfg": ("cfg", (), ()),
    "cfg_rescale": ("cfg_rescale", ("phi",), (0.7,)),
    "interval": ("guidance_interval", ("t_lo", "t_hi"), (0.28, 5.42)),
    "apg": ("apg", ("eta", "norm_threshold", "momentum"), (0.0, 0.0, 0.0)),
    "cfg_zero_star": ("cfg_zero_star", ("zero_init_steps", "use_optimized_scale"), (1, 1)),
}


def _wide(device: torch.device) -> torch.dtype:
    """Conversions run in float64 (MPS has none: float32 there)."""
    return torch.float32 if device.type == "mps" else torch.float64


class RuleHook:
    """``hook(uncond, cond, timestep, g, x_t) -> guided``, the ``rule=`` of :class:`NPOGuidance`.

    Holds the per-image state a rule needs across steps (APG's running average, CFG-Zero*'s step
    count); :meth:`reset` starts a new generation. A timestep larger than the previous one also
    starts one, since timesteps only decrease within a generation.
    """

    def __init__(self, name: str, args: dict, scheduler) -> None:
        if name not in RULES:
            raise ValueError(f"unknown rule {name!r}")
        self.name, self.args = name, dict(args)
        self.fn = getattr(guidance_rules, RULES[name][0])
        self.prediction_type = scheduler.config.get("prediction_type", "epsilon")
        self.alphas_cumprod = scheduler.alphas_cumprod
        self.reset()

    def reset(self) -> None:
        self.step, self.running, self.last_t = 0, None, None

    def _coefficients(self, timestep, x: Tensor) -> tuple[Tensor, Tensor]:
        t = torch.as_tensor(timestep, device=x.device).float().round().long().reshape(-1)
        t = t.expand(x.shape[0]) if t.numel() == 1 else t
        a, s = alpha_sigma(self.alphas_cumprod, t)
        shape = (-1,) + (1,) * (x.ndim - 1)
        dt = _wide(x.device)
        return a.reshape(shape).to(dt), s.reshape(shape).to(dt)

    def __call__(self, uncond: Tensor, cond: Tensor, timestep, g: float, x_t: Tensor) -> Tensor:
        t_now = float(torch.as_tensor(timestep).float().reshape(-1)[0])
        if self.last_t is not None and t_now > self.last_t:
            self.reset()
        self.last_t = t_now
        a, s = self._coefficients(timestep, cond)
        pt, dt = self.prediction_type, _wide(cond.device)
        x = x_t.to(dt)
        if self.name == "interval":
            out = self.fn(
                uncond, cond, (s / a).reshape(-1), g, t_lo=self.args["t_lo"], t_hi=self.args["t_hi"]
            )
        elif self.name == "apg":
            u0, c0 = to_x0(uncond.to(dt), x, a, s, pt), to_x0(cond.to(dt), x, a, s, pt)
            x0, self.running = self.fn(u0, c0, None, g, running=self.running, **self.args)
            out = self._from_x0(x0, x, a, s)
        elif self.name == "cfg_zero_star":
            uv, cv = (self._velocity(p.to(dt), x, a, s) for p in (uncond, cond))
            kw = dict(step=self.step, zero_init_steps=int(self.args["zero_init_steps"]))
            v = self.fn(uv, cv, None, g, use_optimized_scale=bool(self.args["use_optimized_scale"]), **kw)
            out = self._from_x0((x - s * v) / (a + s), x, a, s)  # x0 of velocity v at x_t
        else:
            out = self.fn(uncond, cond, None, g, **self.args)
        self.step += 1
        return out.to(cond.dtype)

    def _velocity(self, pred: Tensor, x: Tensor, a: Tensor, s: Tensor) -> Tensor:
        """Flow velocity ``eps - x0`` of a prediction (the VP state rescaled to ``x_t / (a + s)``)."""
        pt = self.prediction_type
        return to_eps(pred, x, a, s, pt) - to_x0(pred, x, a, s, pt)

    def _from_x0(self, x0: Tensor, x: Tensor, a: Tensor, s: Tensor) -> Tensor:
        """The network output (eps, v or x0) whose x0 estimate at ``x_t`` is ``x0``."""
        eps = (x - a * x0) / s
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "v_prediction":
            return a * eps - s * x0
        return x0
