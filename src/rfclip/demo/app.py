"""The web page of ``rfclip demo`` (Gradio): Segment, Compare and Look inside over one :class:`DemoEngine`.

The page only lays out components and turns the engine's results into pictures, bars and tables; inference,
drawing and the files it offers are the library's (:mod:`rfclip.demo.engine`, :mod:`rfclip.viz`,
:mod:`rfclip.explain`, the writers of ``rfclip segment``). Every request goes through one queue with one worker
(``concurrency_id="model"``), so requests wait for each other instead of running concurrently on the model. A
problem with the input is shown in the page, in the CLI's words; the server keeps serving.
"""

import html
import itertools
import os
import sys
import traceback
from importlib import resources
from pathlib import Path
from typing import Callable

import gradio as gr
import numpy as np
from PIL import Image

from .. import __version__
from ..errors import RfclipError
from .engine import VOCABULARIES, DemoEngine, Settings, inside_choices, method_choices, method_description, \
    read_image, vocabulary_text

PREVIEW_SIDE = 1280  # long side of the pictures shown for choosing a point (the click is scaled back)
OWN_VOCABULARY = "your own (type above)"

EXPLAIN_FIGURES = [  # rfclip.explain's pictures, in the order and with the captions the page shows them
    ("attention", "Attention of the clicked point, per layer",
     "Head-averaged attention row of the clicked patch (ring) over the image, before and after RF-CLIP moves part "
     "of it from the distraction tokens to the target tokens; the last panel is the last layer's proxy attention."),
    ("tokens", "Distraction and defocused tokens, per layer",
     "Red: distraction tokens (over-activated in the distraction dimensions). Green: the defocused target tokens "
     "the normalized cut picks, which receive the redistributed attention."),
    ("phi", "Distraction score per layer",
     "Each token's largest distraction-dimension weight divided by the threshold tau; above 1 (red) a token is a "
     "distraction candidate (colour scale 0 to 2)."),
    ("fiedler", "Normalized-cut vector per layer",
     "The Fiedler vector of the patch graph that splits foreground from background in each layer with a cut."),
    ("self_attention", "Patch-to-patch attention, before and after",
     "Rows: query patches, columns: key patches. Distraction tokens are the vertical stripes."),
    ("embedding_weights", "Mean embedding weight per dimension",
     "Per-dimension mean weight of this image's layer-averaged token embeddings; red: the distraction dimensions."),
]

CSS = """
.rf-header h1 {margin-bottom: 0.1em}
.rf-header p {margin-top: 0; color: var(--body-text-color-subdued)}
.rf-error {border: 1px solid #e5484d; background: #fff0f0; color: #8e1519; border-radius: 8px; padding: 10px 14px;
           font-size: 0.95em}
.rf-error b {color: #c4151c}
.rf-ok {color: var(--body-text-color-subdued); font-size: 0.92em; padding: 2px 2px}
.rf-banner {border: 1px solid #f0b429; background: #fffbea; color: #5c4400; border-radius: 8px; padding: 12px 16px}
.rf-banner code {background: #fff3c4}
.rf-bars {display: flex; flex-direction: column; gap: 6px; font-size: 0.92em}
.rf-bar {display: grid; grid-template-columns: 14px minmax(70px, max-content) 1fr 52px; gap: 8px; align-items: center}
.rf-swatch {width: 14px; height: 14px; border-radius: 3px; border: 1px solid rgba(0,0,0,0.35)}
.rf-track {background: var(--background-fill-secondary); border-radius: 4px; height: 14px; overflow: hidden}
.rf-fill {display: block; height: 100%; border-radius: 4px}
.rf-pct {text-align: right; font-variant-numeric: tabular-nums}
.rf-legend-title {font-weight: 600; margin-bottom: 2px}
.rf-absent {color: var(--body-text-color-subdued); font-size: 0.9em; margin-top: 4px}
.rf-table {border-collapse: collapse; font-size: 0.86em; width: 100%; height: auto; border: none !important}
.rf-table th, .rf-table td {border-left: none !important; border-right: none !important}
.rf-table td {white-space: nowrap}
.rf-table th, .rf-table td {padding: 2px 8px; border: none; border-bottom: 1px solid var(--border-color-primary);
                            text-align: right; vertical-align: bottom; line-height: 1.35}
.rf-table th {font-weight: 600}
.rf-table th:first-child, .rf-table td:first-child {text-align: left}
.rf-figure-title {margin-top: 14px}
.rf-figure-title p {font-size: 0.92em}
.rf-controls {align-items: flex-end}
.rf-run {max-height: 46px; min-height: 42px; margin-bottom: 8px}
"""


# ---------------------------------------------------------------------------------------------- HTML pieces
_requests = itertools.count(1)  # numbers each answer (data-request), so a page can tell a new answer from the last


def error_html(message: str) -> str:
    return (f'<div class="rf-error" data-request="{next(_requests)}"><b>Error:</b> '
            f'{html.escape(" ".join(str(message).split()))}</div>')


def ok_html(text: str) -> str:
    return f'<div class="rf-ok" data-request="{next(_requests)}">{html.escape(text)}</div>'


def _rgb(colour) -> str:
    return "rgb({},{},{})".format(*(int(c) for c in colour))


def fraction_bars(classes: list[str], fractions: list[float], colours: np.ndarray) -> str:
    """The legend: per-class pixel fractions as a bar chart in the overlay's colours (present classes, largest
    first)."""
    order = sorted(range(len(classes)), key=lambda i: -fractions[i])
    rows = ['<div class="rf-legend-title">Legend: share of the pixels per class</div>']
    for i in order:
        if fractions[i] <= 0:
            continue
        pct = 100.0 * fractions[i]
        rows.append(
            f'<div class="rf-bar" data-class="{html.escape(classes[i])}">'
            f'<span class="rf-swatch" style="background:{_rgb(colours[i])}"></span>'
            f'<span class="rf-name">{html.escape(classes[i])}</span>'
            f'<span class="rf-track"><span class="rf-fill" style="width:{pct:.2f}%;background:{_rgb(colours[i])}">'
            f'</span></span><span class="rf-pct">{pct:.1f}%</span></div>')
    absent = [classes[i] for i in range(len(classes)) if fractions[i] <= 0]
    if absent:
        shown = ", ".join(html.escape(c) for c in absent[:12]) + (f" and {len(absent) - 12} more" if len(absent) > 12 else "")
        rows.append(f'<div class="rf-absent">Not found: {shown}</div>')
    return '<div class="rf-bars">' + "".join(rows) + "</div>"


def compare_table(result) -> str:
    a, b = result.methods
    fa, fb = result.fractions
    order = sorted(range(len(result.classes)), key=lambda i: -(fa[i] + fb[i]))
    rows = [f"<tr><th>class (pixels)</th><th>A: {html.escape(a)}</th><th>B: {html.escape(b)}</th></tr>"]
    for i in order:
        if fa[i] <= 0 and fb[i] <= 0:
            continue
        swatch = f'<span class="rf-swatch" style="display:inline-block;vertical-align:-2px;margin-right:6px;' \
                 f'background:{_rgb(result.colours[i])}"></span>'
        rows.append(f"<tr><td>{swatch}{html.escape(result.classes[i])}</td><td>{100 * fa[i]:.1f}%</td>"
                    f"<td>{100 * fb[i]:.1f}%</td></tr>")
    return '<table class="rf-table" id="compare-fractions">' + "".join(rows) + "</table>"


def layer_table(summary: dict) -> str:
    rows = ["<tr><th>layer</th><th>distraction</th><th>defocused</th><th>on distraction</th><th>max φ/τ</th></tr>"]
    for info in summary.get("layers", []):
        moved = info.get("query_attention_on_distraction")
        moved_s = f"{moved[0]:.3f}→{moved[1]:.3f}" if moved else "–"
        phi = info.get("max_phi_over_tau")
        rows.append(f"<tr><td>L{info['layer']}</td><td>{info.get('distraction', 0)}</td>"
                    f"<td>{info.get('defocused', 0)}</td><td>{moved_s}</td>"
                    f"<td>{'–' if phi is None else f'{phi:.2f}'}</td></tr>")
    note = ('<div class="rf-absent">distraction, defocused: tokens per layer; on distraction: the clicked point\'s '
            'attention on the distraction tokens, before → after redistribution; max φ/τ: the largest distraction '
            'score (above 1: distraction candidates)</div>')
    return '<table class="rf-table" id="inside-layers">' + "".join(rows) + "</table>" + note


def _unexpected(err: Exception) -> str:
    traceback.print_exc(file=sys.stderr)  # the server log keeps the traceback; the page gets one line
    detail = str(err).splitlines()[0] if str(err) else ""
    return (f"unexpected {type(err).__name__}{': ' + detail if detail else ''} "
            "(the server log has the traceback; please report it)")


def _message(err: Exception) -> str:
    if isinstance(err, RfclipError):
        return " ".join(str(err).split())
    if type(err).__name__ == "OutOfMemoryError":
        return "out of memory; use a smaller image, fewer classes or a larger crop stride"
    return _unexpected(err)


def _failure(err: Exception) -> str:
    return error_html(_message(err))


def _api_error(err: Exception) -> "gr.Error":
    """The error an API client (gradio_client) receives as an exception; the page shows the same words in its
    status line (yielded just before), so no second pop-up."""
    return gr.Error(_message(err), visible=False, print_exception=False)


def stop_check(app, request) -> "Callable[[], bool]":
    """True once ``request``'s client has cancelled it or disconnected: its event is no longer among the queue's
    running ones, or no longer alive. Gradio cannot stop a running function; the engine checks this between
    forward chunks (see :meth:`rfclip.demo.engine.DemoEngine.segment`)."""
    queue = getattr(app, "_queue", None)
    raw = getattr(request, "request", None)
    if queue is None or raw is None:
        return lambda: False
    event = next((ev for jobs in list(queue.active_jobs) for ev in (jobs or ()) if ev.request is raw), None)
    if event is None:
        return lambda: False

    def stopped() -> bool:
        return not event.alive or not any(jobs and event in jobs for jobs in list(queue.active_jobs))

    return stopped


def _thumbnail(image: Image.Image) -> Image.Image:
    """The picture shown for choosing a point: at most PREVIEW_SIDE on its long side (clicks are scaled back)."""
    image = image.copy()
    image.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
    return image


def example_image() -> str | None:
    path = resources.files("rfclip").joinpath("assets/examples/street.jpg")
    return str(path) if path.is_file() else None


# ---------------------------------------------------------------------------------------------- page
def build_app(engine: DemoEngine, method: str = "rfclip", settings: Settings | None = None):
    """The Gradio Blocks of the demo (not launched; see :func:`serve`)."""
    cfg = engine.base.config if engine.base is not None else None
    settings = settings or Settings()
    methods = method_choices(with_masks=engine.masks is not None)
    inside = inside_choices()
    dims_problem = engine.dims_problem(settings)
    if dims_problem:  # offer the methods that run with these weights; say why the others do not
        blocked = set(engine.methods_needing_dims())
        methods = [m for m in methods if m.split("+")[0] not in blocked]
        inside = [m for m in inside if m not in blocked]
        if method.split("+")[0] in blocked:
            method = "naclip" if "naclip" in methods else methods[0]
    if method not in methods:
        methods = [method, *methods]
    compare_a = "naclip" if "naclip" in methods else methods[0]
    compare_b = method if method != compare_a else methods[-1]
    inside_default = method if method in inside else (inside[0] if inside else None)

    def initial(name, fallback):
        value = getattr(settings, name)
        if value is not None:
            return value
        return getattr(cfg, name) if cfg is not None else fallback

    with gr.Blocks(title="rfclip demo", analytics_enabled=False, delete_cache=(1800, 3600)) as app:
        device = f" on {engine.info.device}" if engine.info.device else ""
        gr.Markdown(f"# rfclip · segment what you name\n"
                    f"Training-free open-vocabulary segmentation with CLIP (RF-CLIP, FSA and the methods they are "
                    f"compared with). Model: **{engine.info.label()}**{device} · rfclip {__version__}",
                    elem_classes=["rf-header"])
        if engine.unavailable:
            gr.HTML(f'<div class="rf-banner" id="no-model"><b>No model is loaded.</b> '
                    f'{html.escape(engine.unavailable)}<br>Start the demo with local weights, e.g. '
                    f'<code>rfclip demo --checkpoint ViT-B-16.pt</code> (OpenAI\'s file, an open_clip or '
                    f'.safetensors file, or a Hugging Face folder; see the README\'s "Checkpoints").</div>')
        if dims_problem:
            gr.HTML(f'<div class="rf-banner" id="no-dims"><b>RF-CLIP cannot run with these weights.</b> '
                    f'{html.escape(dims_problem)}<br>The methods offered here run without them: '
                    f'{html.escape(", ".join(m for m in methods if "+" not in m))}.</div>', elem_id="no-dims")
        image_size = gr.State(None)  # (height, width, shown height, shown width) of the upload: clicks scale back
        with gr.Row(equal_height=False):
            # ---------------------------------------------------------------- inputs, shared by the tabs
            with gr.Column(scale=4, min_width=320):
                image_file = gr.File(label="Image (JPEG, PNG, WebP, ...)", file_count="single", type="filepath",
                                     elem_id="image-file", height=110)
                preview = gr.Image(label="Your image", interactive=False, height=220, elem_id="preview",
                                   buttons=[], format="png")
                image_status = gr.HTML(elem_id="image-status")
                classes = gr.Textbox(label="Classes", lines=2, elem_id="classes",
                                     placeholder="road; car; tree; sky; building",
                                     info='";" or a new line between classes, "," between synonyms ("cat, kitty; '
                                          'dog"); without either, commas separate classes')
                vocabulary = gr.Dropdown([OWN_VOCABULARY, *VOCABULARIES], value=OWN_VOCABULARY,
                                         label="or a ready vocabulary", elem_id="vocabulary")
                example = example_image()
                if example:
                    gr.Examples([[example, "road; car; tree; sky; building"]], inputs=[image_file, classes],
                                label="Example", example_labels=["street drawing: road; car; tree; sky; building"])
                with gr.Accordion("Settings", open=False, elem_id="settings"):
                    pamr = gr.Checkbox(value=bool(initial("pamr", False)), label="PAMR (refine the masks)")
                    prob_thd = gr.Slider(0.0, 1.0, value=float(initial("prob_thd", 0.0)), step=0.01,
                                         label="Background threshold",
                                         info="pixels whose best class probability is below it get the first class")
                    with gr.Row():
                        short_side = gr.Number(value=initial("short_side", 336) or 0, precision=0, minimum=0,
                                               label="Short side (px)", info="0 keeps the size", elem_id="short-side")
                        slide_crop = gr.Number(value=initial("slide_crop", 224), precision=0, minimum=0,
                                               label="Crop (px)", info="0 = whole image")
                        slide_stride = gr.Number(value=initial("slide_stride", 112), precision=0, minimum=1,
                                                 label="Stride (px)")
                    options = gr.Textbox(value=settings.options, label="Method options", elem_id="options",
                                         placeholder="beta=0.6 gaussian_std=3",
                                         info="KEY=VALUE items, as --option on the command line; each method takes "
                                              "the ones it knows")
            # ---------------------------------------------------------------- the three views
            with gr.Column(scale=9):
                with gr.Tabs():
                    with gr.Tab("Segment", id="segment", elem_id="tab-segment"):
                        with gr.Row(equal_height=False, elem_classes=["rf-controls"]):
                            seg_method = gr.Dropdown(methods, value=method, label="Method", scale=3,
                                                     info=method_description(method), elem_id="segment-method")
                            seg_button = gr.Button("Segment", variant="primary", scale=1, elem_id="segment-run",
                                                   elem_classes=["rf-run"])
                        seg_status = gr.HTML(label="Status", elem_id="segment-status")
                        with gr.Row(equal_height=False):
                            with gr.Column(scale=3):
                                seg_overlay = gr.Image(label="Segmentation", show_label=False, interactive=False, elem_id="segment-overlay",
                                                       format="png", buttons=["fullscreen"])
                                seg_readout = gr.Markdown("Click a pixel of the result to read its class.", label="Pixel read-out",
                                                          elem_id="segment-readout")
                            with gr.Column(scale=2, min_width=260):
                                seg_bars = gr.HTML(label="Legend", elem_id="segment-fractions")
                                seg_files = gr.File(label="Downloads: mask PNG (class indices), JSON, overlay",
                                                    file_count="multiple", interactive=False,
                                                    elem_id="segment-files")
                        seg_reader = gr.State(None, time_to_live=3600)  # a result's pixels: freed after an hour
                        regions_button = seg_regions = None
                        if engine.masks is not None:  # demo --masks: the mask source's regions, on request
                            with gr.Accordion("Regions (the --masks source)", open=False, elem_id="regions"):
                                regions_button = gr.Button("Show the regions of the image", elem_id="regions-run")
                                seg_regions = gr.Image(show_label=False, interactive=False, elem_id="regions-image",
                                                       format="png", buttons=["fullscreen"])
                    with gr.Tab("Compare", id="compare", elem_id="tab-compare"):
                        with gr.Row(equal_height=False, elem_classes=["rf-controls"]):
                            cmp_a = gr.Dropdown(methods, value=compare_a, label="Method A", scale=2,
                                                elem_id="compare-a")
                            cmp_b = gr.Dropdown(methods, value=compare_b, label="Method B", scale=2,
                                                elem_id="compare-b")
                            cmp_button = gr.Button("Compare", variant="primary", scale=1, elem_id="compare-run",
                                                   elem_classes=["rf-run"])
                        cmp_status = gr.HTML(label="Status", elem_id="compare-status")
                        with gr.Row(equal_height=False):
                            cmp_img_a = gr.Image(label="A", interactive=False, elem_id="compare-image-a", format="png",
                                                 buttons=["fullscreen"])
                            cmp_img_b = gr.Image(label="B", interactive=False, elem_id="compare-image-b", format="png",
                                                 buttons=["fullscreen"])
                        with gr.Row(equal_height=False):
                            with gr.Column(scale=1):
                                cmp_diff = gr.Image(label="Where A and B disagree (magenta)", interactive=False,
                                                    elem_id="compare-disagreement", format="png",
                                                    buttons=["fullscreen"])
                            with gr.Column(scale=1):
                                cmp_table = gr.HTML(label="Class fractions", elem_id="compare-table")
                    with gr.Tab("Look inside", id="inside", elem_id="tab-inside"):
                        gr.Markdown("**Click a point of the image** to see where it attends in every layer, before "
                                    "and after RF-CLIP redistributes the attention its distraction tokens take, "
                                    "and which tokens RF-CLIP finds distracting (the RF-CLIP paper's figures, "
                                    "`rfclip explain`, for your point).")
                        with gr.Row(equal_height=False, elem_classes=["rf-controls"]):
                            in_method = gr.Dropdown(inside, value=inside_default, label="Method", scale=2,
                                                    elem_id="inside-method")
                            in_layers = gr.Textbox(value="all", label="Layers", scale=2, elem_id="inside-layers-text",
                                                   info='0-based, e.g. "0-5,11"')
                            in_button = gr.Button("Explain the centre", scale=2, elem_id="inside-run",
                                                  elem_classes=["rf-run"])
                        in_status = gr.HTML(label="Status", elem_id="inside-status")
                        with gr.Row(visible=False):  # the API's query point (/look_inside); none: the centre
                            point_x = gr.Number(None, label="Query point x (px)", elem_id="inside-point-x")
                            point_y = gr.Number(None, label="Query point y (px)", elem_id="inside-point-y")
                        with gr.Row(equal_height=False):
                            with gr.Column(scale=1):
                                in_click = gr.Image(label="Click a point", interactive=False, elem_id="inside-image",
                                                    format="png", buttons=["fullscreen"])
                            with gr.Column(scale=1, min_width=360):
                                in_table = gr.HTML(label="Layers", elem_id="inside-table")
                        in_figures = []
                        for key, title, caption in EXPLAIN_FIGURES:
                            gr.Markdown(f"**{title}.** {caption}", elem_classes=["rf-figure-title"])
                            in_figures.append(gr.Image(label=title, show_label=False, interactive=False,
                                                       elem_id=f"inside-{key}",
                                                       format="png", buttons=["download", "fullscreen"]))
        gr.Markdown("Requests run one at a time on the model; CPU inference takes seconds. Text embeddings are "
                    "cached. Command line: `rfclip segment IMAGE --classes \"...\" --out DIR` writes the same files. "
                    "With random or unusual weights the masks mean nothing; the mechanics still show.")

        knobs = [pamr, prob_thd, short_side, slide_crop, slide_stride, options]

        def page_settings(pamr_v, thd_v, short_v, crop_v, stride_v, options_v) -> Settings:
            return Settings(short_side=None if short_v is None else int(short_v),
                            slide_crop=None if crop_v is None else int(crop_v),
                            slide_stride=None if stride_v is None else int(stride_v),
                            prob_thd=thd_v, pamr=bool(pamr_v), options=options_v or "")

        def progress_fn(progress):
            return lambda fraction, text: progress(fraction, desc=text)

        # ------------------------------------------------------------------ handlers
        def on_upload(path):
            if not path:
                return None, None, None, ""
            try:
                image = read_image(path, engine.max_megapixels)
            except Exception as err:  # noqa: BLE001 - shown in the page
                return None, None, None, _failure(err)
            h, w = image.shape[:2]
            shown = _thumbnail(Image.fromarray(image))
            return shown, shown, (h, w, shown.height, shown.width), ok_html(f"{os.path.basename(path)}: {w} x {h} pixels")

        def on_vocabulary(label):
            if label == OWN_VOCABULARY or not label:
                return gr.update()  # keep what is typed (returning it could undo keys typed meanwhile)
            return vocabulary_text(label)

        # Each model handler yields its answer once; on an error it yields the page's status line and then raises
        # gr.Error, so that an API client (gradio_client) gets an exception, not HTML in a successful answer.
        def on_segment(path, classes_v, method_v, pamr_v, thd_v, short_v, crop_v, stride_v, options_v,
                       request: gr.Request, progress=gr.Progress()):
            knob_values = (pamr_v, thd_v, short_v, crop_v, stride_v, options_v)
            try:
                res = engine.segment(path, classes_v, method_v, page_settings(*knob_values), progress_fn(progress),
                                     should_stop=stop_check(app, request))
            except Exception as err:  # noqa: BLE001 - shown in the page; the server keeps serving
                yield _failure(err), None, "", "", None, None
                raise _api_error(err) from None
            present = sum(f > 0 for f in res.fractions)
            status = ok_html(f"{res.method}: {present} of {len(res.classes)} classes found in {res.seconds:.1f} s")
            yield (status, res.picture, fraction_bars(res.classes, res.fractions, res.colours),
                   "Click a pixel of the result to read its class.", [str(p) for p in res.files], res.reader)

        def on_regions(path):
            try:
                return engine.regions(path), ""
            except Exception as err:  # noqa: BLE001 - shown in the page
                return None, _failure(err)

        def on_read(reader, evt: gr.SelectData):
            if reader is None or evt.index is None:
                return ""
            x, y = (int(v) for v in evt.index[:2])
            return reader.read(x, y)

        def on_compare(path, classes_v, a, b, pamr_v, thd_v, short_v, crop_v, stride_v, options_v,
                       request: gr.Request, progress=gr.Progress()):
            knob_values = (pamr_v, thd_v, short_v, crop_v, stride_v, options_v)
            try:
                res = engine.compare(path, classes_v, a, b, page_settings(*knob_values), progress_fn(progress),
                                     should_stop=stop_check(app, request))
            except Exception as err:  # noqa: BLE001
                yield _failure(err), gr.update(value=None, label="A"), gr.update(value=None, label="B"), None, ""
                raise _api_error(err) from None
            status = ok_html(f"{a} and {b} give the same class to {100 * res.agreement:.1f}% of the pixels "
                             f"({res.seconds[0]:.1f} s and {res.seconds[1]:.1f} s)")
            yield (status, gr.update(value=res.overlays[0], label=f"A: {a}"),
                   gr.update(value=res.overlays[1], label=f"B: {b}"), res.disagreement, compare_table(res))

        def on_inside(path, method_v, layers_v, point, knob_values, request, progress):
            empty = [None] * len(EXPLAIN_FIGURES)
            try:
                res = engine.look_inside(path, point, method_v, layers_v, page_settings(*knob_values),
                                         progress_fn(progress), should_stop=stop_check(app, request))
            except Exception as err:  # noqa: BLE001
                yield [_failure(err), gr.update(), ""] + empty
                raise _api_error(err) from None
            qx, qy = res.summary["query_point"]
            row, col = res.summary["query_patch"]
            status = ok_html(f"{res.method}: point ({qx:.0f}, {qy:.0f}), patch row {row}, column {col}; "
                             f"{res.seconds:.1f} s")
            yield [status, _thumbnail(res.clicked), layer_table(res.summary)] + [res.figures.get(k) for k, _, _ in EXPLAIN_FIGURES]

        def on_click(path, size, method_v, layers_v, pamr_v, thd_v, short_v, crop_v, stride_v, options_v,
                     evt: gr.SelectData, request: gr.Request, progress=gr.Progress()):
            knob_values = (pamr_v, thd_v, short_v, crop_v, stride_v, options_v)
            point = None
            if evt.index is not None and size is not None:
                h, w, shown_h, shown_w = size
                x, y = float(evt.index[0]), float(evt.index[1])
                if (shown_h, shown_w) != (h, w):  # the picture shown is a thumbnail: back to image pixels
                    x, y = (x + 0.5) * w / shown_w, (y + 0.5) * h / shown_h
                point = (min(w - 1.0, x), min(h - 1.0, y))
            yield from on_inside(path, method_v, layers_v, point, knob_values, request, progress)

        def on_point(path, method_v, layers_v, x_v, y_v, pamr_v, thd_v, short_v, crop_v, stride_v, options_v,
                     request: gr.Request, progress=gr.Progress()):
            """The button (no point: the centre) and the API's /look_inside (a query point in image pixels)."""
            knob_values = (pamr_v, thd_v, short_v, crop_v, stride_v, options_v)
            point = None if x_v is None or y_v is None else (float(x_v), float(y_v))
            yield from on_inside(path, method_v, layers_v, point, knob_values, request, progress)

        # ------------------------------------------------------------------ wiring
        # The model's requests share one queue worker; the page's helpers run at once and are not API endpoints.
        model = dict(concurrency_id="model", concurrency_limit=1)
        helper = dict(queue=False, show_progress="hidden", api_visibility="private")
        image_file.change(on_upload, [image_file], [preview, in_click, image_size, image_status], **helper)
        vocabulary.change(on_vocabulary, [vocabulary], [classes], **helper)
        classes.input(lambda: OWN_VOCABULARY, None, [vocabulary], **helper)  # typed: no longer a ready vocabulary
        seg_method.change(lambda m: gr.update(info=method_description(m)), [seg_method], [seg_method], **helper)
        seg_outputs = [seg_status, seg_overlay, seg_bars, seg_readout, seg_files, seg_reader]
        seg_button.click(on_segment, [image_file, classes, seg_method, *knobs], seg_outputs, api_name="segment",
                         show_progress_on=[seg_overlay], **model)
        seg_overlay.select(on_read, [seg_reader], [seg_readout], **helper)
        if regions_button is not None:
            regions_button.click(on_regions, [image_file], [seg_regions, seg_status], api_name="regions",
                                 show_progress_on=[seg_regions], **model)
        cmp_button.click(on_compare, [image_file, classes, cmp_a, cmp_b, *knobs],
                         [cmp_status, cmp_img_a, cmp_img_b, cmp_diff, cmp_table], api_name="compare",
                         show_progress_on=[cmp_img_a, cmp_img_b], **model)
        in_outputs = [in_status, in_click, in_table, *in_figures]
        in_click.select(on_click, [image_file, image_size, in_method, in_layers, *knobs], in_outputs,
                        show_progress_on=[in_click], api_visibility="private", **model)
        in_button.click(on_point, [image_file, in_method, in_layers, point_x, point_y, *knobs], in_outputs,
                        api_name="look_inside", show_progress_on=[in_click], **model)
    return app


def theme():
    system = ["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica", "Arial", "sans-serif"]
    mono = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"]
    return gr.themes.Soft(primary_hue="indigo", neutral_hue="slate", font=system, font_mono=mono)


def serve(app, host: str = "127.0.0.1", port: int | None = None, allowed_paths: list[str] | None = None,
          auth: tuple[str, str] | None = None):
    """Start the server in the background; returns the local URL (see :func:`rfclip.demo.launch` to block).
    ``auth``: a (user, password) pair the page asks for (Gradio's login); none: no authentication."""
    app.queue(default_concurrency_limit=1, max_size=64)
    example = example_image()
    allowed = list(allowed_paths or []) + ([str(Path(example).parent)] if example else [])
    try:
        _, url, _ = app.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True,
                               show_error=False, ssr_mode=False, share=False, inbrowser=False, theme=theme(), css=CSS,
                               allowed_paths=allowed, footer_links=[], max_file_size="256mb",
                               auth=auth)
    except OSError as err:
        detail = (str(err).splitlines() or [type(err).__name__])[0].split(". ")[0].rstrip(".")
        raise RfclipError(f"cannot serve on {host}:{port or 'any port'}: {detail}; "
                          "choose another --port (or stop the program that uses it)") from None
    return url
