"""Fruit drawn on photos: a stand-in for an everyday-objects set.

Apples, oranges and bananas, shaded and textured, one large or a few or a
pile of overlapping ones per image, most images one kind and some mixed.
Apples and oranges share a silhouette and, for yellow-red apples, nearly a
hue: the mix-up the unshared everyday-objects set showed ("orange 0.87" and
"apple 0.70" on one fruit). `scene` replaces a photo's labels with its fruit.
"""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image

from model.boxes import iou_xyxy

LABELS = ('apple', 'orange', 'banana')
# layout -> (probability, fruit per image (low, high), side as a share of the shorter side)
LAYOUTS = {'one': (0.35, (1, 1), (0.3, 0.6)),
           'few': (0.4, (2, 4), (0.15, 0.3)),
           'pile': (0.25, (5, 9), (0.09, 0.16))}
MIXED_SHARE = 0.4  # images with more than one kind of fruit
PILE_MAX_IOU = 0.3  # how far the fruit of a pile may cover each other


def scene(image: Image.Image, task: dict) -> Image.Image:
  """`image` with fruit drawn on it; `task`'s labels become the fruit's boxes."""
  rng = np.random.default_rng(task['id'])
  pixels = np.asarray(image.convert('RGB'), np.float32)
  height, width = pixels.shape[:2]
  names = list(LAYOUTS)
  layout = names[rng.choice(len(names), p=[LAYOUTS[n][0] for n in names])]
  _, (low, high), sides = LAYOUTS[layout]
  count = int(rng.integers(low, high + 1))
  kinds = (rng.choice(LABELS, count) if rng.random() < MIXED_SHARE
           else [rng.choice(LABELS)] * count)
  centre = rng.uniform([0.3 * width, 0.3 * height], [0.7 * width, 0.7 * height])
  template = task['annotations'][0]['result'][0]
  result = []
  placed = []
  for kind in kinds:
    colour, alpha = _render(str(kind), rng.uniform(*sides) * min(width, height), rng)
    box = _spot(rng, alpha.shape, (width, height), placed, centre if layout == 'pile' else None)
    if box is None:
      continue
    x1, y1, x2, y2 = box
    a = alpha[..., None]
    pixels[y1:y2, x1:x2] = a * colour + (1 - a) * pixels[y1:y2, x1:x2]
    placed.append(box)
    result.append({**template, 'id': f'{kind}-{task["id"]}-{len(result)}', 'value': {
        'x': 100 * x1 / width, 'y': 100 * y1 / height, 'width': 100 * (x2 - x1) / width,
        'height': 100 * (y2 - y1) / height, 'rotation': 0, 'rectanglelabels': [str(kind)]}})
  task['annotations'][0]['result'] = result
  return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _spot(rng, shape, size, placed, pile_centre):
  """(x1, y1, x2, y2) for an object of `shape` (h, w): near `pile_centre` and
  overlapping the others at most PILE_MAX_IOU, else overlapping none."""
  h, w = shape
  width, height = size
  for _ in range(100):
    if pile_centre is not None:
      cx, cy = pile_centre + rng.normal(0, 0.9, 2) * (w, h)
      x, y = int(np.clip(cx - w / 2, 0, width - w)), int(np.clip(cy - h / 2, 0, height - h))
    else:
      x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    box = (x, y, x + w, y + h)
    limit = PILE_MAX_IOU if pile_centre is not None else 0.0
    if all(iou_xyxy(box, other) <= limit for other in placed):
      return box
  return None


def _render(kind: str, side: float, rng) -> tuple[np.ndarray, np.ndarray]:
  """(colour [h, w, 3] 0-255, coverage [h, w] 0-1) of one fruit, cropped to it."""
  n = max(8, int(side * 1.6))
  y, x = (np.mgrid[0:n, 0:n] + 0.5 - n / 2) / (side / 2)  # units of the radius
  if kind == 'banana':
    coverage, shade, tint = _banana(x, y, rng)
  else:
    coverage, shade, tint = _round(kind, x, y, rng)
  rows, cols = np.nonzero(coverage > 0.5)
  crop = np.s_[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
  return shade[crop][..., None] * tint[crop], coverage[crop]


def _round(kind: str, x, y, rng):
  """An apple (slightly wide, dimpled at the stem, streaked) or an orange (round, pitted)."""
  if kind == 'apple':
    hue = rng.choice([rng.uniform(-0.03, 0.02), rng.uniform(0.2, 0.28), rng.uniform(0.06, 0.12)],
                     p=[0.6, 0.25, 0.15])  # red, green, or yellow-red
    base = colorsys.hsv_to_rgb(hue % 1, rng.uniform(0.6, 0.85), rng.uniform(0.65, 0.9))
    x = x / 1.06
    angle = np.arctan2(x, -y)  # 0 at the top
    radius = 1 - 0.12 * np.exp(-(angle / 0.35) ** 2)  # the dimple
    texture = 1 + 0.07 * np.sin(angle * rng.uniform(14, 22))  # streaks
  else:
    base = colorsys.hsv_to_rgb(rng.uniform(0.065, 0.1), rng.uniform(0.8, 0.95), rng.uniform(0.85, 1))
    radius = np.ones_like(x)
    texture = 1 - 0.08 * rng.random(x.shape)  # pits
  distance = np.hypot(x, y) / radius
  coverage = np.clip((1 - distance) * 8 + 0.5, 0, 1)
  shade = _sphere_shade(np.clip(distance, 0, 1), x, y) * texture
  tint = np.broadcast_to(np.array(base) * 255, x.shape + (3,)).copy()
  if kind == 'apple':  # a brown stem in the dimple
    stem = (np.abs(x) < 0.05) & (y > -1.05) & (y < -0.8)
    tint[stem], coverage[stem] = (90, 60, 30), 1
  return coverage, shade, tint


def _sphere_shade(distance, x, y):
  """Light from the upper left on a ball, with a highlight."""
  z = np.sqrt(1 - distance ** 2)
  light = np.array([-0.4, -0.5, 0.77])
  lit = np.clip((x * light[0] + y * light[1]) / np.maximum(np.hypot(x, y), 1e-6)
                * distance + z * light[2], 0, 1)
  return 0.35 + 0.65 * lit + 0.6 * lit ** 30


def _banana(x, y, rng):
  """A yellow (sometimes greenish) crescent, brown at its ends, turned at random."""
  turn = rng.uniform(0, 2 * np.pi)
  x, y = x * np.cos(turn) - y * np.sin(turn), x * np.sin(turn) + y * np.cos(turn)
  outer, thickness = 1.6, 0.45
  radial = np.hypot(x, y - outer + 0.3)  # distance from the arc's centre below
  angle = np.arctan2(x, -(y - outer + 0.3))
  span = 0.62
  inside = (radial < outer) & (radial > outer - thickness) & (np.abs(angle) < span)
  across = np.clip((outer - radial) / thickness, 0, 1)
  coverage = inside.astype(np.float32)
  shade = 0.55 + 0.45 * np.sin(np.pi * across)  # round across its width
  hue = rng.choice([rng.uniform(0.13, 0.16), rng.uniform(0.17, 0.22)], p=[0.7, 0.3])
  tint = np.broadcast_to(np.array(colorsys.hsv_to_rgb(hue, 0.8, 0.95)) * 255,
                         x.shape + (3,)).copy()
  tint[np.abs(angle) > span - 0.06] = (90, 65, 30)
  return coverage, shade, tint
