"""Cond, the conditioning value every model adapter passes around: indexing, concatenation, moves."""

from __future__ import annotations

import torch

from selfnpo.conditioning import Cond


def _cond(n: int, added: bool) -> Cond:
    g = torch.Generator().manual_seed(n)
    extra = {"text_embeds": torch.randn(n, 5, generator=g), "time_ids": torch.arange(n * 6).reshape(n, 6)}
    return Cond(torch.randn(n, 7, 3, generator=g), extra if added else None)


def test_cat_then_index_gives_back_each_part():
    for added in (False, True):
        a, b = _cond(2, added), _cond(3, added)
        both = Cond.cat([a, b])
        assert len(both) == 5
        for part, idx in ((a, slice(0, 2)), (b, slice(2, 5))):
            back = both.index(idx)
            assert torch.equal(back.embeds, part.embeds)
            if added:
                assert all(torch.equal(back.added[k], part.added[k]) for k in part.added)
            else:
                assert back.added is None


def test_expand_zeros_and_unet_kwargs():
    c = _cond(1, True)
    e = c.expand(4)
    assert len(e) == 4 and torch.equal(e.embeds[3], c.embeds[0]) and e.added["time_ids"].shape == (4, 6)
    z = e.zeros()
    assert z.embeds.abs().sum() == 0 and all(v.abs().sum() == 0 for v in z.added.values())
    kw = c.unet_kwargs()
    assert kw["encoder_hidden_states"] is c.embeds and kw["added_cond_kwargs"] is c.added
    assert "added_cond_kwargs" not in _cond(1, False).unet_kwargs()


def test_to_casts_floats_only():
    c = _cond(2, True).to("cpu", torch.float64)
    assert c.embeds.dtype == torch.float64 and c.added["text_embeds"].dtype == torch.float64
    assert c.added["time_ids"].dtype == torch.long  # integer tensors keep their dtype
