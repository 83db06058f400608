"""Schedulers for diffusers pipelines that selfnpo adds: R0's few-step generator.

Generation reuses diffusers' schedulers; this module holds the one step the R0 paper changes, so
that ``selfnpo generate --scheduler R0Scheduler`` (and any pipeline) can sample the way an R0
generator was trained (:func:`selfnpo.param.ddim_step_eta`, the step :func:`selfnpo.sampling.sample` takes with ``etas``).
"""

from __future__ import annotations

from diffusers import DDIMScheduler
from torch import Tensor

from .param import ddim_step_eta, to_eps, to_x0


class R0Scheduler(DDIMScheduler):
    """diffusers' DDIM with R0's generator step (eq. 3.2) at a fixed ``r0_eta`` (1 = DDIM).

    ``x_prev = alpha_prev * x0 + sigma_prev * (eta * eps + sqrt(1 - eta^2) * noise)``, and the last
    step returns the Tweedie estimate itself (R0's ``sigma_0 = 0``), as :func:`selfnpo.sampling.sample` does.
    Set ``scheduler.r0_eta`` after :meth:`from_config`.
    """

    r0_eta: float = 1.0

    def step(
        self,
        model_output: Tensor,
        timestep: int,
        sample: Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator=None,
        variance_noise: Tensor | None = None,
        return_dict: bool = True,
    ):
        from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
        from diffusers.utils.torch_utils import randn_tensor

        ts = [int(t) for t in self.timesteps]
        i = ts.index(int(timestep))
        ac = self.alphas_cumprod.to(sample.device)
        a, s = ac[ts[i]].sqrt(), (1 - ac[ts[i]]).sqrt()
        kind = self.config.prediction_type
        x0, eps = to_x0(model_output, sample, a, s, kind), to_eps(model_output, sample, a, s, kind)
        if i + 1 == len(ts):
            prev = x0
        else:
            a_prev = ac[ts[i + 1]]
            if variance_noise is None:
                variance_noise = randn_tensor(
                    model_output.shape, generator=generator, device=sample.device, dtype=sample.dtype
                )
            prev = ddim_step_eta(
                x0, eps, a_prev.sqrt(), (1 - a_prev).sqrt(), float(self.r0_eta), variance_noise
            )
        prev = prev.to(sample.dtype)
        if not return_dict:
            return (prev, x0)
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)
