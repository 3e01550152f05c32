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


# Planted objects: a label and how to draw it (PIL ImageDraw call, fill colour).
SHAPES = {
    'disc': ('ellipse', (220, 30, 30)),
    'square': ('rectangle', (30, 60, 220)),
    'triangle': ('polygon', (40, 190, 40)),
}


def draw_shape(pixels: np.ndarray, shape: str, box) -> None:
  """Draws `shape` filling the pixel box (x1, y1, x2, y2) in place."""
  from PIL import ImageDraw
  image = Image.fromarray(pixels)
  kind, colour = SHAPES[shape]
  draw = ImageDraw.Draw(image)
  x1, y1, x2, y2 = box
  if kind == 'polygon':
    draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=colour)
  else:
    getattr(draw, kind)(box, fill=colour)
  pixels[:] = np.asarray(image)


def make_task_set(folder: Path, count: int, shapes=('disc',), split: str | None = 'train',
                  seed: int = 0, width: int = 320, height: int = 240, start_id: int = 1) -> list[dict]:
  """Images with one planted shape each (cycling through `shapes`) and their tasks.

  Returns Label Studio tasks (JSON export format) whose data.image paths are
  relative to `folder`; images are written under folder/images.
  """
  rng = np.random.default_rng(seed)
  (folder / 'images').mkdir(parents=True, exist_ok=True)
  tasks = []
  for i in range(count):
    shape = shapes[i % len(shapes)]
    pixels = textured_background(width, height, seed=seed * 1000 + i)
    side = int(rng.integers(60, 120))
    x1 = int(rng.integers(0, width - side))
    y1 = int(rng.integers(0, height - side))
    draw_shape(pixels, shape, (x1, y1, x1 + side, y1 + side))
    name = f'images/{split or "all"}-{seed}-{i}.jpg'
    save_jpeg(pixels, folder / name)
    task = {
        'id': start_id + i,
        'data': {'image': name},
        'annotations': [{'id': start_id + i, 'result': [{
            'id': f'r{i}', 'type': 'rectanglelabels', 'from_name': 'label', 'to_name': 'image',
            'original_width': width, 'original_height': height, 'image_rotation': 0,
            'value': {'x': 100 * x1 / width, 'y': 100 * y1 / height,
                      'width': 100 * side / width, 'height': 100 * side / height,
                      'rotation': 0, 'rectanglelabels': [shape]}}]}],
    }
    if split:
      task['meta'] = {'split': split}
    tasks.append(task)
  return tasks
