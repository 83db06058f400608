"""Noise schedules: small objects of pure functions, in the style of flow_matching's schedulers.

Forward process (docs/notation.md): ``x_t = alpha_t * x_0 + sigma_t * eps``. Both kinds index
time by the scheduler's training level ``t`` in ``0..T-1`` (larger is noisier), so objectives draw,
step and grid ``t`` the same way for every model; each schedule answers ``alpha_t``, ``sigma_t`` and
the time the network itself takes for that level, and holds no state that sampling changes.

- :class:`VPSchedule`: variance-preserving, ``alpha_t = sqrt(alphas_cumprod[t])``,
  ``sigma_t = sqrt(1 - alphas_cumprod[t])``; the network takes ``t``; predicts eps, v or x0.
- :class:`FlowSchedule`: rectified flow, ``alpha = 1 - sigma``; ``sigma_t`` is the time-shifted
  level of diffusers' ``FlowMatchEulerDiscreteScheduler``; the network takes the continuous time
  ``sigma_t * T``; predicts the velocity ``eps - x0``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import param


def alpha_sigma(alphas_cumprod: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """``(alpha_t, sigma_t)`` for integer timesteps ``t`` (any shape), in fp32 or better.

    Coefficients are computed in the precision of ``alphas_cumprod`` promoted to at least fp32,
    on ``t``'s device, so that fp16 networks never see fp16 schedule arithmetic.
    """
    ac = alphas_cumprod.to(device=t.device)
    if ac.dtype not in (torch.float32, torch.float64):
        ac = ac.float()
    a2 = ac[t.long()]
    return a2.sqrt(), (1.0 - a2).sqrt()


def shift_sigma(u: Tensor, shift: float) -> Tensor:
    """SD3's time shift ``sigma = shift * u / (1 + (shift - 1) * u)`` of a level ``u`` in [0, 1]."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def nsr(alpha: Tensor, sigma: Tensor) -> Tensor:
    """Noise-to-signal ratio ``sigma_t / alpha_t``; strictly increasing in ``t``."""
    return sigma / alpha


def ddim_grid(num_steps: int, num_train_timesteps: int = 1000) -> Tensor:
    """Ascending 'trailing' DDIM grid, e.g. 25 steps of 1000 -> ``[39, 79, ..., 999]``."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"grid steps must be in 1..{num_train_timesteps}, got {num_steps}")
    stride = num_train_timesteps / num_steps
    return (torch.arange(1, num_steps + 1, dtype=torch.float64) * stride).round().long() - 1


def expand_like(c: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample coefficient ``[B]`` to broadcast against ``x`` ``[B, ...]``."""
    return c.reshape(c.shape + (1,) * (x.ndim - c.ndim))


class Schedule:
    """What both kinds share: coefficients against a tensor and conversions of the network output.

    Subclasses define ``prediction_type``, ``num_train_timesteps``, :meth:`alpha_sigma` and
    :meth:`network_time`.
    """

    prediction_type: str
    num_train_timesteps: int

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def network_time(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    @property
    def t_max(self) -> int:
        """The noisiest training level, ``T - 1``."""
        return self.num_train_timesteps - 1

    def coeffs(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """``alpha_t, sigma_t`` (``t``: ``[B]``) broadcast against ``like`` and in its dtype."""
        a, s = self.alpha_sigma(t.to(like.device))
        return expand_like(a, like).to(like.dtype), expand_like(s, like).to(like.dtype)

    def to_x0(self, pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Network output at level ``t`` -> Tweedie estimate of x0 (Self-NPO eq. 12)."""
        a, s = self.coeffs(t, x_t)
        return param.to_x0(pred, x_t, a, s, self.prediction_type)

    def to_eps(self, pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Network output at level ``t`` -> eps estimate."""
        a, s = self.coeffs(t, x_t)
        return param.to_eps(pred, x_t, a, s, self.prediction_type)

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """Regression target of plain diffusion training at level ``t``, in the network's space."""
        a, s = self.coeffs(t, x0)
        return param.target_for(x0, eps, a, s, self.prediction_type)


@dataclass(frozen=True, eq=False)
class VPSchedule(Schedule):
    """Variance-preserving schedule over ``alphas_cumprod`` ``[T]`` (DDPM/DDIM/Euler schedulers).

    ``prediction_type``: ``epsilon``, ``v_prediction`` or ``sample`` (diffusers' names).
    """

    alphas_cumprod: Tensor
    prediction_type: str = "epsilon"

    def __post_init__(self) -> None:
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r} for a VP schedule")

    @property
    def num_train_timesteps(self) -> int:  # type: ignore[override]
        return int(self.alphas_cumprod.shape[0])

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``sqrt(alphas_cumprod[t]), sqrt(1 - alphas_cumprod[t])``."""
        return alpha_sigma(self.alphas_cumprod, t)

    def network_time(self, t: Tensor) -> Tensor:
        """UNets take the integer level itself."""
        return t


@dataclass(frozen=True, eq=False)
class FlowSchedule(Schedule):
    """Rectified flow ``x_t = (1 - sigma_t) x0 + sigma_t eps`` with velocity target ``eps - x0``.

    ``sigma_t = shift_sigma((t + 1) / T, shift)``: level ``t`` is diffusers'
    ``FlowMatchEulerDiscreteScheduler`` training level (``sigmas[T - 1 - t]`` of a fresh scheduler),
    so ``t = T - 1`` is pure noise (``alpha = 0``). :meth:`sigma_at` gives the same for a continuous
    ``u`` in [0, 1].
    """

    num_train_timesteps: int = 1000
    shift: float = 1.0
    prediction_type: str = "flow"

    def sigma_at(self, u: Tensor) -> Tensor:
        """``sigma`` at continuous time ``u`` in [0, 1] (float64)."""
        return shift_sigma(u.double(), float(self.shift))

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(1 - sigma_t, sigma_t)`` for integer levels ``t``, in float64."""
        s = self.sigma_at((t.double() + 1.0) / self.num_train_timesteps)
        return 1.0 - s, s

    def network_time(self, t: Tensor) -> Tensor:
        """Flow transformers (SD3, ...) take ``sigma_t * T`` as a float, as their pipelines pass it."""
        return (self.alpha_sigma(t)[1] * self.num_train_timesteps).float()


def dynamic_shift(scheduler, image_seq_len: int) -> float:
    """The time shift a resolution-dependent flow scheduler applies at ``image_seq_len`` tokens.

    Flux's pipeline sets ``mu`` linearly in the packed image sequence length (``calculate_shift``
    between ``base_image_seq_len`` and ``max_image_seq_len``); the scheduler's exponential shift
    ``e^mu / (e^mu + (1/u - 1))`` is then :func:`shift_sigma` with ``shift = e^mu`` (``mu`` itself
    for ``time_shift_type="linear"``).
    """
    import math

    cfg = scheduler.config
    lo, hi = int(cfg.get("base_image_seq_len", 256)), int(cfg.get("max_image_seq_len", 4096))
    b_lo, b_hi = float(cfg.get("base_shift", 0.5)), float(cfg.get("max_shift", 1.15))
    mu = b_lo + (b_hi - b_lo) * (image_seq_len - lo) / (hi - lo)
    return mu if cfg.get("time_shift_type", "exponential") == "linear" else math.exp(mu)


def schedule_for(scheduler, image_seq_len: int | None = None) -> Schedule:
    """The training schedule of a diffusers scheduler (read from its config, never its sampling state).

    Flow schedulers: ``FlowMatch*`` (``shift``; with ``use_dynamic_shifting`` the shift of
    ``image_seq_len`` tokens, :func:`dynamic_shift`) and multistep solvers run on flow sigmas
    (``use_flow_sigmas``, ``flow_shift``: Wan's UniPC). Everything else is VP over ``alphas_cumprod``.
    """
    name = type(scheduler).__name__
    cfg = scheduler.config
    T = int(cfg.get("num_train_timesteps", 1000))
    if cfg.get("shift_terminal"):
        raise ValueError(f"{name} with shift_terminal (stretched terminal sigmas) is not supported")
    if name.startswith("FlowMatch"):
        if cfg.get("use_dynamic_shifting", False):
            if image_seq_len is None:
                raise ValueError(
                    f"{name} with resolution-dependent (dynamic) time shift needs the image size"
                )
            return FlowSchedule(T, dynamic_shift(scheduler, image_seq_len))
        return FlowSchedule(T, float(cfg.get("shift", 1.0)))
    if cfg.get("use_flow_sigmas", False) or cfg.get("prediction_type") == "flow_prediction":
        if cfg.get("use_dynamic_shifting", False):
            raise ValueError(f"{name} with dynamic shifting on flow sigmas is not supported")
        return FlowSchedule(T, float(cfg.get("flow_shift", 1.0)))
    ac = getattr(scheduler, "alphas_cumprod", None)
    if ac is None:
        raise ValueError(f"scheduler {name} has neither alphas_cumprod nor a flow-matching schedule")
    return VPSchedule(ac.double().clone(), cfg.get("prediction_type", "epsilon"))
