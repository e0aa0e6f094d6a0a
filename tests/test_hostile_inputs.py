"""Real-world and hostile inputs (issue 15): nothing silently wrong, every user error one line, no hangs.

Each test uses the input that showed the problem. Models are tiny random-weight CLIPs saved as real checkpoint
files (OpenAI layout, float16 safetensors, as the loader reads OpenAI checkpoints); random weights test mechanics.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from open_clip.transformer import Attention
from PIL import Image

from conftest import make_clip
from rfclip.errors import RfclipError


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """The tiny CLIP as an OpenAI-layout float16 safetensors file (QuickGELU, geometry from the file)."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("hostile") / "tiny.safetensors"
    state = make_clip().model.state_dict()
    save_file({k: v.half().contiguous() for k, v in state.items()}, str(path))
    return path


# ---------------------------------------------------------------------------------------------- 11: next open_clip
class DevAttention(Attention):
    """What open_clip's development branch puts in ``ResidualAttentionBlock`` instead of ``nn.MultiheadAttention``:
    its own ``Attention`` (in_proj_weight, in_proj_bias, out_proj and num_heads, but no ``embed_dim``), called here
    the way the block calls ``nn.MultiheadAttention``."""

    def __init__(self, d_model, n_head, batch_first=True, **_):
        super().__init__(d_model, n_head)

    def forward(self, q_x, k_x=None, v_x=None, need_weights=False, attn_mask=None):
        return super().forward(q_x, attn_mask=attn_mask), None


def test_attention_module_without_embed_dim_loads_and_segments(tiny_checkpoint, monkeypatch, rng):
    """A model whose blocks use an attention module of open_clip-dev's shape loads from a file, runs the dense
    forward and gives the same probabilities as the nn.MultiheadAttention model on the same weights."""
    from rfclip import Segmenter
    from rfclip.models.loading import load_clip

    reference = Segmenter(load_clip("ViT-B-16", checkpoint=tiny_checkpoint), method="naclip", device="cpu",
                          text_cache=False, short_side=0)
    with monkeypatch.context() as patch:
        patch.setattr(torch.nn, "MultiheadAttention", DevAttention)  # open_clip builds its blocks with it
        clip = load_clip("ViT-B-16", checkpoint=tiny_checkpoint)
    attn = clip.model.visual.transformer.resblocks[0].attn
    assert isinstance(attn, DevAttention) and not hasattr(attn, "embed_dim")
    dev = Segmenter(clip, method="naclip", device="cpu", text_cache=False, short_side=0)
    assert (dev.encoder.width, dev.encoder.num_heads) == (reference.encoder.width, reference.encoder.num_heads)
    image = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    expected = reference.segment(image, "red;green;blue")
    got = dev.segment(image, "red;green;blue")
    np.testing.assert_allclose(got.probs, expected.probs, atol=1e-5)


def test_attention_without_the_used_attributes_is_a_one_line_error():
    from rfclip.dense import DenseCLIP

    clip = make_clip()
    block = clip.model.visual.transformer.resblocks[1]
    block.attn = torch.nn.Linear(4, 4)  # no in_proj_weight / num_heads
    with pytest.raises(RfclipError, match="block 1 lacks in_proj_weight, in_proj_bias, out_proj, num_heads"):
        DenseCLIP(clip.model.visual)
