"""Image intake and the two views FlexAttention encodes: low-res (LR) and high-res (HR).

The recipe follows the released model (docs/how-it-works.md, "Image views"):
  1. pad to square with the processor's mean colour, image centred (LLaVA-1.5 'pad');
  2. run the CLIP processor once, at the HR size;
  3. LR view = antialiased bilinear downscale of that processed HR tensor;
  4. HR view = the same tensor cut into zoom x zoom crops of the LR size, row-major.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
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
ORIENTATION_TAG = 274  # EXIF


class ImageError(ValueError):
    """An input that cannot be used as an image; the message is meant for the user."""


@dataclass
class OpenedImage:
    """An input opened as an upright RGB image, and what was done to it on the way (one sentence each)."""

    image: Image.Image
    notices: list[str] = field(default_factory=list)


def load_image(source: str | Path | bytes | Image.Image | np.ndarray) -> Image.Image:
    """Open anything image-like as an RGB PIL image, upright, or raise ImageError with a clear message."""
    return open_image(source).image


def open_image(source: str | Path | bytes | Image.Image | np.ndarray) -> OpenedImage:
    """`load_image`, with notices of what it changed: EXIF rotation, palette/RGBA (composited on white), grayscale,
    CMYK and 16-bit inputs, the first frame of an animation."""
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
    notices = []
    if getattr(image, "n_frames", 1) > 1:
        notices.append(f"The image has {image.n_frames} frames (an animation): only the first one is used.")
    try:
        image.load()
        if image.getexif().get(ORIENTATION_TAG, 1) not in (None, 1):
            notices.append("The image was rotated upright following its EXIF orientation.")
        image = ImageOps.exif_transpose(image)
        return OpenedImage(_to_rgb(image, notices), notices)
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"image file is corrupt or truncated ({err})") from None


def _array_to_pil(array: np.ndarray) -> Image.Image:
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4)):
        if array.dtype != np.uint8:
            scale = 255.0 / max(float(array.max()), 1.0) if array.dtype.kind in "iu" else 255.0
            array = np.clip(array.astype(np.float64) * scale, 0, 255).astype(np.uint8)
        return Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[2] == 1 else array)
    raise ImageError(f"an image array must be HxW, HxWx3 or HxWx4, not {array.shape}")


def _to_rgb(image: Image.Image, notices: list[str]) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit grayscale: stretch to 8 bit rather than letting PIL clip to white.
        arr = np.asarray(image, dtype=np.float64)
        hi = arr.max() or 1.0
        image = Image.fromarray(np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8))
        notices.append("The 16-bit image was scaled to 8 bits.")
    if image.mode == "CMYK":
        notices.append("The CMYK image was converted to RGB.")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        notices.append("Transparent areas of the image were filled with white.")
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


# ---- the square the model sees -----------------------------------------------------------------------------------
# LLaVA-1.5 'pad' centres a w x h image on a square of side max(w, h); the LR (g x g) and HR (G x G) token grids
# tile that square. These functions are the one place that geometry is written down.


def square_offset(size: tuple[int, int]) -> tuple[int, int]:
    """(left, top) padding, in original px, of a (width, height) image centred on its square."""
    w, h = size
    side = max(w, h)
    return (side - w) // 2, (side - h) // 2


def padded_margin_cells(size: tuple[int, int], grid: int) -> int:
    """Grid rows (w > h) or columns (h > w) at each side that selection treats as padding: the released model's rule,
    int((|w - h| // 2) / max(w, h) * grid), which rounds the margin down."""
    w, h = size
    return int((abs(w - h) // 2) / max(w, h) * grid)


def box_cells(box, size: tuple[int, int], grid: int) -> np.ndarray:
    """(grid, grid) bool: cells of a grid over the padded square that a pixel box (x0, y0, x1, y1) of the original
    (width, height) image touches."""
    side = max(size)
    ox, oy = square_offset(size)
    x0, y0, x1, y1 = box
    cell = side / grid
    c0, c1 = int((x0 + ox) // cell), int(min(grid - 1, (x1 + ox - 1e-6) // cell))
    r0, r1 = int((y0 + oy) // cell), int(min(grid - 1, (y1 + oy - 1e-6) // cell))
    cells = np.zeros((grid, grid), dtype=bool)
    cells[r0 : r1 + 1, c0 : c1 + 1] = True
    return cells


def boxes_cells(boxes, size: tuple[int, int], grid: int) -> np.ndarray:
    """The union of `box_cells` over several boxes."""
    cells = np.zeros((grid, grid), dtype=bool)
    for box in boxes:
        cells |= box_cells(box, size, grid)
    return cells


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5 'pad': centre the image on a square canvas of its longer side."""
    w, h = image.size
    if w == h:
        return image
    canvas = Image.new(image.mode, (max(w, h), max(w, h)), fill)
    canvas.paste(image, square_offset(image.size))
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
