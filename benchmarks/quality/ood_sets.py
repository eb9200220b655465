"""The quality benchmark's evaluation sets, built from data that ships with installed packages.

Far OOD (none of them is clothing):
- `digits`: scikit-learn's 8x8 handwritten digits, upscaled to 28x28 (ncguard.ood_data.fit_to_shape).
- `glyphs`: the letters A-J rendered from the TrueType fonts matplotlib ships (notMNIST-like).
- `patches`: 28x28 grayscale crops of scikit-image's bundled sample photos, at several scales.
- `noise-gaussian`, `noise-uniform`: ncguard.ood_data's noise sets (the ones `ncguard evaluate` uses).
Covariate shift (Fashion-MNIST test images, labels kept, so accuracy under shift is measured too):
- `shift-rotate` (45-135 degrees either way), `shift-blur` (Gaussian, radius 1.5),
  `shift-noise` (additive Gaussian, sigma 0.3), `shift-contrast` (contrast scaled by 0.3).
Near OOD: `fmnist-held-out`, the 4 Fashion-MNIST classes a near-OOD model never saw.

All sets are seeded and values lie in [0, 1], like the in-distribution images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from ncguard.data import Dataset, load_dataset
from ncguard.ood_data import LUMA_WEIGHTS, fit_to_shape, noise_dataset

SIDE = 28
FAR_OOD = ("digits", "glyphs", "patches", "noise-gaussian", "noise-uniform")
COVARIATE_SHIFTS = ("shift-rotate", "shift-blur", "shift-noise", "shift-contrast")
NEAR_OOD = ("fmnist-held-out",)
GLYPH_LETTERS = "ABCDEFGHIJ"
# matplotlib's bundled text fonts (its symbol-only fonts would render empty boxes)
GLYPH_FONT_PREFIXES = ("DejaVu", "STIXGeneral", "STIXNonUni", "cmr10", "cmss10", "cmtt10", "cmb10", "cmti10")
SKIMAGE_SAMPLES = ("astronaut", "brick", "camera", "cat", "coffee", "coins", "grass", "gravel", "moon", "page", "rocket", "text", "clock", "hubble_deep_field")


def digits_images(n: int, seed: int) -> np.ndarray:
    digits = load_dataset("digits")
    rows = np.random.default_rng(seed).permutation(len(digits.x))[:n]
    return fit_to_shape(digits.x[rows], (1, SIDE, SIDE), "digits")


def font_files() -> list[Path]:
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return sorted(p for p in folder.glob("*.ttf") if p.name.startswith(GLYPH_FONT_PREFIXES))


def glyph_images(n: int, seed: int) -> np.ndarray:
    """White letters on black, random font, size and offset: the notMNIST recipe without the download."""
    rng = np.random.default_rng(seed)
    fonts = font_files()
    if not fonts:
        raise RuntimeError("no TrueType fonts found in matplotlib's data folder")
    out = np.empty((n, 1, SIDE, SIDE), dtype=np.float32)
    for i in range(n):
        glyph = np.zeros((SIDE, SIDE), dtype=np.float32)
        while glyph.max() == 0.0:  # a font without this letter draws nothing: pick another
            glyph, _ = render_glyph(rng, fonts)
        out[i, 0] = glyph
    return out


def render_glyph(rng: np.random.Generator, fonts: list[Path]) -> tuple[np.ndarray, int]:
    """(one glyph [SIDE, SIDE] in [0, 1], the index of its letter in GLYPH_LETTERS); the far-OOD set
    drops the letter, the few-shot probe (probe.glyph_task) keeps it as the label."""
    font = ImageFont.truetype(str(fonts[rng.integers(len(fonts))]), size=int(rng.integers(18, 27)))
    index = int(rng.integers(len(GLYPH_LETTERS)))
    letter = GLYPH_LETTERS[index]
    canvas = Image.new("L", (SIDE, SIDE), 0)
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((0, 0), letter, font=font)
    x = (SIDE - (right - left)) / 2 - left + rng.integers(-2, 3)
    y = (SIDE - (bottom - top)) / 2 - top + rng.integers(-2, 3)
    draw.text((x, y), letter, fill=255, font=font)
    return np.asarray(canvas, dtype=np.float32) / 255.0, index


def _grayscale(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, dtype=np.float32)
    if image.max() <= 1.0:  # boolean or [0, 1] images
        image = image * 255.0
    if image.ndim == 3:
        image = image[..., :3] @ LUMA_WEIGHTS
    return image / 255.0


def patch_images(n: int, seed: int) -> np.ndarray:
    """Crops of scikit-image's sample photos, each photo first shrunk by 1/2, 1/4 or 1/8."""
    import skimage.data

    rng = np.random.default_rng(seed)
    photos = [_grayscale(getattr(skimage.data, name)()) for name in SKIMAGE_SAMPLES]
    out = np.empty((n, 1, SIDE, SIDE), dtype=np.float32)
    for i in range(n):
        photo = photos[rng.integers(len(photos))]
        scale = float(rng.choice([0.5, 0.25, 0.125]))
        height, width = (max(SIDE, int(round(d * scale))) for d in photo.shape)
        small = np.asarray(Image.fromarray(photo).resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)
        top, left = rng.integers(height - SIDE + 1), rng.integers(width - SIDE + 1)
        out[i, 0] = np.clip(small[top : top + SIDE, left : left + SIDE], 0.0, 1.0)
    return out


def _per_image(x: np.ndarray, transform) -> np.ndarray:
    """Apply a Pillow transform to every image as 8-bit grayscale (Fashion-MNIST is 8-bit: lossless)."""
    out = np.empty_like(x)
    for i in range(len(x)):
        image = Image.fromarray(np.round(x[i, 0] * 255.0).astype(np.uint8))
        out[i, 0] = np.asarray(transform(i, image), dtype=np.float32) / 255.0
    return out


def covariate_shift(kind: str, x: np.ndarray, seed: int) -> np.ndarray:
    """Fashion-MNIST images changed in appearance only; the labels still hold."""
    rng = np.random.default_rng(seed)
    if kind == "shift-rotate":
        angles = rng.uniform(45, 135, size=len(x)) * rng.choice([-1, 1], size=len(x))
        return _per_image(x, lambda i, image: image.rotate(float(angles[i]), resample=Image.Resampling.BILINEAR))
    if kind == "shift-blur":
        return _per_image(x, lambda i, image: image.filter(ImageFilter.GaussianBlur(radius=1.5)))
    if kind == "shift-noise":
        return np.clip(x + 0.3 * rng.standard_normal(x.shape), 0.0, 1.0).astype(np.float32)
    if kind == "shift-contrast":
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        return np.clip(mean + 0.3 * (x - mean), 0.0, 1.0).astype(np.float32)
    raise ValueError(f"unknown covariate shift {kind!r}")


def far_ood_sets(like: Dataset, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    noise = {kind: noise_dataset(kind, like, seed).x[:n] for kind in ("gaussian", "uniform")}
    return {
        "digits": digits_images(n, seed),
        "glyphs": glyph_images(n, seed),
        "patches": patch_images(n, seed),
        "noise-gaussian": noise["gaussian"],
        "noise-uniform": noise["uniform"],
    }


def shifted_sets(test: Dataset, n: int, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{shift: (images, labels)} from the first `n` test images of a seeded permutation."""
    rows = np.random.default_rng(seed).permutation(len(test.x))[:n]
    return {kind: (covariate_shift(kind, test.x[rows], seed + k), test.y[rows]) for k, kind in enumerate(COVARIATE_SHIFTS)}


def save_examples(sets: dict[str, np.ndarray], path: Path, per_set: int = 8) -> None:
    """A PNG grid with a few images of every set, so readers see what the detectors face."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ncguard.atomic import atomic_write

    fig, axes = plt.subplots(len(sets), per_set, figsize=(per_set * 0.9, len(sets) * 1.0))
    for row, (name, x) in enumerate(sets.items()):
        for col in range(per_set):
            axis = axes[row, col]
            axis.imshow(x[col, 0], cmap="gray", vmin=0, vmax=1)
            axis.set_xticks([])
            axis.set_yticks([])
        axes[row, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda stream: fig.savefig(stream, format="png", dpi=90))
    plt.close(fig)
