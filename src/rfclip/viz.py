"""Pictures people look at: palette mask PNGs, overlays with a legend, heat maps, figure grids and line plots.

Everything is drawn with Pillow (no matplotlib). Text uses Pillow's default font at a size that scales with the
picture (``ImageFont.load_default(size=...)``, Pillow >= 10.1), with fall-backs to DejaVu Sans and to the fixed
bitmap font. Files are written atomically (:func:`save_image_atomic`).
"""

from __future__ import annotations

import colorsys
import importlib.util
import logging
import math
import os
import unicodedata
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ._io import atomic_open
from .errors import RfclipError

log = logging.getLogger(__name__)

__all__ = [
    "palette",
    "save_mask_png",
    "mark_point",
    "save_image_atomic",
    "class_fractions",
    "colorize",
    "overlay",
    "heatmap_overlay",
    "apply_colormap",
    "grid_figure",
    "line_plot",
    "get_font",
    "label_font",
]

# 20 distinct colours (Sasha Trubetskoy's list, reordered so that the first ones differ most).
_BASE_COLOURS = (
    (230, 25, 75),  # red
    (60, 180, 75),  # green
    (255, 225, 25),  # yellow
    (67, 99, 216),  # blue
    (245, 130, 49),  # orange
    (145, 30, 180),  # purple
    (66, 212, 244),  # cyan
    (240, 50, 230),  # magenta
    (191, 239, 69),  # lime
    (250, 190, 212),  # pink
    (70, 153, 144),  # teal
    (220, 190, 255),  # lavender
    (154, 99, 36),  # brown
    (255, 250, 200),  # beige
    (128, 0, 0),  # maroon
    (170, 255, 195),  # mint
    (128, 128, 0),  # olive
    (255, 216, 177),  # apricot
    (0, 0, 117),  # navy
    (169, 169, 169),  # grey
)


def palette(n: int) -> np.ndarray:
    """``n`` distinct colours as an (n, 3) uint8 array; deterministic.

    The first 20 are a hand-picked set of distinct colours; further ones step the hue by the golden angle and cycle
    through a few saturation / value levels, so neighbouring indices stay far apart.
    """
    if n < 0:
        raise ValueError(f"palette: n must be >= 0, got {n}")
    cols = list(_BASE_COLOURS[:n])
    sv_levels = ((0.85, 0.95), (0.55, 0.80), (0.95, 0.60), (0.40, 0.95), (0.70, 0.45))
    i = 0
    while len(cols) < n:
        h = (0.07 + i * 0.618033988749895) % 1.0
        s, v = sv_levels[(i // 7) % len(sv_levels)]
        r, g, b = colorsys.hsv_to_rgb(h, s, v)
        cols.append((round(r * 255), round(g * 255), round(b * 255)))
        i += 1
    return np.asarray(cols, dtype=np.uint8).reshape(n, 3)


_default_palette = palette  # for functions whose ``palette`` argument shadows the function


def _as_palette(pal, n_needed: int) -> np.ndarray:
    pal = palette(n_needed) if pal is None else np.asarray(pal)
    if pal.ndim != 2 or pal.shape[1] != 3:
        raise ValueError(f"palette must be an (n, 3) array, got shape {pal.shape}")
    if len(pal) < n_needed:
        raise ValueError(f"palette has {len(pal)} colours but {n_needed} are needed")
    return np.clip(pal, 0, 255).astype(np.uint8)


def save_image_atomic(img: Image.Image, path: str | os.PathLike, **save_kwargs) -> Path:
    """Write ``img`` to ``path`` atomically: a temporary file in the same folder, then ``os.replace``.

    The format follows the file extension (``.png``, ``.jpg``, ...). Parent folders are created. Either the old file
    (or nothing) or the complete new file is at ``path``; no temporary file is left behind.
    """
    path = Path(path)
    ext = path.suffix.lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None:
        raise RfclipError(f"cannot save image to {path}: unknown image extension {ext!r} (use .png or .jpg)")
    if fmt == "JPEG" and img.mode not in ("RGB", "L", "CMYK"):
        img = img.convert("RGB")
    with atomic_open(path, "wb") as f:
        img.save(f, format=fmt, **save_kwargs)
    return path


def save_mask_png(path: str | os.PathLike, mask: np.ndarray, palette: np.ndarray | None = None) -> Path:
    """Save an (H, W) integer class-index map as a palette ("P" mode) PNG.

    The pixel values are the class indices (0..255; e.g. 255 stays 255 for "ignore"), and the PNG palette makes
    the file look right in an image viewer. ``palette`` has at most 256 colours (default: :func:`palette` for the
    indices used); indices without a colour are shown black.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"save_mask_png expects an (H, W) mask, got shape {mask.shape}")
    if mask.size and (not np.issubdtype(mask.dtype, np.integer) and not np.issubdtype(mask.dtype, np.bool_)):
        if not np.array_equal(mask, np.round(mask)):
            raise ValueError("save_mask_png expects integer class indices")
    if mask.size:
        lo, hi = int(mask.min()), int(mask.max())
        if lo < 0 or hi > 255:
            raise RfclipError(
                f"cannot save the mask as a palette PNG: class indices must be in 0..255, got {lo}..{hi} "
                f"(a palette PNG holds at most 256 classes)"
            )
    else:
        hi = 0
    if palette is None:
        pal = _default_palette(hi + 1)
    else:
        pal = np.asarray(palette)
        if pal.ndim != 2 or pal.shape[1] != 3:
            raise ValueError(f"palette must be an (n, 3) array, got shape {pal.shape}")
        if len(pal) > 256:
            raise RfclipError(
                f"cannot save the mask as a palette PNG: {len(pal)} classes, but a palette PNG holds at most 256"
            )
    return save_image_atomic(_palette_image(mask, pal), path)


def _palette_image(mask: np.ndarray, pal: np.ndarray) -> Image.Image:
    """A "P" image of class indices 0..255 with the colours ``pal`` ((n <= 256, 3); the rest black)."""
    full = np.zeros((256, 3), dtype=np.uint8)
    full[: len(pal)] = np.clip(pal, 0, 255).astype(np.uint8)
    arr = np.ascontiguousarray(mask.astype(np.uint8))
    img = Image.frombytes("P", (arr.shape[1], arr.shape[0]), arr.tobytes())
    img.putpalette(full.reshape(-1).tolist())
    return img


def mask_image(mask: np.ndarray, num_classes: int) -> Image.Image:
    """The image :func:`rfclip.outputs.save_mask` writes: a palette image (pixel value = class index, coloured by
    :func:`palette`) for up to 256 classes, a 16-bit grey image beyond that."""
    if num_classes <= 256:
        return _palette_image(np.asarray(mask), palette(num_classes))
    return Image.fromarray(np.asarray(mask).astype(np.uint16))


def class_fractions(mask: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """Fraction of the pixels of each class, all classes listed (0.0 for absent ones).

    Pixels whose index is not a class (e.g. 255 = ignore) are left out, so the fractions sum to 1 whenever at least
    one pixel has a class.
    """
    mask = np.asarray(mask)
    k = len(class_names)
    valid = mask[(mask >= 0) & (mask < k)].astype(np.int64)
    counts = np.bincount(valid.ravel(), minlength=k)[:k]
    total = counts.sum()
    out: dict[str, float] = {}
    for name, c in zip(class_names, counts):
        out[name] = out.get(name, 0.0) + (float(c) / float(total) if total else 0.0)
    return out


# --------------------------------------------------------------------------------------------- fonts


@lru_cache(maxsize=64)
def get_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font at ``size`` pixels; DejaVu Sans, then the fixed bitmap font, as fall-backs."""
    size = max(6, int(size))
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType
    except (TypeError, OSError, ImportError, AttributeError):
        pass
    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "Arial.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except (OSError, ImportError):
            continue
    return ImageFont.load_default()


# TrueType/OpenType fonts tried, in this order, for text Pillow's default font (Aileron: ASCII and little more)
# cannot draw: what Linux distributions, matplotlib, macOS and Windows usually provide. Bare names are looked up
# by Pillow in the system font folders (XDG data dirs, /Library/Fonts, C:/Windows/Fonts).
_FALLBACK_FONTS = (
    "DejaVuSans.ttf",  # Latin, Greek, Cyrillic, many symbols (Debian fonts-dejavu-core, matplotlib)
    "NotoSans-Regular.ttf",
    "NotoSansCJK-Regular.ttc",  # Chinese, Japanese, Korean (fonts-noto-cjk)
    "NotoSansCJKsc-Regular.otf",
    "DroidSansFallbackFull.ttf",
    "wqy-microhei.ttc",
    "wqy-zenhei.ttc",
    "FreeSans.ttf",
    "LiberationSans-Regular.ttf",
    "Arial Unicode.ttf",  # macOS
    "PingFang.ttc",
    "Hiragino Sans GB.ttc",
    "AppleSDGothicNeo.ttc",
    "arial.ttf",  # Windows
    "msyh.ttc",
    "meiryo.ttc",
    "malgun.ttf",
    "seguisym.ttf",
    "NotoEmoji-Regular.ttf",
    "Symbola.ttf",
)


@lru_cache(maxsize=None)
def _fallback_font_files() -> tuple[str, ...]:
    """Paths of the fallback fonts found here (looked up once per process)."""
    found = []
    mpl = importlib.util.find_spec("matplotlib")
    for name in _FALLBACK_FONTS:
        candidates = [name]
        if name == "DejaVuSans.ttf" and mpl is not None and mpl.submodule_search_locations:
            candidates.append(os.path.join(list(mpl.submodule_search_locations)[0], "mpl-data", "fonts", "ttf", name))
        for candidate in candidates:
            try:
                font = ImageFont.truetype(candidate, 12)
            except (OSError, ImportError):
                continue
            path = getattr(font, "path", candidate)
            if isinstance(path, str) and path not in found:
                found.append(path)
            break
    return tuple(found)


@lru_cache(maxsize=64)
def _fallback_fonts(size: int) -> tuple:
    fonts = []
    for path in _fallback_font_files():
        try:
            fonts.append(ImageFont.truetype(path, size))
        except OSError:
            continue
    return tuple(fonts)


@lru_cache(maxsize=1 << 14)
def has_glyph(font, char: str) -> bool:
    """Whether ``font`` draws ``char`` with a glyph of its own, not the missing-glyph box (.notdef).

    The character is drawn and compared with U+FFFF, a noncharacter no font maps, which draws .notdef. White space
    and invisible format characters count as drawable. Bitmap fonts (no FreeType) draw ASCII only.
    """
    if char.isspace() or unicodedata.category(char) == "Cf":
        return True
    if not isinstance(font, ImageFont.FreeTypeFont):
        return char.isascii()
    return _rendered(font, char) != _rendered(font, "\uffff")


def _rendered(font, text: str) -> tuple:
    left, top, right, bottom = font.getbbox(text)
    img = Image.new("L", (max(1, right - left), max(1, bottom - top)))
    ImageDraw.Draw(img).text((-left, -top), text, font=font, fill=255)
    return img.size, img.tobytes()


_ASCII_LOOKALIKES = {"ß": "ss", "æ": "ae", "Æ": "AE", "ø": "o", "Ø": "O", "œ": "oe", "Œ": "OE", "đ": "d", "Đ": "D",
                     "ł": "l", "Ł": "L", "þ": "th", "Þ": "Th", "ð": "d", "Ð": "D", "ı": "i", "…": "..."}
_warned_glyphs = False


def _readable_ascii(char: str) -> str:
    """An ASCII stand-in for a character no font here can draw: the letter without its accents ("é" -> "e"),
    a usual spelling ("ß" -> "ss"), else its code point ("猫" -> "<U+732B>")."""
    if char in _ASCII_LOOKALIKES:
        return _ASCII_LOOKALIKES[char]
    plain = "".join(c for c in unicodedata.normalize("NFKD", char) if not unicodedata.combining(c))
    if plain and plain.isascii() and plain.isprintable():
        return plain
    return f"<U+{ord(char):04X}>"


def label_font(text: str, size: int) -> tuple:
    """``(font, text to draw)`` for a label at ``size`` pixels, never with missing-glyph boxes.

    The default font when it has every glyph of ``text``; else the first font found here (:data:`_FALLBACK_FONTS`:
    DejaVu Sans, Noto CJK, ...) that has them all; else the font with the most of them, the others replaced by a
    readable ASCII form (:func:`_readable_ascii`), which is said once per process (a logging warning).
    """
    global _warned_glyphs
    default = get_font(size)
    chars = set(text)
    if all(has_glyph(default, c) for c in chars):
        return default, text
    fonts = (default, *_fallback_fonts(max(6, int(size))))
    coverage = [sum(has_glyph(f, c) for c in chars) for f in fonts]
    best = fonts[coverage.index(max(coverage))]
    if max(coverage) == len(chars):
        return best, text
    missing = "".join(sorted(c for c in chars if not has_glyph(best, c)))
    shown = "".join(c if has_glyph(best, c) else _readable_ascii(c) for c in text)
    if not _warned_glyphs:
        _warned_glyphs = True
        log.warning("no font found here can draw %r; legends show such characters in ASCII (%r is drawn as %r); "
                    "install a font that covers them (e.g. fonts-noto-cjk for Chinese, Japanese, Korean)",
                    missing[:20], text[:40], shown[:60])
    return best, shown


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    l, t, r, b = draw.textbbox((0, 0), text, font=font)
    return r - l, b - t


def _truncate(draw: ImageDraw.ImageDraw, text: str, font, max_w: int) -> str:
    """``text``, or its longest prefix (at least one character) plus "…" that fits in ``max_w`` pixels.

    A binary search over the prefix length: about log2(len(text)) measurements, so that a class name of 10,000
    characters costs 15 measurements instead of one per character (which took minutes).
    """
    if _text_size(draw, text, font)[0] <= max_w:
        return text
    lo, hi = 1, len(text) - 1  # text[:lo] + "…" is kept even when it does not fit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _text_size(draw, text[:mid] + "…", font)[0] <= max_w:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo] + "…"


# --------------------------------------------------------------------------------------------- masks


def _as_rgb(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    image = image[:, :, :3]
    if image.dtype != np.uint8:
        image = np.clip(image, 0, 255).astype(np.uint8)
    return image


def colorize(mask: np.ndarray, pal: np.ndarray) -> np.ndarray:
    """(H, W) indices -> (H, W, 3) uint8 colours; indices without a colour (e.g. 255) are black."""
    mask = np.asarray(mask).astype(np.int64)
    pal = np.asarray(pal, dtype=np.uint8)
    lut = np.zeros((max(len(pal), 1) + 1, 3), dtype=np.uint8)
    lut[: len(pal)] = pal
    idx = np.where((mask >= 0) & (mask < len(pal)), mask, len(lut) - 1)
    return lut[idx]


def _boundaries(mask: np.ndarray, width: int) -> np.ndarray:
    """Boolean (H, W) map of pixels within ``width`` of a label change."""
    edge = np.zeros(mask.shape, dtype=bool)
    dv = mask[1:, :] != mask[:-1, :]
    dh = mask[:, 1:] != mask[:, :-1]
    edge[1:, :] |= dv
    edge[:-1, :] |= dv
    edge[:, 1:] |= dh
    edge[:, :-1] |= dh
    if width > 1 and edge.any():
        # Thicken with a (2r+1) box via shifted ORs (r small).
        r = (width - 1) // 2 + (width - 1) % 2
        grown = edge.copy()
        h, w = edge.shape
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                if dy == 0 and dx == 0:
                    continue
                ys, yd = (slice(max(dy, 0), h + min(dy, 0)), slice(max(-dy, 0), h + min(-dy, 0)))
                xs, xd = (slice(max(dx, 0), w + min(dx, 0)), slice(max(-dx, 0), w + min(-dx, 0)))
                grown[yd, xd] |= edge[ys, xs]
        edge = grown
    return edge


def overlay(
    image,
    mask: np.ndarray,
    class_names: Sequence[str],
    alpha: float = 0.5,
    palette: np.ndarray | None = None,
    legend: bool = True,
) -> Image.Image:
    """The image blended with the colour mask, region boundaries darker, and a legend panel on the right.

    Args:
        image: (H, W, 3) uint8 image (a PIL image or a grey (H, W) array also work).
        mask: (H, W) class indices; indices outside ``0..len(class_names)-1`` (e.g. 255) are left uncoloured.
        class_names: one name per class index.
        alpha: weight of the mask colour (0 = image only, 1 = colours only).
        palette: (K, 3) colours; default :func:`palette` (K = number of classes).
        legend: add the legend panel: one swatch, name and pixel percentage per class present, largest first.

    Returns:
        An RGB image, (W + legend width) x H (taller when a small image needs a taller legend panel).
    """
    img = _as_rgb(image)
    mask = np.asarray(mask)
    if mask.shape != img.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match image shape {img.shape[:2]}")
    k = len(class_names)
    pal = _as_palette(palette, k)[:k] if k else np.zeros((0, 3), np.uint8)
    h, w = mask.shape
    valid = (mask >= 0) & (mask < k)
    col = colorize(mask, pal).astype(np.float32)
    out = img.astype(np.float32)
    a = float(alpha)
    if not 0.0 <= a <= 1.0:
        raise RfclipError(f"overlay opacity must be in 0..1, got {alpha!r}; 0 shows the image only, 1 the colours only")
    out[valid] = (1.0 - a) * out[valid] + a * col[valid]
    bw = max(1, round(min(h, w) / 400))
    edge = _boundaries(np.where(valid, mask, -1), bw)
    out[edge] *= 0.45
    blended = Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), mode="RGB")
    if not legend:
        return blended
    panel = _legend_panel(mask, class_names, pal, h, w)
    if panel is None:
        return blended
    canvas = Image.new("RGB", (w + panel.width, max(h, panel.height)), (255, 255, 255))
    canvas.paste(blended, (0, 0))
    canvas.paste(panel, (w, 0))
    return canvas


def _legend_panel(mask, class_names, pal, h: int, w: int) -> Image.Image | None:
    counts = np.bincount(mask[(mask >= 0) & (mask < len(class_names))].ravel().astype(np.int64),
                         minlength=len(class_names))
    total = counts.sum()
    present = [i for i in np.argsort(-counts, kind="stable") if counts[i] > 0]
    if not present:
        return None
    font_px = int(np.clip(round(min(h, max(w, h) * 0.75) / 26), 12, 96))
    font = get_font(font_px)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad = max(6, font_px // 2)
    sw = max(8, round(font_px * 0.9))
    labels = []  # (class index, name as drawn, its font, percentage)
    # Names are cut only beyond ~24 characters, whatever the image's width (a small image gets a wider panel).
    max_text_w = max(_text_size(probe, "M" * 16, font)[0], round(0.6 * w))
    for i in present:
        pct = 100.0 * counts[i] / total
        pct_s = f"{pct:.1f}%" if pct >= 0.1 else "<0.1%"
        name_font, name = label_font(str(class_names[i]), font_px)  # a font with its glyphs (else ASCII)
        name = _truncate(probe, name, name_font, max_text_w - _text_size(probe, "  " + pct_s, font)[0])
        labels.append((i, name, name_font, pct_s))
    fonts = list(dict.fromkeys([font] + [f for _, _, f, _ in labels]))
    top_of = {f: probe.textbbox((0, 0), "Hg", font=f)[1] for f in fonts}  # ascent offset of each font
    text_h = max(_text_size(probe, "Hg", f)[1] for f in fonts)
    line_h = max(max(_text_size(probe, "Hg%", f)[1] for f in fonts), font_px) + max(4, font_px // 2)
    name_w = max(_text_size(probe, n, f)[0] for _, n, f, _ in labels)
    pct_w = max(_text_size(probe, p, font)[0] for _, _, _, p in labels)
    col_w = sw + pad + name_w + pad + pct_w + 2 * pad
    panel_h = max(h, min(len(labels), 8) * line_h + 2 * pad)  # a small image: the panel is taller than it
    rows_per_col = max(1, (panel_h - 2 * pad) // line_h)
    ncols = math.ceil(len(labels) / rows_per_col)
    panel = Image.new("RGB", (ncols * col_w + pad, panel_h), (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    outline_w = max(1, font_px // 12)
    for n, (i, name, name_font, pct_s) in enumerate(labels):
        cx = pad + (n // rows_per_col) * col_w
        cy = pad + (n % rows_per_col) * line_h
        sy = cy + (line_h - sw) // 2
        draw.rectangle([cx, sy, cx + sw, sy + sw], fill=tuple(int(c) for c in pal[i]), outline=(40, 40, 40),
                       width=outline_w)
        ty = cy + (line_h - text_h) // 2
        draw.text((cx + sw + pad, ty - top_of[name_font]), name, fill=(20, 20, 20), font=name_font)
        pw = _text_size(probe, pct_s, font)[0]
        draw.text((cx + sw + pad + name_w + pad + pct_w - pw, ty - top_of[font]), pct_s, fill=(90, 90, 90), font=font)
    return panel


# --------------------------------------------------------------------------------------------- heat maps

# Piecewise-linear colour maps: (position, (r, g, b)) stops.
_CMAPS = {
    "jet": [(0.0, (0, 0, 128)), (0.125, (0, 0, 255)), (0.375, (0, 255, 255)), (0.625, (255, 255, 0)),
            (0.875, (255, 0, 0)), (1.0, (128, 0, 0))],
    "hot": [(0.0, (10, 0, 0)), (0.375, (255, 0, 0)), (0.75, (255, 255, 0)), (1.0, (255, 255, 255))],
    "viridis": [(0.0, (68, 1, 84)), (0.25, (59, 82, 139)), (0.5, (33, 145, 140)), (0.75, (94, 201, 98)),
                (1.0, (253, 231, 37))],
    "gray": [(0.0, (0, 0, 0)), (1.0, (255, 255, 255))],
}


def apply_colormap(values: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """Values in [0, 1] (clipped; NaN -> 0) -> uint8 RGB of shape values.shape + (3,)."""
    if cmap not in _CMAPS:
        raise ValueError(f"unknown colour map {cmap!r}; choose one of {sorted(_CMAPS)}")
    v = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0)
    v = np.clip(v, 0.0, 1.0)
    stops = _CMAPS[cmap]
    xs = np.array([s[0] for s in stops])
    out = np.stack([np.interp(v, xs, [s[1][c] for s in stops]) for c in range(3)], axis=-1)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def heatmap_overlay(
    image,
    heat: np.ndarray,
    cmap: str = "jet",
    alpha: float = 0.5,
    vmin: float | None = None,
    vmax: float | None = None,
) -> Image.Image:
    """The image blended with a colour-mapped heat map.

    ``heat`` (h, w) is resized bilinearly to the image size if needed and scaled to [0, 1] with ``vmin``/``vmax``
    (default: its finite min and max; a constant map becomes 0).
    """
    img = _as_rgb(image)
    hgt, wid = img.shape[:2]
    heat = np.asarray(heat, dtype=np.float32)
    if heat.ndim != 2:
        raise ValueError(f"heat map must be (H, W), got shape {heat.shape}")
    finite = np.isfinite(heat)
    lo = float(vmin) if vmin is not None else (float(heat[finite].min()) if finite.any() else 0.0)
    hi = float(vmax) if vmax is not None else (float(heat[finite].max()) if finite.any() else 1.0)
    norm = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
    norm = np.where(finite, norm, 0.0).astype(np.float32)
    if norm.shape != (hgt, wid):
        norm = np.asarray(Image.fromarray(norm, mode="F").resize((wid, hgt), Image.BILINEAR))
    col = apply_colormap(norm, cmap).astype(np.float32)
    a = float(np.clip(alpha, 0.0, 1.0))
    out = (1.0 - a) * img.astype(np.float32) + a * col
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), mode="RGB")


# --------------------------------------------------------------------------------------------- figures


def grid_figure(
    panels: Sequence[Image.Image],
    titles: Sequence[str] | None = None,
    ncols: int = 4,
    background=(255, 255, 255),
) -> Image.Image:
    """Tiles with titles above them, ``ncols`` per row.

    Every cell is as large as the largest panel; smaller panels are centred (not rescaled). The result is
    ``ncols' * (cell_w + gap) + gap`` wide and ``nrows * (title_h + cell_h + gap) + gap`` high, with
    ``ncols' = min(ncols, len(panels))``.
    """
    if not panels:
        raise ValueError("grid_figure needs at least one panel")
    titles = list(titles) if titles is not None else [""] * len(panels)
    if len(titles) != len(panels):
        raise ValueError(f"grid_figure: {len(panels)} panels but {len(titles)} titles")
    ncols = max(1, min(int(ncols), len(panels)))
    nrows = math.ceil(len(panels) / ncols)
    cell_w = max(p.width for p in panels)
    cell_h = max(p.height for p in panels)
    font_px = int(np.clip(round(cell_w / 26), 11, 64))
    font = get_font(font_px)
    gap = max(4, font_px // 2)
    title_h = round(font_px * 1.6) if any(titles) else 0
    fig = Image.new("RGB", (ncols * (cell_w + gap) + gap, nrows * (title_h + cell_h + gap) + gap), background)
    draw = ImageDraw.Draw(fig)
    for n, (p, t) in enumerate(zip(panels, titles)):
        r, c = divmod(n, ncols)
        x0 = gap + c * (cell_w + gap)
        y0 = gap + r * (title_h + cell_h + gap)
        if t:
            text = _truncate(draw, str(t), font, cell_w)
            tw, _ = _text_size(draw, text, font)
            l, _, _, _ = draw.textbbox((0, 0), text, font=font)
            _, top, _, b = draw.textbbox((0, 0), "Hg", font=font)
            draw.text((x0 + (cell_w - tw) // 2 - l, y0 + (title_h - (b - top)) // 2 - top), text,
                      fill=(20, 20, 20), font=font)
        fig.paste(p.convert("RGB"), (x0 + (cell_w - p.width) // 2, y0 + title_h + (cell_h - p.height) // 2))
    return fig


def _nice_ticks(lo: float, hi: float, target: int) -> list[float]:
    """Round tick values (1, 2, 5 x 10^k steps) covering [lo, hi], about ``target`` of them."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        return [0.0]
    if hi <= lo:
        hi = lo + (abs(lo) if lo else 1.0)
    raw = (hi - lo) / max(1, target)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    t = first
    while t <= hi + 1e-9 * step:
        ticks.append(0.0 if abs(t) < 1e-12 * step else t)
        t += step
    return ticks


def _fmt_tick(v: float, step: float) -> str:
    if step >= 1 and abs(v - round(v)) < 1e-9:
        return str(int(round(v)))
    decimals = max(0, -math.floor(math.log10(step)) + (1 if step / 10 ** math.floor(math.log10(step)) == 2.5 else 0))
    if abs(v) >= 1e5 or (v != 0 and abs(v) < 1e-4):
        return f"{v:.2g}"
    return f"{v:.{decimals}f}"


def line_plot(
    values: np.ndarray,
    highlight: Sequence[int] = (),
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    size: tuple[int, int] = (900, 300),
    color=(31, 119, 180),
    highlight_color=(214, 39, 40),
) -> Image.Image:
    """A line plot of ``values`` against their index (0..d-1), drawn with Pillow.

    Axes with round ticks, light grid lines, a zero line when the range crosses 0, the curve, and the
    ``highlight`` indices marked with a dot and labelled with their index (labels are staggered so they do not
    overlap). Drawn at 2x and downsampled for smooth lines. Returns an RGB image of exactly ``size`` (W, H).
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    d = len(v)
    W, H = int(size[0]), int(size[1])
    if W < 50 or H < 50:
        raise ValueError(f"line_plot size {size} too small")
    s = 2  # supersampling
    img = Image.new("RGB", (W * s, H * s), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    fpx = int(np.clip(round(min(H, W / 2.5) / 22), 9, 40)) * s
    font = get_font(fpx)
    tfont = get_font(round(fpx * 1.2))
    finite = v[np.isfinite(v)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if hi == lo:
        lo, hi = lo - 1.0, hi + 1.0
    span = hi - lo
    hv = [v[int(i)] for i in highlight if 0 <= int(i) < d and np.isfinite(v[int(i)])]
    below = any(x < 0 for x in hv)  # labels of negative points go below them
    lo_p, hi_p = lo - (0.16 if below else 0.06) * span, hi + 0.16 * span  # head room for the labels
    yt = _nice_ticks(lo_p, hi_p, 5)
    ystep = yt[1] - yt[0] if len(yt) > 1 else 1.0
    ylabels = [_fmt_tick(t, ystep) for t in yt]
    xt = _nice_ticks(0, max(d - 1, 1), max(2, min(10, W // 90)))
    xt = [t for t in xt if t <= max(d - 1, 1)]
    xstep = xt[1] - xt[0] if len(xt) > 1 else 1.0
    xlabels = [_fmt_tick(t, xstep) for t in xt]

    th = _text_size(draw, "0123456789", font)[1]
    pad = 6 * s
    top = pad + (round(fpx * 1.2 * 1.5) if title else pad)
    left = pad + (th + pad if ylabel else 0) + max(_text_size(draw, t, font)[0] for t in ylabels) + pad
    bottom = H * s - (pad + th + pad + (th + pad if xlabel else 0))
    right = W * s - pad - _text_size(draw, xlabels[-1], font)[0] // 2
    if right - left < 20 or bottom - top < 20:
        raise ValueError(f"line_plot size {size} too small for its labels")

    def px(i: float) -> float:
        return left + (i / max(d - 1, 1)) * (right - left)

    def py(y: float) -> float:
        return bottom - (y - lo_p) / (hi_p - lo_p) * (bottom - top)

    grid_c, axis_c, text_c = (225, 225, 225), (60, 60, 60), (30, 30, 30)
    for t, lab in zip(yt, ylabels):
        y = py(t)
        if top - 1 <= y <= bottom + 1:
            draw.line([(left, y), (right, y)], fill=grid_c, width=s)
            draw.line([(left - 4 * s, y), (left, y)], fill=axis_c, width=s)
            tw, _ = _text_size(draw, lab, font)
            l, tt, _, b = draw.textbbox((0, 0), lab, font=font)
            draw.text((left - 6 * s - tw - l, y - (b - tt) / 2 - tt), lab, fill=text_c, font=font)
    for t, lab in zip(xt, xlabels):
        x = px(t)
        draw.line([(x, top), (x, bottom)], fill=grid_c, width=s)
        draw.line([(x, bottom), (x, bottom + 4 * s)], fill=axis_c, width=s)
        tw, _ = _text_size(draw, lab, font)
        l, tt, _, _ = draw.textbbox((0, 0), lab, font=font)
        draw.text((x - tw / 2 - l, bottom + 6 * s - tt), lab, fill=text_c, font=font)
    if lo_p < 0 < hi_p:
        draw.line([(left, py(0)), (right, py(0))], fill=(150, 150, 150), width=s)
    draw.rectangle([left, top, right, bottom], outline=axis_c, width=s)

    # The curve (NaN breaks the line).
    seg: list[tuple[float, float]] = []
    for i, y in enumerate(v):
        if np.isfinite(y):
            seg.append((px(i), py(y)))
        else:
            if len(seg) > 1:
                draw.line(seg, fill=color, width=max(1, round(1.2 * s)), joint="curve")
            seg = []
    if len(seg) > 1:
        draw.line(seg, fill=color, width=max(1, round(1.2 * s)), joint="curve")
    elif len(seg) == 1:
        x, y = seg[0]
        draw.ellipse([x - 2 * s, y - 2 * s, x + 2 * s, y + 2 * s], fill=color)

    # Highlighted points, labelled with their index (above positive points, below negative ones); labels
    # stagger away from the curve to avoid overlaps.
    placed: list[tuple[float, float, float, float]] = []
    r = 3.5 * s
    order = sorted({int(i) for i in highlight if 0 <= int(i) < d and np.isfinite(v[int(i)])}, key=lambda i: -v[i])
    for i in order:
        x, y = px(i), py(v[i])
        draw.ellipse([x - r, y - r, x + r, y + r], fill=highlight_color, outline=(255, 255, 255), width=s)
        lab = str(i)
        tw, tht = _text_size(draw, lab, font)
        l, tt, _, _ = draw.textbbox((0, 0), lab, font=font)
        down = v[i] < 0
        by = y + r + 2 * s if down else y - r - 2 * s - tht
        bx = min(max(x - tw / 2, left + 2 * s), right - tw - 2 * s)
        for _ in range(8):
            box = (bx - s, by - s, bx + tw + s, by + tht + s)
            if not any(box[0] < p[2] and p[0] < box[2] and box[1] < p[3] and p[1] < box[3] for p in placed):
                break
            by += (tht + 2 * s) * (1 if down else -1)
        by = min(max(by, top + 2 * s), bottom - tht - 2 * s)
        placed.append((bx - s, by - s, bx + tw + s, by + tht + s))
        draw.text((bx - l, by - tt), lab, fill=highlight_color, font=font)

    if title:
        tw, tht = _text_size(draw, title, tfont)
        l, tt, _, _ = draw.textbbox((0, 0), title, font=tfont)
        draw.text(((left + right) / 2 - tw / 2 - l, (top - tht) / 2 - tt), title, fill=text_c, font=tfont)
    if xlabel:
        tw, tht = _text_size(draw, xlabel, font)
        l, tt, _, _ = draw.textbbox((0, 0), xlabel, font=font)
        draw.text(((left + right) / 2 - tw / 2 - l, H * s - pad - tht - tt), xlabel, fill=text_c, font=font)
    if ylabel:
        tw, tht = _text_size(draw, ylabel, font)
        l, tt, _, _ = draw.textbbox((0, 0), ylabel, font=font)
        timg = Image.new("RGB", (tw + 2 * s, tht + 2 * s), (255, 255, 255))
        ImageDraw.Draw(timg).text((s - l, s - tt), ylabel, fill=text_c, font=font)
        timg = timg.rotate(90, expand=True)
        img.paste(timg, (pad, int((top + bottom) / 2 - timg.height / 2)))
    return img.resize((W, H), Image.LANCZOS)


def mark_point(img: Image.Image, xy: tuple[float, float]) -> Image.Image:
    """A copy of ``img`` with a white ring (dark outline) and cross-hair ticks at ``xy`` (pixels): a query point."""
    img = img.copy()
    d = ImageDraw.Draw(img)
    r = max(4, img.width // 40)
    x, y = xy
    d.ellipse([x - r - 1, y - r - 1, x + r + 1, y + r + 1], outline=(0, 0, 0), width=3)
    d.ellipse([x - r, y - r, x + r, y + r], outline=(255, 255, 255), width=2)
    d.line([x - 2 * r, y, x - r, y], fill=(255, 255, 255), width=2)
    d.line([x + r, y, x + 2 * r, y], fill=(255, 255, 255), width=2)
    return img
