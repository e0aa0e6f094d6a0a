"""Draws examples/street.jpg, the synthetic street scene used in the README quick start.

It is a plain drawing (sky, buildings, road, trees, cars), made with Pillow so that the repository ships no
third-party photo: CLIP segments it roughly, not like a real photo. Run: python examples/make_street.py
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

W, H = 640, 426
HORIZON = 250


def draw_street(seed: int = 0) -> Image.Image:
    rng = random.Random(seed)
    # sky: vertical gradient, a few clouds
    t = np.linspace(0.0, 1.0, HORIZON)[:, None]
    top, bottom = np.array([70, 130, 210]), np.array([175, 210, 240])
    sky = (top * (1 - t) + bottom * t)[:, None, :].repeat(W, axis=1)
    canvas = np.zeros((H, W, 3), dtype=np.float64)
    canvas[:HORIZON] = sky
    img = Image.fromarray(canvas.astype(np.uint8))
    d = ImageDraw.Draw(img)
    for cx, cy in ((110, 45), (420, 70), (560, 30)):
        for dx, dy, r in ((0, 0, 22), (22, -8, 26), (48, 0, 20), (24, 8, 22)):
            d.ellipse([cx + dx - r, cy + dy - r, cx + dx + r, cy + dy + r], fill=(245, 247, 250))

    # buildings with windows
    x = 0
    while x < W:
        bw = rng.randint(70, 130)
        bh = rng.randint(110, 200)
        colour = rng.choice([(150, 90, 70), (185, 170, 150), (120, 120, 130), (200, 150, 110), (95, 100, 115)])
        d.rectangle([x, HORIZON - bh, x + bw, HORIZON], fill=colour, outline=(60, 60, 60))
        for wy in range(HORIZON - bh + 12, HORIZON - 25, 26):
            for wx in range(x + 10, x + bw - 18, 22):
                d.rectangle([wx, wy, wx + 11, wy + 15], fill=(60, 80, 110) if rng.random() < 0.7 else (235, 220, 140))
        x += bw + rng.randint(0, 6)

    # pavement, road, lane markings
    d.rectangle([0, HORIZON, W, HORIZON + 18], fill=(170, 165, 160))
    d.rectangle([0, HORIZON + 18, W, H], fill=(78, 78, 82))
    for lx in range(10, W, 90):
        d.rectangle([lx, 350, lx + 50, 357], fill=(240, 240, 235))

    # trees on the pavement
    for tx in (60, 300, 520):
        d.rectangle([tx - 6, HORIZON - 40, tx + 6, HORIZON + 12], fill=(95, 65, 40))
        for dx, dy, r in ((0, -75, 38), (-24, -55, 30), (24, -55, 30), (0, -45, 30)):
            d.ellipse([tx + dx - r, HORIZON + dy - r, tx + dx + r, HORIZON + dy + r], fill=(50, 125, 50))

    # cars
    for cx, cy, colour in ((90, 300, (200, 30, 35)), (330, 320, (30, 70, 170)), (500, 385, (235, 235, 235))):
        d.rounded_rectangle([cx, cy, cx + 150, cy + 45], radius=12, fill=colour, outline=(30, 30, 30))
        d.rounded_rectangle([cx + 30, cy - 28, cx + 115, cy + 2], radius=10, fill=colour, outline=(30, 30, 30))
        d.rectangle([cx + 40, cy - 21, cx + 70, cy - 2], fill=(150, 190, 215))
        d.rectangle([cx + 76, cy - 21, cx + 106, cy - 2], fill=(150, 190, 215))
        for wx in (cx + 32, cx + 118):
            d.ellipse([wx - 15, cy + 30, wx + 15, cy + 60], fill=(25, 25, 25))
            d.ellipse([wx - 6, cy + 39, wx + 6, cy + 51], fill=(150, 150, 150))

    # a little texture so that it is not perfectly flat
    arr = np.asarray(img.filter(ImageFilter.GaussianBlur(0.6))).astype(np.int16)
    noise = np.random.default_rng(seed).integers(-6, 7, size=arr.shape)
    return Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8))


if __name__ == "__main__":
    out = Path(__file__).with_name("street.jpg")
    draw_street().save(out, quality=88, optimize=True)
    print(f"wrote {out} ({out.stat().st_size // 1024} KB)")
