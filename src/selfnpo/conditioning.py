"""Text conditioning as a small value type shared by every model adapter."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Cond:
    """Per-sample conditioning: cross-attention states and optional extra kwargs.

    ``embeds``: ``[B, L, D]`` text-encoder hidden states. ``added``: SDXL's
    ``{"text_embeds": [B, D2], "time_ids": [B, 6]}``; ``None`` for SD1.5-type models.
    """

    embeds: Tensor
    added: dict[str, Tensor] | None = field(default=None)

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def index(self, idx: Tensor | slice | list[int]) -> Cond:
        added = None if self.added is None else {k: v[idx] for k, v in self.added.items()}
        return Cond(self.embeds[idx], added)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Cond:
        def mv(v: Tensor) -> Tensor:
            return v.to(device=device, dtype=dtype if v.is_floating_point() else None)

        added = None if self.added is None else {k: mv(v) for k, v in self.added.items()}
        return Cond(mv(self.embeds), added)

    def expand(self, n: int) -> Cond:
        """Repeat a batch-1 conditioning ``n`` times."""
        added = None if self.added is None else {k: v.expand(n, *v.shape[1:]) for k, v in self.added.items()}
        return Cond(self.embeds.expand(n, *self.embeds.shape[1:]), added)

    def zeros(self) -> Cond:
        """All-zero embeddings of the same shapes (the unconditional input of ``uncond_mode="zeros"``)."""
        added = None if self.added is None else {k: torch.zeros_like(v) for k, v in self.added.items()}
        return Cond(torch.zeros_like(self.embeds), added)

    @staticmethod
    def cat(conds: list[Cond]) -> Cond:
        added = None
        if conds[0].added is not None:
            added = {k: torch.cat([c.added[k] for c in conds]) for k in conds[0].added}
        return Cond(torch.cat([c.embeds for c in conds]), added)

    def unet_kwargs(self) -> dict:
        """Keyword arguments for ``UNet2DConditionModel.forward``."""
        kw: dict = {"encoder_hidden_states": self.embeds}
        if self.added is not None:
            kw["added_cond_kwargs"] = self.added
        return kw
