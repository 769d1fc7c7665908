"""Image intake and the two views FlexAttention encodes: low-res (LR) and high-res (HR).

The recipe follows the released model (see docs in README, "Image views"):
  1. pad to square with the processor's mean colour, image centred (LLaVA-1.5 'pad');
  2. run the CLIP processor once, at the HR size;
  3. LR view = antialiased bilinear downscale of that processed HR tensor;
  4. HR view = the same tensor cut into zoom x zoom crops of the LR size, row-major.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers import CLIPImageProcessorPil

# The released model was trained with the PIL-based CLIP processor; use that backend everywhere, so pixels are the
# same with or without torchvision installed.
ImageProcessor = CLIPImageProcessorPil

# Larger inputs are refused before decoding (decompression-bomb guard). 64 MP covers any camera.
MAX_PIXELS = 64_000_000
MIN_SIDE = 8


class ImageError(ValueError):
    """An input that cannot be used as an image; the message is meant for the user."""


def load_image(source: str | Path | bytes | Image.Image | np.ndarray) -> Image.Image:
    """Open anything image-like as an RGB PIL image, upright, or raise ImageError with a clear message.

    Handles EXIF rotation, palette/RGBA (composited on white), grayscale, CMYK and 16-bit inputs.
    """
    if isinstance(source, np.ndarray):
        source = _array_to_pil(source)
    if isinstance(source, Image.Image):
        image = source
    else:
        data = source
        if isinstance(source, (str, Path)):
            path = Path(source)
            if not path.is_file():
                raise ImageError(f"image file not found: {path}")
            data = path.read_bytes()
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise ImageError("not an image (the file could not be identified as any image format)") from None
        except Image.DecompressionBombError:
            raise ImageError(f"image is too large (more than {MAX_PIXELS:,} pixels)") from None
    w, h = image.size
    if w * h > MAX_PIXELS:
        raise ImageError(f"image is too large: {w}x{h} is more than {MAX_PIXELS:,} pixels")
    if min(w, h) < MIN_SIDE:
        raise ImageError(f"image is too small: {w}x{h} (each side must be at least {MIN_SIDE} px)")
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"image file is corrupt or truncated ({err})") from None


def _array_to_pil(array: np.ndarray) -> Image.Image:
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4)):
        if array.dtype != np.uint8:
            scale = 255.0 / max(float(array.max()), 1.0) if array.dtype.kind in "iu" else 255.0
            array = np.clip(array.astype(np.float64) * scale, 0, 255).astype(np.uint8)
        return Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[2] == 1 else array)
    raise ImageError(f"an image array must be HxW, HxWx3 or HxWx4, not {array.shape}")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: stretch to 8 bit rather than letting PIL clip to white.
        arr = np.asarray(image, dtype=np.float64)
        hi = arr.max() or 1.0
        image = Image.fromarray(np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5 'pad': centre the image on a square canvas of its longer side."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def mean_colour(processor) -> tuple[int, int, int]:
    return tuple(int(m * 255) for m in processor.image_mean)


@dataclass
class ImageViews:
    """Processed pixels for one image: what the vision tower encodes."""

    lowres: torch.Tensor  # (1, 3, L, L)
    highres_crops: torch.Tensor  # (zoom*zoom, 3, L, L), row-major
    original_size: tuple[int, int]  # (width, height) before padding; used to keep padded margins unselected
    zoom: int


def make_views(image: Image.Image, processor, lowres_size: int, zoom: int, highres_size: int | None = None) -> ImageViews:
    """Pad, process once at the HR size (default lowres_size * zoom), derive the LR view and the zoom x zoom crops."""
    highres_size = highres_size or lowres_size * zoom
    padded = pad_to_square(image, mean_colour(processor))
    pixels = processor(
        images=padded,
        size={"shortest_edge": highres_size},
        crop_size={"height": highres_size, "width": highres_size},
        return_tensors="pt",
    )["pixel_values"]
    lowres = F.interpolate(pixels, size=lowres_size, mode="bilinear", antialias=True)
    return ImageViews(
        lowres=lowres,
        highres_crops=split_crops(pixels, zoom),
        original_size=image.size,
        zoom=zoom,
    )


def split_crops(pixels: torch.Tensor, zoom: int) -> torch.Tensor:
    """(1, C, Z*L, Z*L) -> (Z*Z, C, L, L), crops in row-major order."""
    _, c, side, _ = pixels.shape
    size = side // zoom
    crops = pixels[0].unfold(1, size, size).unfold(2, size, size)  # (C, Z, Z, L, L)
    return crops.permute(1, 2, 0, 3, 4).reshape(zoom * zoom, c, size, size)


def stitch_grids(crop_features: torch.Tensor, zoom: int) -> torch.Tensor:
    """(Z*Z, g*g, D) per-crop token grids -> (Z*g*Z*g, D): one HR grid, flattened row-major."""
    n, tokens, dim = crop_features.shape
    g = int(round(tokens**0.5))
    grid = crop_features.reshape(zoom, zoom, g, g, dim).permute(0, 2, 1, 3, 4)  # (Zr, gr, Zc, gc, D)
    return grid.reshape(zoom * g * zoom * g, dim)
