"""Why a Self-NPO offset helps one 2-D base and hurts another: where x_t' comes from, the teacher,
and whether the offset is more than a weaker guidance scale.

Same world, bases and metrics as ``toy2d_selfnpo.py``. On each base, TDFT offsets (LoRA rank 4, lr 1e-3,
500 steps) differ in one setting from the default (self pool generated at g = 7.5, EMA teacher):
the pool generated at g = 1; pure noise at t' = T (eq. 13); true samples (the authors' ``images``
mode); a frozen teacher; full weights at lr 1e-5 or at the authors' 1e-6 instead of LoRA. Each is scored at beta = 1 and g in {3, 7.5}, paired with the
base at the same g. Then the *guidance ratio* ``r = E||eps_c - eps_neg|| / E||eps_c - eps_u||``
(over forward-noised true samples at t in {100, 300, ..., 900}) says how much the offset shrinks the
guidance vector; the base sampled at the matched scale ``g_eff = 1 + (g - 1) r`` tells whether the
offset does anything that another g does not; and the *guidance error*, the distance of the model's
guidance vector from the exact one of the true mixture, with and without the offset.

    python benchmarks/toy2d_ablation.py --output runs/toy2d-ablation
    python benchmarks/toy2d_ablation.py --output runs/toy2d-sweep --base-sweep
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from toy2d_selfnpo import METRICS, pretrain, run_and_write, sample, score, train_offset

from selfnpo.evaluation.stats import paired_diff_ci
from selfnpo.npo import NPOGuidance
from selfnpo.param import forward_noise
from selfnpo.toy2d.metrics import hdr_log_threshold
from selfnpo.toy2d.mixture import ring_mixture
from selfnpo.toy2d.model import MixtureSource, class_prompt

GUIDANCE = (3.0, 7.5)
VARIANTS = {
    "default (self pool g=7.5, EMA)": {},
    "self pool g=1": dict(pool_guidance_scale=1.0),
    "noise at t'=T": dict(source="noise"),
    "true samples": dict(source="images", image_dir="-"),
    "frozen teacher": dict(teacher="frozen"),
    "full weights, lr 1e-5": dict(train="full", lr=1e-5),
    "full weights, lr 1e-6 (authors')": dict(train="full", lr=1e-6),
}


@torch.no_grad()
def guidance_stats(pipe, offset: Path, beta: float, mix, n: int = 600, seed: int = 5) -> dict:
    """How the offset changes the guidance vector ``d = eps_c - eps_neg`` (negative branch
    ``theta + beta*delta``) against the plain one ``d_0 = eps_c - eps_u`` and the exact one ``d*``
    of the true mixture, over forward-noised true samples at t in {100, 300, ..., 900}.

    ``ratio = E||d|| / E||d_0||``; ``err_plain = E||d_0 - d*|| / E||d*||``; ``err_npo`` the same for ``d``.
    """
    g = torch.Generator().manual_seed(seed)
    x0, c = mix.sample(n, None, g)
    unc = torch.full_like(c, mix.num_classes)
    sums = {"d": 0.0, "d0": 0.0, "dstar": 0.0, "e0": 0.0, "e": 0.0}
    for t in (100, 300, 500, 700, 900):
        ac = pipe.scheduler.alphas_cumprod[t].double()
        a, s = ac.sqrt(), (1 - ac).sqrt()
        x_t = forward_noise(x0, torch.randn(n, 2, generator=g, dtype=x0.dtype), a, s)
        xf, tt = x_t.float(), torch.full((2 * n,), t)
        ids = torch.cat([unc, c])
        e_u, e_c = pipe.unet(torch.cat([xf, xf]), tt, encoder_hidden_states=ids).sample.chunk(2)
        pipe._guidance_scale = 2.0  # NPOGuidance splits the batch only while guidance is on
        with NPOGuidance(pipe, negative=offset, beta=beta):
            e_n = pipe.unet(torch.cat([xf, xf]), tt, encoder_hidden_states=ids).sample.chunk(2)[0]
        d0, d = (e_c - e_u).double(), (e_c - e_n).double()
        dstar = mix.eps(x_t, c, a, s) - mix.eps(x_t, None, a, s)
        for k, v in (("d", d), ("d0", d0), ("dstar", dstar), ("e0", d0 - dstar), ("e", d - dstar)):
            sums[k] += float(v.norm(dim=1).mean())
    return {
        "ratio": sums["d"] / sums["d0"],
        "err_plain": sums["e0"] / sums["dstar"],
        "err_npo": sums["e"] / sums["dstar"],
    }


def run(args) -> dict:
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    mix = ring_mixture()
    thresholds = [hdr_log_threshold(mix, c) for c in range(mix.num_classes)]
    prompts_file = out / "prompts.txt"
    prompts_file.write_text("".join(class_prompt(c) + "\n" for c in range(mix.num_classes)))
    noise = torch.randn(args.n, 2, generator=torch.Generator().manual_seed(args.seed + 1))
    cls = torch.arange(args.n) % mix.num_classes
    prompts = [class_prompt(int(c)) for c in cls]
    bases, _ = pretrain(
        mix, out, {"under-trained": args.under_steps, "well-trained": args.well_steps}, args.seed
    )
    rows = []
    # offsets train on untouched copies: evaluation loads each offset into the base as an adapter
    pristine = {name: base.copy() for name, base in bases.items()}
    for bname, base in bases.items():
        refs = {gs: score(mix, sample(base, prompts, noise, gs), cls, thresholds) for gs in GUIDANCE}
        for vname, over in VARIANTS.items():
            src = MixtureSource(mix) if over.get("source") == "images" else None
            folder = out / "offsets" / f"{bname}-{len(rows)}"
            offset, wall = train_offset(
                pristine[bname],
                folder,
                prompts_file,
                args.offset_steps,
                args.seed,
                data=src,
                **({"objective": "tdft", "lr": 1e-3} | over),
            )
            stats = guidance_stats(base, offset, 1.0, mix)
            r = stats["ratio"]
            for gs in GUIDANCE:
                (ref, ref_sum) = refs[gs]
                per, summ = score(mix, sample(base, prompts, noise, gs, offset, 1.0), cls, thresholds)
                g_eff = 1.0 + (gs - 1.0) * r
                _, eff_sum = score(mix, sample(base, prompts, noise, g_eff), cls, thresholds)
                diffs = {f"d_{m}": paired_diff_ci(per[m], ref[m], n_boot=1000, seed=0) for m in METRICS}
                rows.append(
                    {"base": bname, "variant": vname, "g": gs, **stats, "g_eff": g_eff, "wall_s": wall}
                    | {"npo": summ, "base_at_g": ref_sum, "base_at_g_eff": eff_sum}
                    | diffs
                )
    return {"config": vars(args), "rows": rows}


SWEEP_STEPS = (150, 300, 600, 1000, 2000, 3000)


def run_sweep(args) -> dict:
    """Default TDFT offset (lr 1e-3, beta 1) on bases checkpointed along one pre-training run."""
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    mix = ring_mixture()
    thresholds = [hdr_log_threshold(mix, c) for c in range(mix.num_classes)]
    prompts_file = out / "prompts.txt"
    prompts_file.write_text("".join(class_prompt(c) + "\n" for c in range(mix.num_classes)))
    noise = torch.randn(args.n, 2, generator=torch.Generator().manual_seed(args.seed + 1))
    cls = torch.arange(args.n) % mix.num_classes
    prompts = [class_prompt(int(c)) for c in cls]
    bases, _ = pretrain(mix, out, {f"{k}": k for k in SWEEP_STEPS}, args.seed)
    rows = []
    for name, base in bases.items():
        offset, _ = train_offset(
            base,
            out / "offsets" / name,
            prompts_file,
            args.offset_steps,
            args.seed,
            objective="tdft",
            lr=1e-3,
        )
        row = {"pretrain_steps": int(name), **guidance_stats(base, offset, 1.0, mix)}
        for gs in (1.0, 3.0, 7.5):
            ref, summ = score(mix, sample(base, prompts, noise, gs), cls, thresholds)
            row[f"base_g{gs:g}"] = summ
            if gs > 1.0:
                per, _ = score(mix, sample(base, prompts, noise, gs, offset, 1.0), cls, thresholds)
                for m in ("loglik", "in_hdr"):
                    row[f"d_{m}_g{gs:g}"] = paired_diff_ci(per[m], ref[m], n_boot=1000, seed=0)
        rows.append(row)
    return {"config": vars(args), "rows": rows}


def markdown_sweep(res: dict) -> str:
    lines = [
        f"n = {res['config']['n']}, TDFT lr 1e-3, {res['config']['offset_steps']} steps, beta = 1; Δ paired with the same base at the same g.",
        "",
        "| pre-training steps | guidance error plain / NPO | base log p at g = 1 / 3 / 7.5 | Δ log p, g = 3 | "
        "Δ log p, g = 7.5 | Δ HDR, g = 3 | Δ HDR, g = 7.5 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:

        def ci(key, r=r):
            mean, lo, hi = r[key]
            return f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"

        lp = " / ".join(f"{r[f'base_g{g}']['loglik']:.2f}" for g in ("1", "3", "7.5"))
        lines.append(
            f"| {r['pretrain_steps']} | {r['err_plain']:.2f} / {r['err_npo']:.2f} | {lp} | "
            f"{ci('d_loglik_g3')} | {ci('d_loglik_g7.5')} | {ci('d_in_hdr_g3')} | {ci('d_in_hdr_g7.5')} |"
        )
    return "\n".join(lines) + "\n"


def markdown(res: dict) -> str:
    n = res["config"]["n"]
    lines = [
        f"n = {n}, beta = 1, TDFT lr 1e-3, {res['config']['offset_steps']} steps. Δ: paired with the base at the same g, 95% bootstrap "
        "interval. r: guidance ratio; guidance error: E||d - d*|| / E||d*|| for the plain guidance vector "
        "and the one with the offset (d* exact); 'base at g_eff': the base without offset at g_eff = 1 + (g-1) r.",
        "",
        "| base | offset variant | g | r | guidance error: plain / NPO | log p: base / NPO / base at g_eff | Δ log p | "
        "HDR prec: base / NPO / base at g_eff | Δ HDR | kNN R: base / NPO / base at g_eff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in res["rows"]:
        b, o, e = row["base_at_g"], row["npo"], row["base_at_g_eff"]

        def ci(m, row=row):
            mean, lo, hi = row[f"d_{m}"]
            return f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"

        lines.append(
            f"| {row['base']} | {row['variant']} | {row['g']:g} | {row['ratio']:.2f} | "
            f"{row['err_plain']:.2f} / {row['err_npo']:.2f} | "
            f"{b['loglik']:.2f} / {o['loglik']:.2f} / {e['loglik']:.2f} | {ci('loglik')} | "
            f"{b['in_hdr']:.3f} / {o['in_hdr']:.3f} / {e['in_hdr']:.3f} | {ci('in_hdr')} | "
            f"{b['knn_recall']:.3f} / {o['knn_recall']:.3f} / {e['knn_recall']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", required=True, help="folder for ablation.json, ablation.md and the runs")
    ap.add_argument("--n", type=int, default=1500, help="samples per setting")
    ap.add_argument("--under-steps", type=int, default=300)
    ap.add_argument("--well-steps", type=int, default=3000)
    ap.add_argument("--offset-steps", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--base-sweep",
        action="store_true",
        help="instead: the default offset on bases checkpointed at 150..3000 pre-training steps",
    )
    args = ap.parse_args()
    if args.base_sweep:
        run_and_write(run_sweep, markdown_sweep, args, "base_sweep")
    else:
        run_and_write(run, markdown, args, "ablation")


if __name__ == "__main__":
    main()
