"""RF-CLIP's diagnostics as pictures (the paper's Figures 2-4): what each layer attends to, which tokens are
distractions, where the defocused foreground is, and which embedding dimensions are over-activated.

:func:`explain_figures` runs one forward of RF-CLIP over the whole resized image (one window, so every map covers
the whole picture; the segmentation itself uses the segmenter's sliding windows) with recording switched on, and
returns the pictures (PIL images) and the numbers; :func:`explain` writes them into ``out_dir``:

* ``attention.png``: per layer, the head-averaged attention row of the query patch over the image, before and after
  redistribution (same colour scale within a layer, so the loss on the distraction tokens is visible), and the
  last layer's proxy attention (Fig. 2 (a));
* ``self_attention.png``: per layer, the head-averaged patch x patch attention matrix before / after; distraction
  tokens are the vertical stripes (Fig. 2 (b));
* ``tokens.png``: per layer, the distraction tokens (red) and the defocused tokens (green) over the image (Fig. 4 (b));
* ``phi.png``: per layer, each token's maximum distraction-dimension weight divided by the threshold tau (above 1
  = distraction candidate; colour scale 0..2);
* ``fiedler.png``: per layer with a graph cut, the Fiedler vector of the patch graph (written only when some layer
  redistributes attention, i.e. finds distraction tokens: random or calibrated-away weights may give none);
* ``embedding_weights.png``: the mean embedding weight per dimension of this image's layer-averaged input
  embeddings (unmodified CLIP), the distraction dimensions marked (Fig. 3 (a));
* ``segmentation.png`` (when classes are given) and ``summary.json`` (per-layer counts, settings, file names).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ._io import atomic_open
from .errors import RfclipError

_PANEL = 288  # long side of one picture panel, in pixels


@dataclass
class ExplainResult:
    """The pictures (name -> PIL image, named as the files), the files written by :func:`explain` (name -> path;
    empty from :func:`explain_figures`) and the numbers in ``summary.json``."""

    files: dict[str, Path] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    figures: dict[str, Image.Image] = field(default_factory=dict)


def _find_rfclip(method):
    from .methods.rfclip import RFCLIP

    m = method
    for _ in range(8):
        if isinstance(m, RFCLIP):
            return m
        m = getattr(m, "base", None)
        if m is None:
            break
    return None


def _panel_size(h: int, w: int) -> tuple[int, int]:
    s = _PANEL / max(h, w)
    return max(1, round(w * s)), max(1, round(h * s))


def _matrix_image(mat: np.ndarray, vmax: float, size: int = _PANEL) -> Image.Image:
    """A (N, N) non-negative matrix as a colour image (box-averaged to ``size``)."""
    from .viz import apply_colormap

    m = np.clip(np.asarray(mat, np.float32) / max(vmax, 1e-12), 0, 1)
    f = Image.fromarray(m, mode="F").resize((size, size), Image.BOX)
    return Image.fromarray(apply_colormap(np.asarray(f), "viridis"))


def check_query_point(point, image_size: tuple[int, int]) -> tuple[float, float]:
    """``(x, y)`` as floats, checked to lie inside an image of ``image_size`` (H, W); a one-line error otherwise."""
    H, W = image_size
    x, y = float(point[0]), float(point[1])
    if not (0 <= x < W and 0 <= y < H):
        raise RfclipError(f"query point ({x:g}, {y:g}) lies outside the {W}x{H} image; give x,y in pixels, "
                          f"x in 0..{W - 1} and y in 0..{H - 1}")
    return x, y


def explain(segmenter, image, classes=None, out_dir: str | os.PathLike = "rfclip_explain",
            query_point: tuple[float, float] | None = None, layers=None) -> ExplainResult:
    """Draw RF-CLIP's per-layer diagnostics for one image into ``out_dir`` (PNG files + ``summary.json``).

    Args:
        segmenter: a :class:`rfclip.Segmenter` built with ``method="rfclip"`` (or an RF-CLIP preset).
        image: path, PIL image or H x W x 3 uint8 array.
        classes: optional vocabulary (as for ``Segmenter.segment``); adds ``segmentation.png``.
        out_dir: output folder (created).
        query_point: ``(x, y)`` in pixels of the original image whose attention rows are drawn; default: the centre.
        layers: layers to draw (0-based; ``"0-5,11"``, a list, or None for all).

    Returns:
        :class:`ExplainResult` with the pictures, the written files and the summary.
    """
    from . import viz

    result = explain_figures(segmenter, image, classes=classes, query_point=query_point, layers=layers)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    for name, fig in result.figures.items():
        result.files[name] = viz.save_image_atomic(fig, out / f"{name}.png")
    result.summary["files"] = {k: v.name for k, v in result.files.items()}
    summary_path = out / "summary.json"
    with atomic_open(summary_path, "w", encoding="utf-8") as f:
        json.dump(result.summary, f, indent=1)
    result.files["summary"] = summary_path
    return result


def explain_figures(segmenter, image, classes=None, query_point: tuple[float, float] | None = None,
                    layers=None) -> ExplainResult:
    """RF-CLIP's per-layer diagnostics for one image as pictures, without writing files (arguments as for
    :func:`explain`). The figures are named as :func:`explain`'s files (``attention``, ``tokens``, ``phi``, ...)."""
    from . import viz
    from .calibrate import embedding_weights, token_profiles
    from .inference import load_image, pad_to_patch, preprocess, rescale_size
    from .methods.options import parse_layers

    method = _find_rfclip(segmenter.method)
    if method is None:
        raise RfclipError(f"explain draws RF-CLIP's diagnostics; build the segmenter with method='rfclip' "
                          f"(or rfclip_nodefocus / rfclip_code_embed), not '{getattr(segmenter, 'method_name', '?')}'")
    encoder = segmenter.encoder
    device = segmenter.device
    img = load_image(image)
    H0, W0 = img.shape[:2]
    qx, qy = (W0 / 2.0, H0 / 2.0) if query_point is None else check_query_point(query_point, (H0, W0))
    size = rescale_size(H0, W0, segmenter.config.short_side)  # (h, w) of the network input
    cfg = segmenter.config
    ph_, pw_ = encoder.patch_size
    x = pad_to_patch(preprocess(img, cfg.short_side, device, cfg.pixel_mean, cfg.pixel_std), (ph_, pw_))  # >= 1 patch
    gh, gw = x.shape[-2] // ph_, x.shape[-1] // pw_
    x = x[:, : gh * ph_, : gw * pw_]  # the forward drops the remainder anyway
    # The picture the maps are drawn on: the resized image, padded as the input and cut to the patch grid.
    base = np.asarray(Image.fromarray(img).resize((size[1], size[0]), Image.BILINEAR))
    base = np.pad(base, ((0, max(0, gh * ph_ - size[0])), (0, max(0, gw * pw_ - size[1])), (0, 0)), mode="edge")
    base = base[: gh * ph_, : gw * pw_]
    pw, ph = _panel_size(base.shape[0], base.shape[1])
    base_panel = np.asarray(Image.fromarray(base).resize((pw, ph), Image.BILINEAR))

    # Query patch.
    col = min(gw - 1, int(qx * size[1] / W0) // pw_)
    row = min(gh - 1, int(qy * size[0] / H0) // ph_)
    q_index = row * gw + col
    q_xy = ((col + 0.5) * pw / gw, (row + 0.5) * ph / gh)

    text = None
    if classes is not None or method.needs_text_in_forward:
        if classes is None:
            raise RfclipError("this method needs the class names inside the forward; pass classes")
        text = segmenter.encode_classes(classes)
    rec: dict = {}
    amp = segmenter.amp_dtype
    with torch.inference_mode():
        ctx = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
        with ctx:
            tf = text.features.to(device=device, dtype=torch.float32) if (text is not None and method.needs_text_in_forward) else None
            encoder(x[None], segmenter.method, text_features=tf, record=rec)
            profile = token_profiles(encoder, x[None])  # vanilla CLIP inputs, layer-averaged (1, N, C)
    mean_weight = embedding_weights(profile[0]).mean(0).cpu().numpy()

    L = encoder.num_layers
    chosen = sorted(parse_layers(layers, L, name="layers"))
    dims = list(method.resolved_dims.values or [])
    tau = method.threshold(encoder.width) if method.detects else None

    def get(key):
        v = rec.get(key)
        return v[0][0].numpy() if v else None

    def grid_map(vec):
        return np.asarray(vec, np.float32).reshape(gh, gw)

    figures: dict[str, Image.Image] = {}
    per_layer = []
    att_panels, att_titles = [], []
    sa_panels, sa_titles = [], []
    tok_panels, tok_titles = [], []
    phi_panels, phi_titles = [], []
    fied_panels, fied_titles = [], []
    tok_palette = np.array([[60, 180, 75], [230, 25, 75]], dtype=np.uint8)
    for layer in chosen:
        info: dict = {"layer": layer}
        before = get(f"rf.L{layer}.attn")
        after = get(f"rf.L{layer}.attn_after")
        dis = get(f"rf.L{layer}.dis")
        defo = get(f"rf.L{layer}.def")
        phi = get(f"rf.L{layer}.phi")
        fied = get(f"rf.L{layer}.fiedler")
        n_dis = int(dis.sum()) if dis is not None else 0
        n_def = int((defo > 0.5).sum()) if defo is not None else 0
        info.update(distraction=n_dis, defocused=n_def, redistributed=after is not None)
        if before is not None:
            b_row = before[1 + q_index, 1:]
            a_row = after[1 + q_index, 1:] if after is not None else b_row
            vmax = float(max(b_row.max(), a_row.max()))
            if dis is not None and n_dis:
                lost = float(b_row[dis > 0.5].sum())
                info["query_attention_on_distraction"] = [lost, float(a_row[dis > 0.5].sum())]
            for row_vals, tag in ((b_row, "before"), (a_row, "after")):
                pan = viz.heatmap_overlay(base_panel, grid_map(row_vals), alpha=0.6, vmin=0.0, vmax=vmax)
                att_panels.append(viz.mark_point(pan, q_xy))
                att_titles.append(f"L{layer} {tag}" if after is not None or tag == "before" else f"L{layer} (unchanged)")
            mb = before[1:, 1:]
            ma = after[1:, 1:] if after is not None else mb
            vm = float(np.quantile(mb, 0.995))
            sa_panels += [_matrix_image(mb, vm), _matrix_image(ma, vm)]
            sa_titles += [f"L{layer} before", f"L{layer} after" if after is not None else f"L{layer} (unchanged)"]
        mask = np.full((gh, gw), 255, dtype=np.uint8)
        if defo is not None:
            mask[grid_map(defo) > 0.5] = 0
        if dis is not None:
            mask[grid_map(dis) > 0.5] = 1
        mask_img = np.asarray(Image.fromarray(mask).resize((pw, ph), Image.NEAREST))
        tok_panels.append(viz.overlay(base_panel, mask_img, ["defocused", "distraction"], alpha=0.55,
                                      palette=tok_palette, legend=False))
        tok_titles.append(f"L{layer}: {n_dis} dis, {n_def} def")
        if phi is not None and tau:
            ratio = grid_map(phi) / tau
            phi_panels.append(viz.heatmap_overlay(base_panel, ratio, alpha=0.65, vmin=0.0, vmax=2.0))
            phi_titles.append(f"L{layer} max phi/tau {float(ratio.max()):.2f}")
            info["max_phi_over_tau"] = float(ratio.max())
        if fied is not None:
            m = float(np.abs(fied).max()) or 1.0
            fied_panels.append(viz.heatmap_overlay(base_panel, grid_map(fied), alpha=0.65, vmin=-m, vmax=m))
            fied_titles.append(f"L{layer} Fiedler vector")
        per_layer.append(info)
    proxy = get("rf.proxy")
    if proxy is not None and proxy.shape[-1] == gh * gw:
        pr = proxy[q_index]
        att_panels.append(viz.mark_point(viz.heatmap_overlay(base_panel, grid_map(pr), alpha=0.6, vmin=0.0), q_xy))
        att_titles.append("last layer (proxy)")
        sa_panels.append(_matrix_image(proxy, float(np.quantile(proxy, 0.995))))
        sa_titles.append("last layer (proxy)")

    def save(name, panels, titles, ncols):
        if panels:
            figures[name] = viz.grid_figure(panels, titles, ncols=ncols)

    save("attention", att_panels, att_titles, 6)
    save("self_attention", sa_panels, sa_titles, 6)
    save("tokens", tok_panels, tok_titles, 4)
    save("phi", phi_panels, phi_titles, 4)
    save("fiedler", fied_panels, fied_titles, 4)
    plot = viz.line_plot(mean_weight, highlight=dims,
                         title=f"mean embedding weight per dimension ({gh * gw} tokens, layer-averaged input)",
                         xlabel="dimension", ylabel="mean weight", size=(1100, 360))
    figures["embedding_weights"] = plot
    if classes is not None:
        seg = segmenter.segment(img, text)
        figures["segmentation"] = viz.overlay(img, seg.mask, seg.classes)
    order = np.argsort(-mean_weight)[:16]
    summary = {
        "image_size": [H0, W0],
        "grid": [gh, gw],
        "query_point": [qx, qy],
        "query_patch": [row, col],
        "method": getattr(segmenter, "method_name", method.name),
        "distraction_dims": dims,
        "dims_source": method.resolved_dims.source,
        "tau": tau,
        "beta": method.beta,
        "layers": per_layer,
        "top_mean_weight_dims": [int(d) for d in order],
    }
    return ExplainResult(summary=summary, figures=figures)
