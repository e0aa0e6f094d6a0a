"""Half precision agrees with fp32: bf16 autocast on CPU, on a random model with the real ViT-B/16 geometry.

Random weights with random text embeddings give logits whose class margins are tiny everywhere (every pixel is a
near-tie between a few of 21 classes), so any rounding flips many pixels and a mask-agreement test would measure
the density of ties, not the precision of the pipeline. The text embeddings here are therefore built like a
trained CLIP's: for each of four regions of a synthetic scene, the fp32 mean patch feature of that region mixed
with a random direction (cosine ~0.3 to its region, as CLIP's text-to-patch similarities), plus 17 random classes
that appear nowhere. The per-pixel probability difference is also bounded, which is independent of margins.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rfclip.constants import DISTRACTION_DIMS
from rfclip.errors import RfclipError
from rfclip.inference import autocast_dtype, preprocess
from rfclip.methods import METHODS, method_option_names
from rfclip.models.loading import random_clip
from rfclip.segmenter import Segmenter
from rfclip.testing import plant_distraction_tokens
from rfclip.text import TextQueries

B16_DISTRACTION_DIMS = DISTRACTION_DIMS[("ViT-B-16", "openai")]
H, W = 144, 192  # one 9 x 12 patch crop (short_side=None): ViT-B/16 cost stays small on CPU
NUM_CLASSES = 21
MIX = 0.3  # weight of the region prototype in a class embedding


def scene(seed: int = 0, size: tuple[int, int] = (H, W)) -> tuple[np.ndarray, np.ndarray]:
    """A 144 x 192 (or ``size``) image of four textured regions with edges off the patch grid, and its label map."""
    H, W = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    label = np.zeros((H, W), np.int64)
    label[xx > 0.6 * W + 0.3 * (yy - H / 2)] = 1
    label[yy > 0.65 * H] = 2
    label[(yy - 0.35 * H) ** 2 + (xx - 0.3 * W) ** 2 < (0.22 * H) ** 2] = 3
    img = np.zeros((H, W, 3), np.float32)
    img[label == 0] = [200, 60, 40]
    img[label == 1] = [40, 80, 200]
    checker = (((xx // 6 + yy // 6) % 2) > 0)[..., None]
    img[label == 2] = np.where(checker, [30, 160, 40], [200, 220, 90])[label == 2]
    stripes = (((yy // 4) % 2) > 0)[..., None]
    img[label == 3] = np.where(stripes, [250, 250, 250], [20, 20, 20])[label == 3]
    img += rng.normal(0, 8, img.shape)
    return img.clip(0, 255).astype(np.uint8), label


def region_text(seg: Segmenter, image: np.ndarray, label: np.ndarray, seed: int = 0) -> TextQueries:
    """Class embeddings: region prototypes (fp32 features of this method) mixed with random directions."""
    x = preprocess(image, None, seg.device)
    with torch.inference_mode():
        features, (gh, gw), _ = seg.encoder(x[None], seg.method)
    features = features[0].float()
    ph, pw = seg.encoder.patch_size
    centres = torch.from_numpy(label[ph // 2::ph, pw // 2::pw][:gh, :gw]).flatten()
    regions = int(label.max()) + 1
    protos = torch.stack([F.normalize(features[centres == k].mean(0), dim=0) for k in range(regions)])
    g = torch.Generator().manual_seed(seed)
    noise = F.normalize(torch.randn(regions, features.shape[1], generator=g), dim=-1)
    mixed = F.normalize(MIX * protos + (1 - MIX**2) ** 0.5 * noise, dim=-1)
    absent = F.normalize(torch.randn(NUM_CLASSES - regions, features.shape[1], generator=g), dim=-1)
    names = [f"class{i}" for i in range(NUM_CLASSES)]
    return TextQueries(torch.cat([mixed, absent]), torch.arange(NUM_CLASSES), names, [[n] for n in names])


def random_text(dim: int, seed: int = 0) -> TextQueries:
    g = torch.Generator().manual_seed(seed)
    names = [f"class{i}" for i in range(NUM_CLASSES)]
    features = F.normalize(torch.randn(NUM_CLASSES, dim, generator=g), dim=-1)
    return TextQueries(features, torch.arange(NUM_CLASSES), names, [[n] for n in names])


@pytest.fixture(scope="module")
def b16_clip():
    """Random weights with the real ViT-B/16 geometry (QuickGELU, as OpenAI's)."""
    return random_clip("ViT-B-16", seed=0)


def _segmenter(clip, method: str, **options) -> Segmenter:
    if method not in METHODS:
        pytest.skip(f"method {method} is not registered yet")
    if "distraction_dims" in method_option_names(method):
        options["distraction_dims"] = B16_DISTRACTION_DIMS
    return Segmenter(clip, method=method, device="cpu", text_cache=False, templates=["{}"], short_side=None, **options)


def test_explicit_half_precision_runs_autocast_on_cpu():
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu, "auto") is None and autocast_dtype(cpu, "fp32") is None
    assert autocast_dtype(cpu, "bf16") == torch.bfloat16
    assert autocast_dtype(cpu, "BF16") == torch.bfloat16
    try:
        assert autocast_dtype(cpu, "fp16") == torch.float16
    except RfclipError as err:  # older torch: CPU autocast is bf16 only, and the error says so
        assert "fp16" in str(err) and "not supported" in str(err)
    with pytest.raises(RfclipError, match="unknown precision"):
        autocast_dtype(cpu, "int8")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_segmenter_half_precision_on_cpu(tiny_clip, random_image, precision):
    try:
        seg = Segmenter(tiny_clip, method="naclip", device="cpu", text_cache=False, precision=precision)
    except RfclipError:
        pytest.skip(f"{precision} autocast not supported on CPU by this torch")
    assert seg.amp_dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    out = seg.segment(random_image, "road;car;tree;sky")
    assert out.probs.dtype == np.float32 and out.mask.shape == random_image.shape[:2]
    np.testing.assert_allclose(out.probs.sum(0), 1.0, atol=1e-5)


@pytest.mark.parametrize("method", ["clip", "naclip", "rfclip"])
def test_bf16_masks_agree_with_fp32(b16_clip, method):
    image, label = scene()
    seg = _segmenter(b16_clip, method)
    text = region_text(seg, image, label)
    full = seg.segment(image, text)
    half = seg.with_config(precision="bf16").segment(image, text)
    assert seg.with_config(precision="bf16").amp_dtype == torch.bfloat16
    # The fixture is meaningful: fp32 finds the four regions (mostly) and no absent class.
    assert set(np.unique(full.mask)) == {0, 1, 2, 3}
    assert (full.mask == label).mean() > 0.85
    agreement = (full.mask == half.mask).mean()
    assert agreement >= 0.995, f"{method}: bf16 and fp32 masks agree on {100 * agreement:.2f}% of pixels"
    assert np.abs(full.probs - half.probs).max() < 0.05


@pytest.mark.parametrize("method", ["clip", "naclip", "rfclip"])
def test_bf16_probabilities_close_with_random_text(b16_clip, method):
    """Near-tie logits (random text): masks may flip, probabilities must stay close."""
    image, _ = scene(seed=1)
    seg = _segmenter(b16_clip, method)
    text = random_text(b16_clip.model.visual.output_dim)
    full = seg.segment(image, text)
    half = seg.with_config(precision="bf16").segment(image, text)
    diff = np.abs(full.probs - half.probs)
    assert diff.max() < 0.05, f"{method}: max |p_bf16 - p_fp32| = {diff.max():.4f}"
    # Pixels whose fp32 winner leads by a clear margin keep their class.
    top2 = np.sort(full.probs, axis=0)[-2:]
    clear = (top2[1] - top2[0]) > 0.05
    assert (full.mask[clear] == half.mask[clear]).all()


# ---------------------------------------------------------------------------------------------- RF-CLIP, every layer
PLANTED = [20, 21, 34, 100, 150]  # patch indices on the native 14 x 14 grid


@pytest.fixture(scope="module")
def planted_b16(b16_clip):
    """ViT-B/16 geometry whose PLANTED patches are distraction tokens in every layer (rfclip.testing)."""
    return plant_distraction_tokens(b16_clip, PLANTED, B16_DISTRACTION_DIMS)


@pytest.fixture(scope="module")
def planted_fp32(planted_b16):
    """The fp32 reference: segmenter, scene (224 x 224: the native grid), text and result."""
    image, label = scene(size=(224, 224))
    seg = _segmenter(planted_b16, "rfclip")
    text = region_text(seg, image, label)
    return seg, image, label, text, seg.segment(image, text)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_rfclip_with_distraction_tokens_in_every_layer_under_autocast(planted_fp32, precision):
    """The whole method with every RF step running in every layer (the planted tokens are found in all 12 layers
    and their attention is redistributed in all 11 intermediate ones): under CPU bf16 and fp16 autocast no error,
    no NaN, and the masks agree with fp32 on >= 99.5% of the pixels."""
    seg, image, label, text, full = planted_fp32
    assert set(np.unique(full.mask)) == {0, 1, 2, 3} and (full.mask == label).mean() > 0.85
    if precision != "fp32":
        try:
            seg = seg.with_config(precision=precision)
        except RfclipError:
            pytest.skip(f"{precision} autocast not supported on CPU by this torch")
    rec: dict = {}
    x = preprocess(image, None, seg.device)
    amp = torch.autocast("cpu", dtype=seg.amp_dtype, enabled=seg.amp_dtype is not None)
    with torch.inference_mode(), amp:
        seg.encoder(x[None], seg.method, record=rec)
    for layer in range(12):
        dis = rec[f"rf.L{layer}.dis"][0][0]
        assert dis[PLANTED].all() and int(dis.sum()) == len(PLANTED), (precision, layer)
        if layer < 11:
            assert f"rf.L{layer}.attn_after" in rec and f"rf.L{layer}.def" in rec, (precision, layer)
    if precision == "fp32":
        return
    half = seg.segment(image, text)
    assert np.isfinite(half.probs).all()
    agreement = (full.mask == half.mask).mean()
    assert agreement >= 0.995, f"{precision}: masks agree with fp32 on {100 * agreement:.2f}% of pixels"
