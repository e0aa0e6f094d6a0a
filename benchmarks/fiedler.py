"""RF-CLIP's normalized cut: the Fiedler solvers' agreement with fp64 ``eigh`` and their cost, side by side.

The graphs are the ones RF-CLIP cuts in a forward of a random-weight ViT-B/16 (the real geometry, 196 patches per
224 crop), captured at the call of ``defocused_tokens`` in every layer with distraction tokens:

* ``planted``: :func:`rfclip.testing.plant_distraction_tokens` makes a few patches distraction tokens in every
  layer (as real OpenAI weights have them); the graphs have a clear two-way structure (large eigengaps);
* ``planted+sink``: the same, the planted tokens also attention sinks (``sink_logit``);
* ``unplanted``: the random model without planting, ``tau_mult`` lowered so that every layer finds distraction
  tokens; its key-key graphs have no structure and eigengaps of 1e-3 (the hard case for a power method).

Solvers: ``power-10`` (the first default: 10 squarings, no check), ``power`` (residual stopping rule, certified
eigengap, ``eigh`` fallback), ``lanczos`` (RF-CLIP's default: Krylov steps from the previous layer's vector, the
same residual rule, a proved eigengap, ``power`` then ``eigh`` as fallbacks), ``eigh`` (fp32). Every solver is
called layer by layer on that layer's crops, as RF-CLIP calls it. Agreement: cuts (``y > mean(y)``) whose
foreground differs from fp64 ``eigh``'s (up to the sign of ``y``), and the most tokens a cut differs by. Cost:
milliseconds for all graphs of a set, the fastest of ``--repeats`` interleaved rounds, and the ratio to ``eigh``.
``fallback``: graphs ``lanczos`` handed to ``power`` / graphs solved by ``eigh`` in the end, for each solver.

A last table compares the side rules on the same graphs: how often the chosen foreground (the defocused
candidates) is the side of the cut holding more distraction tokens, and how often the largest ``|y|`` (TokenCut's
seed) is a distraction token.

    python benchmarks/fiedler.py                       # CPU
    python benchmarks/fiedler.py --device cuda --crops 16
"""

from __future__ import annotations

import argparse
import time

import torch

import rfclip.methods.defocus as defocus_module
import rfclip.methods.rfclip as rfclip_module
from rfclip.constants import DISTRACTION_DIMS
from rfclip.dense import DenseCLIP
from rfclip.methods import build_method
from rfclip.methods.defocus import bipartition, defocused_tokens, fiedler_vector, foreground_side
from rfclip.models.loading import random_clip
from rfclip.testing import plant_distraction_tokens

B16_DIMS = DISTRACTION_DIMS[("ViT-B-16", "openai")]
TOKENS = (20, 21, 34, 100, 150)  # planted distraction tokens (patch indices on the 14 x 14 grid)
SOLVERS = {
    "power-10": dict(solver="power", min_squarings=10, max_squarings=10, tol=float("inf"), gap_tol=0.0),
    "power": dict(solver="power"),
    "lanczos": dict(solver="lanczos"),
    "eigh": dict(solver="eigh"),
}


def capture_graphs(clip, images: torch.Tensor, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """The (G, N, N) graphs and (G, N) distraction masks RF-CLIP cuts in one forward over ``images``."""
    graphs, dis = [], []
    original = rfclip_module.defocused_tokens

    def spy(W, d, *args, **kwargs):
        graphs.append(W.detach().float().cpu())
        dis.append(d.detach().expand(W.shape[:-1]).cpu())
        return original(W, d, *args, **kwargs)

    enc = DenseCLIP(clip.model.visual).to(images.device)
    rfclip_module.defocused_tokens = spy
    try:
        with torch.inference_mode():
            enc(images, build_method("rfclip", distraction_dims=B16_DIMS, **options))
    finally:
        rfclip_module.defocused_tokens = original
    return torch.cat(graphs), torch.cat(dis)


def graph_sets(crops: int, seed: int, device: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    clip = random_clip("ViT-B-16", seed=seed, device=device)
    images = torch.randn(crops, 3, 224, 224, generator=torch.Generator().manual_seed(seed)).to(device)
    return {
        "planted": capture_graphs(plant_distraction_tokens(clip, TOKENS, B16_DIMS), images),
        "planted+sink": capture_graphs(plant_distraction_tokens(clip, TOKENS, B16_DIMS, sink_logit=4.0), images),
        "unplanted": capture_graphs(clip, images, tau_mult=1.3),
    }


def reference(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 eigh: the foreground ``y > mean(y)`` and the eigengap."""
    d = W.double().sum(-1)
    M = W.double() / torch.sqrt(d[..., :, None] * d[..., None, :])
    evals, Z = torch.linalg.eigh(M)
    y = Z[..., -2] / d.sqrt()
    return y > y.mean(-1, keepdim=True), evals[..., -2] - evals[..., -3]


def differing(fg: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return torch.minimum((fg != ref).sum(-1), (fg != ~ref).sum(-1))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def solve_layers(W: torch.Tensor, crops: int, opts: dict):
    """The Fiedler vectors of the graphs (layers x crops, N, N), one call per layer as RF-CLIP makes them
    (``lanczos`` starts from the previous layer's vectors). Returns (y (G, N), eigh_used (G,))."""
    ys, used, start = [], [], None
    for layer in W.split(crops):
        fied = fiedler_vector(layer, **opts, **({"start": start} if opts["solver"] == "lanczos" else {}))
        start = fied.y
        ys.append(fied.y)
        used.append(fied.eigh_used)
    return torch.cat(ys), torch.cat(used)


def time_solvers(W: torch.Tensor, crops: int, repeats: int, device: str) -> dict[str, float]:
    W = W.to(device)
    best = {name: float("inf") for name in SOLVERS}
    for name, opts in SOLVERS.items():  # warm-up
        solve_layers(W, crops, opts)
    for _ in range(repeats):
        for name, opts in SOLVERS.items():
            sync(device)
            t0 = time.perf_counter()
            solve_layers(W, crops, opts)
            sync(device)
            best[name] = min(best[name], 1e3 * (time.perf_counter() - t0))
    return best


def count_power_fallbacks(W: torch.Tensor, crops: int) -> int:
    """Graphs the lanczos solver hands to the squaring solver."""
    calls = []
    original = defocus_module._power_solve

    def spy(M, *args, **kwargs):
        calls.append(M.shape[0])
        return original(M, *args, **kwargs)

    defocus_module._power_solve = spy
    try:
        solve_layers(W, crops, SOLVERS["lanczos"])
    finally:
        defocus_module._power_solve = original
    return sum(calls)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--crops", type=int, default=3, help="224 crops per forward (graphs per set = crops x 11 layers)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    sets = graph_sets(args.crops, args.seed, args.device)
    print(f"random ViT-B/16, {args.crops} crops, device {args.device}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")

    print("\nagreement with fp64 eigh (cuts with a different foreground / most tokens differing) and cost")
    head = f"{'graphs':<13} {'G':>3} {'gap min':>8} {'gap med':>8}"
    for name in SOLVERS:
        head += f" | {name + ' cuts':>14} {'ms':>7} {'x eigh':>6}"
    print(head + " | fallback")
    for set_name, (W, _) in sets.items():
        ref_fg, gap = reference(W)
        times = time_solvers(W, args.crops, args.repeats, args.device)
        row = f"{set_name:<13} {W.shape[0]:>3} {float(gap.min()):>8.1e} {float(gap.median()):>8.1e}"
        fallback = {}
        for name, opts in SOLVERS.items():
            y, used = solve_layers(W.to(args.device), args.crops, opts)
            diff = differing(bipartition(y.cpu()), ref_fg)
            fallback[name] = int(used.sum())
            row += (f" | {int((diff > 0).sum()):>3}/{W.shape[0]:<3} {int(diff.max()):>4}t {times[name]:>7.1f}"
                    f" {times[name] / times['eigh']:>5.2f}x")
        to_power = count_power_fallbacks(W.to(args.device), args.crops)
        print(row + f" | lanczos->power {to_power}, ->eigh: power {fallback['power']}, lanczos {fallback['lanczos']}")

    print("\nside rules (default solver, mean threshold). wrong side: cuts whose foreground is the side holding more "
          "distraction tokens; seed dis: the largest |y| is a distraction token; T_def: mean share of the "
          "non-distraction tokens defocused")
    configs = (("max_abs", "all"), ("fewer_distraction", "all"), ("smaller_side", "all"),
               ("fewer_distraction", "non_distraction"))
    print(f"{'graphs':<13} {'fg_rule':<18} {'cut_graph':<16} {'wrong side':>10} {'seed dis':>9} {'T_def':>6}")
    for set_name, (W, dis) in sets.items():
        W, dis = W.to(args.device), dis.to(args.device)
        G = W.shape[0]
        for rule, cut in configs:
            valid = ~dis if cut == "non_distraction" else None
            y = fiedler_vector(W, valid=valid).y
            upper = bipartition(y, "mean", valid)
            lower = ~upper if valid is None else ~upper & valid
            fg = foreground_side(y, upper, rule, dis=dis, valid=valid)
            bg = torch.where(fg == upper, lower, upper)
            wrong = (fg & dis).sum(-1) > (bg & dis).sum(-1)
            seed = torch.where(valid if valid is not None else torch.ones_like(dis), y.abs(), -1.0).argmax(-1)
            seed_dis = torch.gather(dis, -1, seed[:, None]).squeeze(-1)
            t_def, _ = defocused_tokens(W, dis, rule=rule, cut_graph=cut)
            share = (t_def.sum(-1).float() / (~dis).sum(-1).float()).mean()
            print(f"{set_name:<13} {rule:<18} {cut:<16} {int(wrong.sum()):>6}/{G:<3} {int(seed_dis.sum()):>5}/{G:<3} "
                  f"{float(share):>6.2f}")


if __name__ == "__main__":
    main()
