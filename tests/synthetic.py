"""Small images made inside the tests: textured backgrounds, planted shapes, EXIF."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def textured_background(width: int, height: int, seed: int = 0) -> np.ndarray:
  """uint8 [height, width, 3]: smooth colour blobs plus noise."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(40, 215, (max(2, height // 40), max(2, width // 40), 3))
  smooth = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize(
      (width, height), Image.Resampling.BILINEAR), dtype=np.float32)
  noisy = smooth + rng.normal(0, 12, smooth.shape)
  return np.clip(noisy, 0, 255).astype(np.uint8)


def save_jpeg(pixels: np.ndarray, path: Path, orientation: int | None = None) -> Path:
  """Writes a JPEG, optionally tagged with an EXIF orientation (6 = rotate 90° clockwise to view)."""
  image = Image.fromarray(pixels)
  exif = Image.Exif()
  if orientation is not None:
    exif[0x0112] = orientation
  image.save(path, format='JPEG', quality=92, exif=exif.tobytes())
  return path


def jpeg_bytes(pixels: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format='JPEG')
  return buffer.getvalue()
