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
# Each shape in two more colours: labels told apart by shape within a colour
# and by colour within a shape (the benchmarks' many-class set).
COLOURS = {'yellow': (230, 200, 20), 'purple': (140, 40, 170)}
SHAPES.update({f'{colour} {shape}': (kind, fill) for shape, (kind, _) in dict(SHAPES).items()
               for colour, fill in COLOURS.items()})


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
                  seed: int = 0, width: int = 320, height: int = 240, start_id: int = 1,
                  sides: tuple[int, int] = (60, 120), per_image: int = 1,
                  log_sides: bool = False) -> list[dict]:
  """Images with `per_image` planted shapes each (cycling through `shapes`) and their tasks.

  Shapes are squares-ish of a side drawn from `sides` (pixels, high end
  excluded; uniform in its logarithm with `log_sides`, so that each scale
  is as common), placed without overlapping where a free spot is found. Returns Label Studio tasks (JSON
  export format) whose data.image paths are relative to `folder`; images are
  written under folder/images.
  """
  rng = np.random.default_rng(seed)
  (folder / 'images').mkdir(parents=True, exist_ok=True)
  tasks = []
  planted = 0
  for i in range(count):
    pixels = textured_background(width, height, seed=seed * 1000 + i)
    boxes = []
    for _ in range(per_image):
      side = (int(np.exp(rng.uniform(*np.log(sides)))) if log_sides
              else int(rng.integers(*sides)))
      for _ in range(100):  # a free spot
        x1 = int(rng.integers(0, width - side))
        y1 = int(rng.integers(0, height - side))
        if all(x1 >= bx2 or x1 + side <= bx1 or y1 >= by2 or y1 + side <= by1
               for bx1, by1, bx2, by2, _ in boxes):
          break
      shape = shapes[planted % len(shapes)]
      planted += 1
      draw_shape(pixels, shape, (x1, y1, x1 + side, y1 + side))
      boxes.append((x1, y1, x1 + side, y1 + side, shape))
    name = f'images/{split or "all"}-{seed}-{i}.jpg'
    save_jpeg(pixels, folder / name)
    task = {
        'id': start_id + i,
        'data': {'image': name},
        'annotations': [{'id': start_id + i, 'result': [{
            'id': f'r{i}-{k}', 'type': 'rectanglelabels', 'from_name': 'label', 'to_name': 'image',
            'original_width': width, 'original_height': height, 'image_rotation': 0,
            'value': {'x': 100 * x1 / width, 'y': 100 * y1 / height,
                      'width': 100 * (x2 - x1) / width, 'height': 100 * (y2 - y1) / height,
                      'rotation': 0, 'rectanglelabels': [shape]}}
            for k, (x1, y1, x2, y2, shape) in enumerate(boxes)]}],
    }
    if split:
      task['meta'] = {'split': split}
    tasks.append(task)
  return tasks
