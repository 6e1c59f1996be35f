"""Image decoding and the ADM centre crop (docs/method.md section 1)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def to_rgb(image: Image.Image) -> Image.Image:
    """Grayscale, CMYK, palette and alpha images as RGB (alpha dropped, as the reference's convert('RGB'))."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # palette transparency goes through RGBA, as PIL advises
    return image.convert("RGB")


def decode_image(data: bytes) -> Image.Image:
    """Decode bytes to an RGB PIL image; raises on an undecodable file."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return to_rgb(image)


def adm_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """ADM centre crop: BOX-halve while the short side >= 2 * size, BICUBIC to short side = size, crop (H, W, 3)
    uint8."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return np.ascontiguousarray(arr[top : top + size, left : left + size])


def crop_or_reason(data_of, size: int) -> tuple[np.ndarray | None, str]:
    """(the ADM-cropped image of the bytes ``data_of()`` returns, "") or (None, why it cannot be read): an
    undecodable file is skipped with this reason by `reglue encode` and `reglue make-ref`, never fatal."""
    try:
        return adm_center_crop(decode_image(data_of()), size), ""
    except UnidentifiedImageError:
        return None, "not a recognised image format"
    except Exception as exc:  # noqa: BLE001 - any undecodable file is skipped, never fatal
        return None, f"{type(exc).__name__}: {exc}"
