"""Real-world inputs, round 3 (issue 21): class lists as people write them, a text cache that cannot collide,
settings checked before work starts, messages that say what is true, outputs that say what was used, and the
Python API's niceties. Tiny random models; every test here failed before its fix."""

from __future__ import annotations

import json
import math
import os
import socket
import stat

import numpy as np
import pytest
import torch
from PIL import Image

from rfclip.cli import main
from rfclip.errors import RfclipError
from rfclip.segmenter import Segmenter
from rfclip.text import TextClassifier, parse_classes


@pytest.fixture(scope="module")
def seg(tiny_clip):
    return Segmenter(tiny_clip, method="clip", text_cache=False, short_side=64, slide_crop=32, slide_stride=32)


def _image(path, size=(48, 40), seed=0):
    rgb = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return path


# ---------------------------------------------------------------------------------------------- 2. class lists
@pytest.mark.parametrize("text", ["road\ncar\nsky", "road\r\ncar\r\nsky\r\n", "road\ncar;sky", "\nroad\ncar\nsky\n"])
def test_a_new_line_separates_classes(text):
    assert parse_classes(text) == [["road"], ["car"], ["sky"]]


def test_a_line_keeps_its_synonyms():
    assert parse_classes("cat, kitty\ndog") == [["cat", "kitty"], ["dog"]]


@pytest.mark.parametrize("text", ["cat;Cat", "cat; CAT ;dog", ["cat", " Cat "], "road car;Road  Car"])
def test_names_differing_only_in_case_or_spaces_are_duplicates(text):
    with pytest.raises(RfclipError, match="listed twice"):
        parse_classes(text)


@pytest.mark.parametrize("classes, expected", [
    (["cat", 5], "not a name"),
    (["cat", None], "not a name"),
    ([["cat", 3]], "not a name"),
    (["cat", [], "dog"], "class 1 .* has no name"),
    (["cat", "  ", "dog"], "class 1 .* has no name"),
    (42, "must be a string or a list"),
    (b"cat;dog", "must be a string or a list"),
])
def test_python_api_refuses_what_is_not_a_class_name(classes, expected):
    with pytest.raises(RfclipError, match=expected):
        parse_classes(classes)


def test_classes_file_with_bom_and_crlf(tmp_path, capsys, monkeypatch):
    from rfclip.cli.segment import read_classes

    path = tmp_path / "classes.txt"
    path.write_bytes("\ufeffcat, kitty\r\ndog\r\n# comment\r\ngrass\r\n".encode("utf-8"))
    args = type("Args", (), {"classes_file": str(path), "classes": None})()
    assert read_classes(args) == [["cat", "kitty"], ["dog"], ["grass"]]


def test_segment_batch_of_no_images_is_empty_and_classes_are_checked(seg):
    assert seg.segment_batch([], "cat;dog") == []
    with pytest.raises(RfclipError, match="listed twice"):
        seg.segment_batch([], "cat;Cat")


# ---------------------------------------------------------------------------------------------- 3. text cache
def test_text_cache_vocabularies_that_joined_alike_get_their_own_embeddings(tiny_clip, tmp_path):
    first, second = [["road\ncar"], ["sky"]], [["road"], ["car\nsky"]]
    TextClassifier(tiny_clip, cache_dir=tmp_path, device="cpu").encode(first)  # fills the disk cache
    cached = TextClassifier(tiny_clip, cache_dir=tmp_path, device="cpu").encode(second).features
    fresh = TextClassifier(tiny_clip, cache_dir=False, device="cpu").encode(second).features
    torch.testing.assert_close(cached, fresh)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_text_cache_key_depends_on_templates(tiny_clip, tmp_path):
    a = TextClassifier(tiny_clip, cache_dir=tmp_path, device="cpu", templates=["a photo of a {}."])
    b = TextClassifier(tiny_clip, cache_dir=tmp_path, device="cpu", templates=["a photo of a {}.", "{}"])
    assert a._disk_path(["cat"]) != b._disk_path(["cat"])
    a.encode("cat;dog")
    torch.testing.assert_close(TextClassifier(tiny_clip, cache_dir=tmp_path, device="cpu",
                                              templates=["a photo of a {}.", "{}"]).encode("cat;dog").features,
                               TextClassifier(tiny_clip, cache_dir=False, device="cpu",
                                              templates=["a photo of a {}.", "{}"]).encode("cat;dog").features)


# ---------------------------------------------------------------------------------------------- 11. Python API
def test_text_cache_true_means_the_default_cache(tiny_clip, tmp_path, monkeypatch):
    monkeypatch.setenv("RFCLIP_CACHE", str(tmp_path))
    s = Segmenter(tiny_clip, method="clip", text_cache=True)
    assert s.text.cache_dir == tmp_path / "text"
    with pytest.raises(RfclipError, match="text_cache"):
        Segmenter(tiny_clip, method="clip", text_cache=3)
