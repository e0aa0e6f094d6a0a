"""The web demo without a browser: its engine (Segment, Compare, Look inside on one loaded model), bad input in the
CLI's words, the page's construction and ``rfclip demo``'s start-up (weights missing offline, address in use).
The browser drives the running page in test_demo_browser.py."""

from __future__ import annotations

import copy
import json
import re
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from rfclip.cli import main
from rfclip.demo.engine import (VOCABULARIES, DemoEngine, ModelInfo, Settings, inside_choices, method_choices,
                                read_image, vocabulary_text)
from rfclip.errors import RfclipError
from rfclip.segmenter import Segmenter
from rfclip.text import parse_classes

DIMS = "distraction_dims=5,20,41"
FAST = dict(short_side=224)


@pytest.fixture(scope="module")
def engine(tiny_clip, tmp_path_factory):
    clip = copy.deepcopy(tiny_clip)
    with torch.no_grad():  # planted distraction tokens, so that Look inside has something to show
        for t in (20, 21, 100, 150):
            clip.model.visual.positional_embedding[1 + t, 20] += 60.0
    base = Segmenter(clip, method="clip", device="cpu", text_cache=False, templates=["a photo of a {}."])
    return DemoEngine(base, ModelInfo("tiny", None, "tiny.safetensors", "cpu"),
                      out_root=tmp_path_factory.mktemp("demo-out"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-in")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (150, 200, 3), dtype=np.uint8)).save(root / "photo.png")
    (root / "notes.txt").write_text("not an image\n")
    (root / "broken.png").write_bytes((root / "photo.png").read_bytes()[:300])
    return root


def settings(**kw) -> Settings:
    return Settings(**{**FAST, **kw})


# ---------------------------------------------------------------------------------------------- the three views
def test_segment_writes_the_files_rfclip_segment_writes(engine, images):
    res = engine.segment(str(images / "photo.png"), "red;green, lime;blue", "naclip", settings())
    assert res.method == "naclip" and res.classes == ["red", "green", "blue"]
    assert sorted(p.name for p in res.files) == ["photo.json", "photo_mask.png", "photo_overlay.png"]
    record = json.loads(next(p for p in res.files if p.suffix == ".json").read_text())
    assert record["image"] == "photo.png" and record["method"] == "naclip"
    assert record["image_size"] == {"width": 200, "height": 150} and record["settings"]["short_side"] == 224
    assert record["classes"][1]["synonyms"] == ["green", "lime"]
    with Image.open(next(p for p in res.files if p.name.endswith("_mask.png"))) as im:
        mask = np.asarray(im)
    assert im.mode == "P" and mask.shape == (150, 200)
    np.testing.assert_array_equal(mask, res.reader.mask)
    assert res.fractions == pytest.approx(list(record["fractions"].values()))
    assert sum(res.fractions) == pytest.approx(1.0) and res.colours.shape == (3, 3)
    with Image.open(res.overlay) as im:
        assert im.height == 150 and im.width > 200  # the file has its legend panel
    assert res.picture.size == (200, 150)  # the page shows the legend beside the picture
    # Reading a pixel: its class and the probability of that class.
    name = res.classes[int(mask[10, 20])]
    text = res.reader.read(20, 10)
    assert f"**{name}**" in text and "probability" in text
    p = float(text.rsplit(" ", 1)[1])
    assert 1 / 3 - 0.01 <= p <= 1.0
    assert "outside the 200 x 150 image" in res.reader.read(250, 10)


def test_method_switch_reuses_the_loaded_model(engine):
    a = engine.segmenter("naclip", settings())
    b = engine.segmenter("rfclip", settings(options=DIMS))
    c = engine.segmenter("naclip+fsa", settings(pamr=True))
    for seg in (a, b, c):
        assert seg.clip is engine.base.clip and seg.encoder is engine.base.encoder and seg.text is engine.base.text
    assert (a.method_name, b.method_name, c.method_name) == ("naclip", "rfclip", "naclip+fsa")
    assert c.config.pamr and not a.config.pamr and a.config.short_side == 224
    assert engine.segmenter("naclip", settings()).method is a.method  # built once per method and options
    # Page options go to the methods that take them; a name no method takes is an error.
    assert engine.segmenter("rfclip", settings(options=DIMS + " beta=0.6")).method.beta == 0.6
    assert engine.segmenter("naclip", settings(options=DIMS + " beta=0.6")).method_name == "naclip"
    with pytest.raises(RfclipError, match="unknown method option.*alpah"):
        engine.segmenter("rfclip", settings(options="alpah=0.6"))


def test_compare_marks_disagreement(engine, images):
    res = engine.compare(str(images / "photo.png"), "red;green;blue", "clip", "naclip", settings())
    assert res.methods == ("clip", "naclip") and 0.0 <= res.agreement <= 1.0
    assert all(im.size == (200, 150) for im in (*res.overlays, res.disagreement))
    marked = np.asarray(res.disagreement).reshape(-1, 3)
    magenta = (marked[:, 0] > 150) & (marked[:, 1] < 130) & (marked[:, 2] > 150)
    assert magenta.mean() <= 1.0 - res.agreement + 0.05
    assert all(sum(f) == pytest.approx(1.0) for f in res.fractions)
    same = engine.compare(str(images / "photo.png"), "red;green;blue", "naclip", "naclip", settings())
    assert same.agreement == 1.0


def test_look_inside_draws_explain_pictures_for_the_point(engine, images):
    res = engine.look_inside(str(images / "photo.png"), (150.0, 30.0), "rfclip", "0-1", settings(options=DIMS))
    assert {"attention", "tokens", "phi", "fiedler", "self_attention", "embedding_weights"} <= set(res.figures)
    assert [e["layer"] for e in res.summary["layers"]] == [0, 1]
    assert res.summary["layers"][0]["distraction"] > 0 and res.summary["layers"][0]["redistributed"]
    assert res.summary["query_point"] == [150.0, 30.0] and res.clicked.size == (200, 150)
    centre = engine.look_inside(str(images / "photo.png"), None, "rfclip", "all", settings(options=DIMS))
    assert centre.summary["query_point"] == [100.0, 75.0] and len(centre.summary["layers"]) == 3
    assert "rfclip" in inside_choices() and "naclip" not in inside_choices()


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("case, expected", [
    ("text file", "cannot read image notes.txt"),
    ("broken", "cannot read image broken.png"),
    ("no image", "no image; upload an image"),
    ("empty classes", "empty class list"),
    ("duplicate class", "class 'red' is listed twice"),
    ("unknown method", "unknown method 'nope'"),
    ("bad option", "bad --option 'alpha'"),
    ("bad setting", "slide stride must be a positive number"),
    ("huge", "the demo takes images up to 0.01 MP"),
])
def test_bad_input_is_one_clear_message(engine, images, case, expected):
    path, classes, method, page = str(images / "photo.png"), "red;green", "naclip", settings()
    if case == "text file":
        path = str(images / "notes.txt")
    elif case == "broken":
        path = str(images / "broken.png")
    elif case == "no image":
        path = None
    elif case == "empty classes":
        classes = " ; , "
    elif case == "duplicate class":
        classes = "red;green;red"
    elif case == "unknown method":
        method = "nope"
    elif case == "bad option":
        page = settings(options="alpha")
    elif case == "bad setting":
        page = settings(slide_stride=0)
    big = DemoEngine(engine.base, engine.info, max_megapixels=0.01, out_root=engine.out_root) if case == "huge" else engine
    with pytest.raises(RfclipError) as info:
        big.segment(path, classes, method, page)
    message = str(info.value)
    assert expected in message and "\n" not in message
    assert str(images) not in message  # the upload's name, never the server's path
    # ... and the next request still works.
    assert engine.segment(str(images / "photo.png"), "red;green", "naclip", settings()).classes == ["red", "green"]


def test_look_inside_bad_input(engine, images):
    photo = str(images / "photo.png")
    with pytest.raises(RfclipError, match="layers: cannot read 'x'"):
        engine.look_inside(photo, None, "rfclip", "x", settings(options=DIMS))
    with pytest.raises(RfclipError, match="out of range"):
        engine.look_inside(photo, None, "rfclip", "7", settings(options=DIMS))
    with pytest.raises(RfclipError, match="outside"):
        engine.look_inside(photo, (500.0, 5.0), "rfclip", "all", settings(options=DIMS))
    with pytest.raises(RfclipError, match="explain draws RF-CLIP"):
        engine.look_inside(photo, None, "naclip", "all", settings())
    with pytest.raises(RfclipError, match="no distraction dimensions"):
        engine.look_inside(photo, None, "rfclip", "all", settings())


def test_read_image_size_limit_reads_only_the_header(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (4000, 3000)).save(path)
    with pytest.raises(RfclipError, match=r"big.png is 4000x3000 pixels \(12 MP\); the demo takes images up to 10 MP"):
        read_image(path, max_megapixels=10)
    assert read_image(path, max_megapixels=12).shape == (3000, 4000, 3)


def test_unavailable_model_answers_every_request_with_the_reason(images):
    engine = DemoEngine(None, ModelInfo("ViT-B-16", "openai"), unavailable="weights missing; use --checkpoint FILE")
    for call in (lambda: engine.segment(str(images / "photo.png"), "a;b", "rfclip", Settings()),
                 lambda: engine.compare(str(images / "photo.png"), "a;b", "clip", "rfclip", Settings()),
                 lambda: engine.look_inside(str(images / "photo.png"), None, "rfclip", "all", Settings())):
        with pytest.raises(RfclipError, match="use --checkpoint FILE"):
            call()


def test_vocabularies_and_method_lists():
    for label, name in VOCABULARIES.items():
        text = vocabulary_text(label)
        from rfclip.data import DATASETS

        assert len(parse_classes(text)) == DATASETS[name].num_classes, label
    assert vocabulary_text("Cityscapes (19)").startswith("road; sidewalk; building")
    choices = method_choices()
    assert {"rfclip", "naclip", "clip", "rfclip+fsa", "naclip+fsa", "rfclip_release"} <= set(choices)
    assert "rfclip_release+fsa" not in choices  # fsa cannot wrap a method that computes its own last layer


# ---------------------------------------------------------------------------------------------- page and command
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_page_builds_with_every_view(engine):
    gr = pytest.importorskip("gradio")
    from rfclip.demo.app import build_app, fraction_bars

    app = build_app(engine, method="rfclip", settings=Settings(options=DIMS))
    ids = {getattr(b, "elem_id", None) for b in app.blocks.values()}
    assert {"image-file", "classes", "vocabulary", "segment-run", "segment-overlay", "segment-fractions",
            "segment-files", "compare-run", "compare-disagreement", "inside-image", "inside-attention",
            "inside-tokens", "inside-phi"} <= ids
    assert isinstance(app, gr.Blocks)
    bars = fraction_bars(["road", "sky", "car"], [0.75, 0.25, 0.0], np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]]))
    assert bars.index("road") < bars.index("sky") and "75.0%" in bars and "Not found: car" in bars


def _demo_args(monkeypatch):
    """Run `rfclip demo` until the page is served, then stop it as Ctrl+C would; returns what was served."""
    from rfclip.demo import app as demo_app

    served = {}

    def fake_serve(app, host, port, allowed_paths=None, auth=None):
        served.update(app=app, host=host, port=port, auth=auth)
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_app, "serve", fake_serve)
    return served


def test_demo_offline_without_weights_serves_a_page_that_says_how_to_start(monkeypatch, tmp_path, capsys):
    pytest.importorskip("gradio")
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    served = _demo_args(monkeypatch)
    code = main(["demo", "--device", "cpu", "--port", str(_free_port())])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "no model loaded" in err and "--checkpoint" in err
    banner = [b for b in served["app"].blocks.values() if getattr(b, "elem_id", None) is None
              and "No model is loaded" in str(getattr(b, "value", ""))]
    assert banner and "rfclip demo --checkpoint" in banner[0].value and "not in the local cache" in banner[0].value


def test_demo_command_errors_before_loading(monkeypatch, tmp_path, capsys):
    pytest.importorskip("gradio")
    _demo_args(monkeypatch)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["demo", "--checkpoint", str(tmp_path / "missing.pt"), "--port", str(port)])
        assert code == 2 and "checkpoint not found" in capsys.readouterr().err
        (tmp_path / "w.pt").write_bytes(b"x")
        code = main(["demo", "--checkpoint", str(tmp_path / "w.pt"), "--port", str(port)])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and f"cannot serve on 127.0.0.1:{port}" in err
    for argv, expected in ((["--method", "nope"], "unknown method 'nope'"),
                           (["--option", "alpah=1"], "unknown option(s) alpah"),
                           (["--port", "70000"], "expected a port number")):
        code = main(["demo", *argv])
        err = capsys.readouterr().err
        assert code == 2 and expected in err and err.count("\n") == 1, err


def test_demo_without_gradio_says_how_to_install(monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_gradio(name, *args, **kwargs):
        if name == "gradio" or name.startswith("gradio."):
            raise ImportError("No module named 'gradio'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gradio)
    monkeypatch.delitem(__import__("sys").modules, "rfclip.demo.app", raising=False)
    code = main(["demo"])
    err = capsys.readouterr().err
    assert code == 2 and 'pip install "rfclip[demo]"' in err and err.count("\n") == 1


def test_model_label():
    info = ModelInfo("ViT-B-16", None, "/w/ViT-B-16.pt", "cpu")
    assert info.label() == "ViT-B-16 (checkpoint ViT-B-16.pt)"


# ---------------------------------------------------------------------------------------------- limits and the API
def test_a_request_over_the_limits_is_refused_naming_the_limit(engine, images):
    from rfclip.demo.engine import Limits

    photo = str(images / "photo.png")
    tight = DemoEngine(engine.base, engine.info, out_root=engine.out_root,
                       limits=Limits(max_classes=2, max_prompts=3, max_short_side=512, max_crops=50))
    cases = [
        (lambda: tight.segment(photo, "a;b;c", "naclip", settings()), "over this demo's limit of 2 per request (--max-classes)"),
        (lambda: tight.segment(photo, "a,b;c,d", "naclip", settings()), "(--max-prompts)"),
        (lambda: tight.segment(photo, "a;b", "naclip", settings(short_side=2048)), "short side 2048 is over this demo's limit of 512 px (--max-short-side)"),
        (lambda: tight.segment(photo, "a;b", "naclip", settings(slide_stride=1)), "(--max-crops)"),
        (lambda: tight.compare(photo, "a;b", "clip", "naclip", settings(slide_stride=2)), "(--max-crops)"),
    ]
    for call, expected in cases:
        with pytest.raises(RfclipError, match=re.escape(expected)):
            call()
    tight.segment(photo, "a;b", "naclip", settings(short_side=0, slide_crop=0))  # its own 150 px: within them
    pamr = DemoEngine(engine.base.with_config(pamr_steps=50), engine.info, out_root=engine.out_root,
                      limits=Limits(max_pamr_steps=20))
    with pytest.raises(RfclipError, match=re.escape("50 PAMR steps is over this demo's limit of 20 (--max-pamr-steps)")):
        pamr.segment(photo, "a;b", "naclip", settings(pamr=True))


def test_a_cancelled_request_stops_between_forward_chunks_and_the_next_is_served(engine, images):
    from rfclip.demo.engine import Limits, RequestStopped

    photo = str(images / "photo.png")
    big = DemoEngine(engine.base.with_config(batch_size=2), engine.info, out_root=engine.out_root,
                     limits=Limits(max_crops=10**7, max_short_side=4096))
    asked = []

    def cancelled_after_three_chunks():
        asked.append(1)
        return len(asked) > 3

    with pytest.raises(RequestStopped, match="cancelled"):  # about 300,000 crops: it stops after 3 chunks
        big.segment(photo, "a;b", "naclip", settings(short_side=1024, slide_stride=1),
                    should_stop=cancelled_after_three_chunks)
    assert len(asked) == 4 and not big._lock.locked()
    assert big.segment(photo, "a;b", "naclip", settings()).classes == ["a", "b"]
    late = DemoEngine(engine.base, engine.info, out_root=engine.out_root, limits=Limits(request_seconds=1e-9))
    with pytest.raises(RfclipError, match=re.escape("this demo's limit per request (--request-timeout)")):
        late.segment(photo, "a;b", "naclip", settings())


@pytest.fixture(scope="module")
def served(engine, tiny_clip, tmp_path_factory):
    """The page served over HTTP (distraction dims given as a method option), with limits raised so that one
    request can run for minutes."""
    pytest.importorskip("gradio")
    from gradio_client import Client

    from rfclip.demo.app import build_app, serve
    from rfclip.demo.engine import Limits

    eng = DemoEngine(engine.base.with_config(batch_size=2), engine.info, out_root=tmp_path_factory.mktemp("served"),
                     limits=Limits(max_crops=10**7, max_short_side=4096, max_classes=3))
    app = build_app(eng, method="rfclip", settings=Settings(options=DIMS))
    url = serve(app, "127.0.0.1", _free_port())
    try:
        yield eng, app, Client(url, verbose=False, download_files=False)
    finally:
        app.close()


def _knobs(short_side=224, stride=112):
    return dict(pamr_v=False, thd_v=0.0, short_v=short_side, crop_v=224, stride_v=stride, options_v="")


def test_api_errors_are_errors_and_outputs_have_names(served, images):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    eng, app, client = served
    photo = handle_file(str(images / "photo.png"))
    with pytest.raises(AppError, match=re.escape("(--max-classes)")):
        client.predict(photo, "a;b;c;d", "naclip", *_knobs().values(), api_name="/segment")
    with pytest.raises(AppError, match="cannot read image notes.txt"):
        client.predict(handle_file(str(images / "notes.txt")), "a;b", "naclip", *_knobs().values(), api_name="/segment")
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    returns = [r["label"] for r in api["/segment"]["returns"]]
    assert len(returns) == 5 and returns[:4] == ["Status", "Segmentation", "Legend", "Pixel read-out"], returns
    assert not any(r.startswith("value_") for e in api.values() for r in (x["label"] for x in e["returns"]))
    params = [p["label"] for p in api["/look_inside"]["parameters"]]
    assert "Query point x (px)" in params and "Query point y (px)" in params
    status, *_ = client.predict(photo, "a;b", "naclip", *_knobs().values(), api_name="/segment")
    assert "naclip:" in status and "Error" not in status


def test_api_look_inside_takes_the_query_point(served, images):
    from gradio_client import handle_file

    eng, app, client = served
    out = client.predict(handle_file(str(images / "photo.png")), "rfclip", "all", 30.0, 20.0,
                         False, 0.0, 224, 224, 112, DIMS, api_name="/look_inside")
    assert "point (30, 20)" in out[0], out[0]


def test_api_cancelled_request_frees_the_model_for_the_next(served, images):
    import time

    from gradio_client import handle_file

    eng, app, client = served
    photo = handle_file(str(images / "photo.png"))
    job = client.submit(photo, "a;b", "naclip", *_knobs(short_side=1024, stride=1).values(), api_name="/segment")
    deadline = time.monotonic() + 60
    while not eng._lock.locked():  # the long request holds the model
        assert time.monotonic() < deadline, "the long request never started"
        time.sleep(0.05)
    job.cancel()
    quick = client.submit(photo, "a;b", "naclip", *_knobs().values(), api_name="/segment")
    status, *_ = quick.result(timeout=120)  # a guard against a hang, not a timing: waiting would take hours
    assert "naclip: " in status, status


def test_page_says_when_the_weights_have_no_distraction_dims(engine):
    pytest.importorskip("gradio")
    from rfclip.demo.app import build_app

    def element(app, elem_id):
        return next(b for b in app.blocks.values() if getattr(b, "elem_id", None) == elem_id)

    app = build_app(engine, method="rfclip")  # random weights: no built-in, calibrated or given dims
    banner = element(app, "no-dims")
    assert "RF-CLIP cannot run with these weights" in banner.value and "rfclip calibrate" in banner.value
    method = element(app, "segment-method")
    choices = [c[0] if isinstance(c, tuple) else c for c in method.choices]
    assert method.value == "naclip" and "rfclip" not in choices and "naclip" in choices
    with_dims = build_app(engine, method="rfclip", settings=Settings(options=DIMS))
    assert element(with_dims, "segment-method").value == "rfclip"
    assert not any(getattr(b, "elem_id", None) == "no-dims" for b in with_dims.blocks.values())


def test_demo_warns_without_authentication_on_the_network(monkeypatch, tmp_path, capsys, images):
    pytest.importorskip("gradio")
    served = _demo_args(monkeypatch)
    monkeypatch.setattr("rfclip.cli.demo.check_address", lambda host, port: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HOME", str(tmp_path))
    code = main(["demo", "--device", "cpu", "--host", "0.0.0.0", "--max-crops", "9", "--port", str(_free_port())])
    err = capsys.readouterr().err
    assert code == 0 and "has no authentication" in err and "--auth USER:PASSWORD" in err
    code = main(["demo", "--device", "cpu", "--host", "0.0.0.0", "--auth", "ana:s3cret", "--port", str(_free_port())])
    err = capsys.readouterr().err
    assert code == 0 and "no authentication" not in err and served["auth"] == ("ana", "s3cret")
    assert main(["demo", "--auth", "nopassword"]) == 2


def test_demo_on_sigterm_removes_its_request_folders_and_uploads(tiny_clip, tmp_path, images):
    """`timeout`, docker and systemd stop the demo with SIGTERM: it must clean up as on Ctrl+C, uploads included."""
    pytest.importorskip("gradio")
    import signal
    import subprocess
    import sys
    import time

    from gradio_client import Client, handle_file
    from safetensors.torch import save_file

    ckpt = tmp_path / "tiny.safetensors"
    save_file({k: v.half().contiguous() for k, v in tiny_clip.model.state_dict().items()}, str(ckpt))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    port = _free_port()
    env = {**__import__("os").environ, "TMPDIR": str(scratch), "RFCLIP_CACHE": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1"}
    env.pop("GRADIO_TEMP_DIR", None)
    proc = subprocess.Popen([sys.executable, "-m", "rfclip", "demo", "--checkpoint", str(ckpt), "--device", "cpu",
                             "--short-side", "64", "--method", "naclip", "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        for line in proc.stdout:  # wait until it serves
            if "serving on" in line:
                break
            assert time.monotonic() < deadline, "the demo did not start"
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False)
        status, *_ = client.predict(handle_file(str(images / "photo.png")), "a;b", "naclip", False, 0.0, 64, 224, 112,
                                    "", api_name="/segment")
        assert "naclip:" in status
        assert any(scratch.rglob("photo*.png"))  # an upload and a request folder exist now
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert sorted(p.name for p in scratch.iterdir()) == [], sorted(map(str, scratch.rglob("*")))  # nothing left
