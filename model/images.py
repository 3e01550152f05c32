"""Images in, model input out: decoding, EXIF orientation, resizing, scaling.

No TensorFlow here: the serving path uses it too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow refuses images over twice this many pixels (decompression bombs) and
# warns above it; 100 megapixels is far beyond any labeling photo.
Image.MAX_IMAGE_PIXELS = 100_000_000
# Our own limit, checked from the header before any pixel is decoded: a 48
# megapixel phone photo passes, a 24 KB PNG of 14000 x 14000 pixels (1.4 GB
# decoded) does not.
MAX_PIXELS = 50_000_000


class ImageError(ValueError):
  """An image that can't be read; the message names it and says why."""


def load_image(path: str | Path, max_pixels: int = MAX_PIXELS,
               max_side: int | None = None) -> Image.Image:
  """Reads an image file as RGB, turned upright by its EXIF orientation.

  Label Studio shows images upright and measures boxes on that view, so every
  size and box in this project is in the upright image's pixels.

  Args:
    max_side: shrink larger images (aspect kept) to this many pixels on their
      longer side; a JPEG is decoded at a reduced scale first (libjpeg's draft
      mode), several times faster than decoding every pixel.

  Raises:
    ImageError: missing, unreadable, not an image, or a decompression bomb.
  """
  try:
    with Image.open(path) as image:
      if image.width * image.height > max_pixels:
        raise Image.DecompressionBombError(
            f'{image.width} x {image.height} pixels, over the limit of {max_pixels}')
      if max_side is not None:
        image.draft('RGB', _fitted(image.size, max_side))
      image = ImageOps.exif_transpose(image).convert('RGB')
      if max_side is not None and max(image.size) > max_side:
        image = image.resize(_fitted(image.size, max_side), Image.Resampling.BICUBIC,
                             reducing_gap=3.0)
      return image
  except FileNotFoundError as error:
    raise ImageError(f'{path}: no such file') from error
  except Image.DecompressionBombError as error:
    raise ImageError(f'{path}: too large to decode safely ({error})') from error
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
    raise ImageError(f'{path}: not a readable image ({error})') from error


def _fitted(size: tuple[int, int], max_side: int) -> tuple[int, int]:
  """(width, height) scaled so that the longer side is at most `max_side`."""
  scale = min(1.0, max_side / max(size))
  return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def resize_for_model(image: Image.Image, size: int) -> np.ndarray:
  """Stretches an RGB image to size x size (bicubic): uint8 [size, size, 3]."""
  # reducing_gap: shrink by whole factors first, then bicubic. A 4032x3024 phone
  # photo resizes in 23 ms instead of 69 ms; pixels differ by < 1 level on average.
  return np.asarray(image.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0),
                    np.uint8)


def pixels_to_input(pixels: np.ndarray) -> np.ndarray:
  """uint8 pixels -> the model's float32 input in [-1, 1].

  In place on one new array: the same numbers as `x / 127.5 - 1.0`, without a
  second copy (64 calibration views at 300 px are 70 MB).
  """
  inputs = pixels.astype(np.float32)
  inputs /= 127.5
  inputs -= 1.0
  return inputs


def to_model_input(image: Image.Image, size: int) -> np.ndarray:
  """Stretches an RGB image to size x size and scales pixels to [-1, 1]: float32 [size, size, 3]."""
  return pixels_to_input(resize_for_model(image, size))
