"""Text side: truncated prompt encoding equals open_clip's full-length encode_text; the classifier's ordering."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from rfclip.text import TextClassifier, _can_truncate, encode_text_truncated, imagenet_templates, prompt_lengths


def test_truncated_encoding_equals_full_length(tiny_clip, monkeypatch):
    model = tiny_clip.model
    assert _can_truncate(model)
    prompts = ["a photo of a cat.", "a bad photo of the diningtable with a very long name indeed.", "dog", ""]
    tokens = tiny_clip.tokenizer(prompts)
    assert int(prompt_lengths(tokens).max()) < tokens.shape[1]  # there is something to cut
    seen = []
    forward = model.transformer.forward
    monkeypatch.setattr(model.transformer, "forward", lambda x, attn_mask=None: seen.append(x.shape[1]) or
                        forward(x, attn_mask=attn_mask))
    with torch.inference_mode():
        full = model.encode_text(tokens)
        cut = encode_text_truncated(model, tokens)
    assert seen == [77, int(prompt_lengths(tokens).max())]  # the truncated pass really ran on fewer positions
    torch.testing.assert_close(cut, full, rtol=0, atol=1e-5)


def test_truncation_falls_back_where_not_exact(tiny_clip):
    clip = copy.deepcopy(tiny_clip)
    clip.model.text_pool_type = "last"  # pooled at the last position: truncation would change the result
    assert not _can_truncate(clip.model)
    tokens = clip.tokenizer(["a photo of a cat.", "dog"])
    with torch.inference_mode():
        torch.testing.assert_close(encode_text_truncated(clip.model, tokens), clip.model.encode_text(tokens),
                                   rtol=0, atol=0)


def test_classifier_embeddings_equal_the_plain_template_mean(tiny_clip):
    names = ["cat", "diningtable", "a rather long class name for sorting"]
    clf = TextClassifier(tiny_clip, cache_dir=False, batch_size=50)  # several batches of mixed lengths
    got = clf.encode(";".join(names)).features
    templates = imagenet_templates()
    with torch.inference_mode():
        want = []
        for name in names:
            e = F.normalize(tiny_clip.model.encode_text(tiny_clip.tokenizer([t.format(name) for t in templates])), dim=-1)
            want.append(F.normalize(e.mean(0), dim=-1))
    torch.testing.assert_close(got, torch.stack(want), rtol=0, atol=1e-6)
