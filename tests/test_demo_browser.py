"""``rfclip demo`` in a real browser: the command runs as a subprocess on 127.0.0.1 with a random-weight ViT-B/16
checkpoint, and Debian's headless Chromium (driven by Selenium through Debian's chromedriver; nothing is downloaded)
uses the page as a person would: upload, classes, Segment, Compare, a click in Look inside, a text file instead of
an image, then a valid request again.

One server and one browser for the whole session (one test function, so that pytest-xdist cannot split it).
The checkpoint has ViT-B/16's image encoder and a shrunk text encoder (as in test_cli.py), saved as an OpenAI-layout
safetensors file. Distraction tokens are planted in every layer, as in real CLIP: six patches' positional
embeddings over-activate distraction dimension 162, and in each block one MLP unit that fires only on such tokens
writes dimension 162 again (the "massive activation" path), so Look inside has distraction tokens in every layer.

With ``RFCLIP_DEMO_SCREENSHOTS=DIR`` the test saves the three views as PNGs into DIR (docs/ holds the README's).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from rfclip.constants import DISTRACTION_DIMS

CHROMIUM = os.environ.get("RFCLIP_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("RFCLIP_CHROMEDRIVER", "/usr/bin/chromedriver")
DIMS = DISTRACTION_DIMS[("ViT-B-16", "openai")]
PLANTED = [(2, 3), (2, 10), (7, 12), (11, 2), (12, 8), (5, 6)]  # (row, column) on the 14 x 14 grid
CLASSES = "road; car; tree; sky; building"
REQUEST_TIMEOUT = 300  # seconds; CPU inference on shared CI cores


def _missing() -> str | None:
    for module, hint in (("gradio", 'pip install "rfclip[demo]"'), ("selenium", 'pip install "rfclip[test]"')):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed ({hint})"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return f"{path} not found (apt-get install chromium chromium-driver)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=f"browser test needs: {_missing()}")


# ---------------------------------------------------------------------------------------------- files
def planted_vitb16_checkpoint(path: Path) -> Path:
    """A random ViT-B/16 image tower (1-layer text tower) with distraction tokens planted in every layer, saved as
    fp16 safetensors in open_clip's layout."""
    from safetensors.torch import save_file
    from test_cli import VIT_B16_IMAGE_TINY_TEXT

    from rfclip.models.loading import random_clip
    from rfclip.testing import plant_distraction_tokens

    clip = plant_distraction_tokens(random_clip(VIT_B16_IMAGE_TINY_TEXT), [r * 14 + c for r, c in PLANTED], DIMS)
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in clip.model.state_dict().items()}, str(path))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- browser helpers
class Page:
    """Selenium over the demo page: waits, tabs, uploads, texts of elements by id."""

    def __init__(self, driver):
        from selenium.webdriver.common.by import By

        self.d, self.By = driver, By

    def wait(self, condition, what: str, timeout: float = REQUEST_TIMEOUT):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                value = condition()
                if value:
                    return value
            except Exception as err:  # noqa: BLE001 - the element may be re-rendering
                last = err
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what} (last error: {last!r})")

    def el(self, css: str):
        return self.d.find_element(self.By.CSS_SELECTOR, css)

    def els(self, css: str):
        return self.d.find_elements(self.By.CSS_SELECTOR, css)

    def text(self, elem_id: str) -> str:
        return self.el(f"#{elem_id}").text

    def tab(self, name: str) -> None:
        button = next(b for b in self.els("button[role=tab]") if b.text.strip() == name)
        button.click()
        self.wait(lambda: button.get_attribute("aria-selected") == "true", f"tab {name}", 20)

    def upload(self, path: Path) -> None:
        if not self.els("#image-file input[type=file]"):  # a file is there: clear it first
            self.el('#image-file button[aria-label="Clear"]').click()
        field = self.wait(lambda: self.el("#image-file input[type=file]"), "the upload field", 20)
        field.send_keys(str(path))

    def image_loaded(self, elem_id: str):
        """The <img> of an image component once it shows a picture, else None."""
        imgs = self.els(f"#{elem_id} img")
        ok = imgs and self.d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", imgs[0])
        return imgs[0] if ok else None

    def click_at(self, element, fx: float, fy: float) -> None:
        """Click at (fx, fy) of the element's size from its centre (scrolled into view first: WebDriver offsets are
        from the centre of the element's visible part)."""
        from selenium.webdriver.common.action_chains import ActionChains

        self.d.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
        time.sleep(0.3)
        size = element.size
        ActionChains(self.d).move_to_element_with_offset(element, round(fx * size["width"]),
                                                         round(fy * size["height"])).click().perform()

    def natural_size(self, img) -> tuple[int, int]:
        return tuple(self.d.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", img))

    def answer_number(self, elem_id: str) -> str | None:
        found = self.els(f"#{elem_id} [data-request]")
        return found[0].get_attribute("data-request") if found else None

    def run(self, button_id: str, status_id: str, timeout: float = REQUEST_TIMEOUT) -> tuple[str, float]:
        """Click a button and wait for the new answer in the status line; returns its text and the seconds."""
        before = self.answer_number(status_id)
        t0 = time.monotonic()
        self.el(f"#{button_id}").click()
        self.wait(lambda: self.answer_number(status_id) not in (None, before), f"an answer in #{status_id}", timeout)
        return self.text(status_id), time.monotonic() - t0

    def set_classes(self, text: str) -> None:
        box = self.el("#classes textarea")
        box.clear()
        if text:
            box.send_keys(text)

    def shot(self, folder: str | None, name: str, height: int | None = None) -> None:
        if not folder:
            return
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.d.set_window_size(1280, height or 1000)
        time.sleep(0.5)
        self.d.execute_script("window.scrollTo(0, 0)")
        time.sleep(0.5)
        self.d.save_screenshot(str(Path(folder) / name))


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    """`rfclip demo` as a subprocess; yields (url, seconds from start to the page being served)."""
    root = tmp_path_factory.mktemp("demo-browser")
    ckpt = planted_vitb16_checkpoint(root / "vitb16_planted.safetensors")
    port = _free_port()
    env = dict(os.environ, RFCLIP_CACHE=str(root / "cache"), GRADIO_ANALYTICS_ENABLED="False",
               HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "rfclip", "demo", "--checkpoint", str(ckpt), "--device", "cpu",
           "--host", "127.0.0.1", "--port", str(port), "--short-side", "224",
           "--option", "distraction_dims=" + ",".join(map(str, DIMS))]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    url = None
    try:
        deadline = time.monotonic() + 240
        while url is None and time.monotonic() < deadline:
            if proc.poll() is not None:
                time.sleep(0.2)
                raise AssertionError(f"rfclip demo exited with {proc.returncode}:\n{''.join(log)}")
            found = [m.group(1) for line in log if (m := re.search(r"serving on (http\S+)", line))]
            url = found[0] if found else None
            time.sleep(0.1)
        assert url, f"rfclip demo did not start in time:\n{''.join(log)}"
        yield url, time.monotonic() - t0, proc, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never download a browser or a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--hide-scrollbars",
                "--window-size=1280,900", "--force-device-scale-factor=1", "--disable-extensions",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


# ---------------------------------------------------------------------------------------------- the session
def test_demo_in_a_browser(demo_server, browser, tmp_path):
    url, start_seconds, proc, log = demo_server
    shots = os.environ.get("RFCLIP_DEMO_SCREENSHOTS")
    page = Page(browser)
    example = Path(__file__).resolve().parents[1] / "src/rfclip/assets/examples/street.jpg"
    notes = tmp_path / "notes.txt"
    notes.write_text("these are my notes, not a picture\n")
    timings = {"server start to serving (s)": start_seconds}

    t0 = time.monotonic()
    browser.get(url)
    page.wait(lambda: page.els("#segment-run"), "the page", 120)
    timings["page load (s)"] = time.monotonic() - t0
    assert browser.title == "rfclip demo"

    # ---- Segment: upload, a ready vocabulary, own classes, run.
    page.upload(example)
    page.wait(lambda: "640 x 426 pixels" in page.text("image-status"), "the upload's preview", 60)
    assert page.image_loaded("preview")
    page.el("#vocabulary input").click()
    option = page.wait(lambda: next((o for o in page.els("[role=option]") if o.text.startswith("Cityscapes")), None),
                       "the vocabulary list", 20)
    option.click()
    page.wait(lambda: page.el("#classes textarea").get_attribute("value").startswith("road; sidewalk; building"),
              "the Cityscapes classes in the box", 20)
    page.set_classes(CLASSES)
    page.wait(lambda: page.el("#vocabulary input").get_attribute("value").startswith("your own"),
              "the vocabulary choice to follow the typing", 20)
    assert page.el("#classes textarea").get_attribute("value") == CLASSES
    status, timings["Segment (s)"] = page.run("segment-run", "segment-status")
    assert "Error" not in status and status.startswith("rfclip:"), status
    overlay = page.wait(lambda: page.image_loaded("segment-overlay"), "the overlay")
    assert page.natural_size(overlay) == (640, 426)
    bars = page.wait(lambda: page.els("#segment-fractions .rf-bar"), "the fraction bars", 20)
    names = [b.get_attribute("data-class") for b in bars]
    percents = [float(b.find_element(page.By.CSS_SELECTOR, ".rf-pct").text.rstrip("%")) for b in bars]
    assert names and set(names) <= {"road", "car", "tree", "sky", "building"}
    assert sum(percents) == pytest.approx(100.0, abs=0.3) and percents == sorted(percents, reverse=True)
    absent = page.text("segment-fractions").split("Not found:")[1:] or [""]
    assert set(names) | {n.strip() for n in absent[0].split(",") if n.strip()} == {"road", "car", "tree", "sky",
                                                                                    "building"}
    links = page.wait(lambda: page.els("#segment-files a[download]"), "the downloads", 20)
    assert {a.get_attribute("download") for a in links} == {"street_mask.png", "street.json", "street_overlay.png"}
    page.click_at(overlay, -0.25, 0.0)
    readout = page.wait(lambda: (lambda t: t if "probability" in t else None)(page.text("segment-readout")),
                        "the pixel read-out", 30)
    assert re.search(r"Pixel \(\d+, \d+\): (road|car|tree|sky|building), probability 0\.\d\d", readout), readout
    page.shot(shots, "demo_segment.png")

    # ---- Compare: naclip vs rfclip on the same image and classes.
    page.tab("Compare")
    status, timings["Compare, 2 methods (s)"] = page.run("compare-run", "compare-status")
    assert "Error" not in status and re.search(r"naclip and rfclip give the same class to \d+\.\d% of the pixels",
                                               status), status
    for elem_id in ("compare-image-a", "compare-image-b", "compare-disagreement"):
        img = page.wait(lambda: page.image_loaded(elem_id), elem_id)
        assert page.natural_size(img) == (640, 426)
    table = page.text("compare-table")
    assert "naclip" in table and "rfclip" in table and any(n in table for n in ("road", "tree", "sky"))
    page.shot(shots, "demo_compare.png")

    # ---- Look inside: click a point, get the attention pictures of every layer.
    page.tab("Look inside")
    target = page.wait(lambda: page.image_loaded("inside-image"), "the picture to click", 30)
    t0 = time.monotonic()
    page.click_at(target, 1 / 5, 1 / 6)
    page.wait(lambda: page.answer_number("inside-status"), "an answer in #inside-status")
    status = page.text("inside-status")
    timings["Look inside (s)"] = time.monotonic() - t0
    assert "Error" not in status and status.startswith("rfclip: point ("), status
    x, y = (float(v) for v in re.search(r"point \((\d+), (\d+)\)", status).groups())
    assert 320 + 640 / 5 - 40 < x < 320 + 640 / 5 + 40 and 213 + 426 / 6 - 30 < y < 213 + 426 / 6 + 30
    for key in ("attention", "tokens", "phi", "fiedler", "self_attention", "embedding_weights"):
        img = page.wait(lambda: page.image_loaded(f"inside-{key}"), f"the {key} picture", 30)
        assert min(page.natural_size(img)) > 100, key
    rows = page.els("#inside-layers tr")[1:]
    assert len(rows) == 12
    counts = [int(r.find_elements(page.By.TAG_NAME, "td")[1].text) for r in rows]
    assert all(c > 0 for c in counts), counts  # planted in every layer
    page.shot(shots, "demo_look_inside.png", height=1700)
    browser.set_window_size(1280, 900)

    # ---- Bad input in the page: a text file, an empty class list; the server keeps serving.
    page.tab("Segment")
    page.upload(notes)
    error = page.wait(lambda: (lambda t: t if "Error" in t else None)(page.text("image-status")),
                      "the upload error", 60)
    assert "cannot read image notes.txt" in error and "give a valid JPEG/PNG/WebP" in error, error
    assert str(tmp_path) not in error and "/tmp/" not in error  # the file's name, not the server's path
    status, _ = page.run("segment-run", "segment-status")
    assert "Error" in status and "cannot read image notes.txt" in status, status
    assert not page.els("#segment-overlay img")  # no stale result next to the error
    page.upload(example)
    page.wait(lambda: "640 x 426 pixels" in page.text("image-status"), "the preview again", 60)
    page.set_classes(" ; ")
    status, _ = page.run("segment-run", "segment-status")
    assert "empty class list" in status, status
    page.set_classes("road; sky")
    status, timings["Segment again (s)"] = page.run("segment-run", "segment-status")
    assert "Error" not in status and "of 2 classes" in status, status
    assert page.wait(lambda: page.image_loaded("segment-overlay"), "the overlay again")
    assert proc.poll() is None, "".join(log)
    assert not any("Traceback" in line for line in log), "".join(log)

    print("\nrfclip demo timings: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
