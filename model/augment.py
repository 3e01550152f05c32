"""Box-aware augmented views of a training image, with tf-models-official's ops.

View 0 is the image as it is, view 1 its mirror; then random crops that keep
the boxes whose centres they contain (clipped), and last the zoom-outs: the
image shrunk onto a black canvas, so that objects also appear smaller than in
any photo given. Every view is stretched to the model input, as at inference
time; random views are then mirrored at random and colour-jittered at the
input's size (on a phone's photo, jittering before the resize cost several
times more). Zoom-outs are shrunk with Pillow's antialiasing: TensorFlow's
bilinear resize skips pixels when it shrinks, and small objects alias.

The random ops run as traced TensorFlow functions (`Augmenter`): eagerly, the
crop's retry loop alone cost ~100 ms a view in op dispatch. Tracing them
takes ~0.5 s, so a process keeps one per crop scale and global seed
(`shared_augmenter`): a traced op's seed is fixed when it is traced, from the
global seed, and setting that seed again restarts its draws, so a run draws
what a new `Augmenter` would.
"""

from __future__ import annotations

import functools

import numpy as np
import tensorflow as tf
from official.vision.ops import box_ops, preprocess_ops
from PIL import Image

from model.config import ViewsConfig
from model.images import resize_for_model


_PIXELS = tf.TensorSpec([None, None, 3], tf.uint8)
_BOXES = tf.TensorSpec([None, 4], tf.float32)
_IDS = tf.TensorSpec([None], tf.int32)


def _flip_and_jitter(pixels, boxes, class_ids):
  """Mirrored at random and colour-jittered."""
  flip = tf.random.uniform([]) < 0.5
  pixels = tf.cond(flip, lambda: tf.image.flip_left_right(pixels), lambda: pixels)
  boxes = tf.cond(flip, lambda: box_ops.horizontal_flip_boxes(boxes), lambda: boxes)
  pixels = preprocess_ops.color_jitter(pixels, brightness=0.2, contrast=0.2, saturation=0.2)
  return pixels, boxes, class_ids


def _crop(pixels, boxes, class_ids, min_scale):
  """A random crop keeping the boxes whose centres it holds (clipped to it)."""
  return preprocess_ops.random_crop_image_with_boxes_and_labels(
      pixels, boxes, class_ids, min_scale=min_scale, aspect_ratio_range=(0.5, 2.0),
      min_overlap_params=(0.0, 1.4, 0.2, 0.1), max_retry=50)


class Augmenter:
  """The random parts of a view, traced once (any image size, any number of boxes)."""

  def __init__(self, crop_min_scale: float = ViewsConfig.crop_min_scale):
    signature = [_PIXELS, _BOXES, _IDS]
    self.crop = tf.function(functools.partial(_crop, min_scale=crop_min_scale),
                            input_signature=signature)
    self.jitter = tf.function(_flip_and_jitter, input_signature=signature)


def shared_augmenter(crop_min_scale: float = ViewsConfig.crop_min_scale) -> Augmenter:
  """The process's `Augmenter` for this crop scale under the global seed set now."""
  from tensorflow.python.eager import context  # pylint: disable=import-outside-toplevel
  return _augmenter(crop_min_scale, context.global_seed())


@functools.lru_cache(maxsize=8)
def _augmenter(crop_min_scale: float, seed: int | None) -> Augmenter:  # pylint: disable=unused-argument
  return Augmenter(crop_min_scale)


def make_views(image: Image.Image, boxes: np.ndarray, class_ids: np.ndarray, count: int,
               input_size: int, zoom_outs: int = 0,
               zoom_out_scale: tuple[float, float] = ViewsConfig.zoom_out_scale,
               augmenter: Augmenter | None = None, pastes: int = 0,
               paste_scale: tuple[float, float] = ViewsConfig.paste_scale,
               paste_min_side: float = 0.0,
               ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """`count` views of one image (original, mirror, crops), then `zoom_outs` shrunk ones.

  Args:
    image: RGB, upright.
    boxes: float32 [K, 4] normalized (ymin, xmin, ymax, xmax).
    class_ids: int32 [K].
    count: number of views before the zoom-outs (at least 1).
    input_size: side of the model input.
    zoom_outs: number of views of the image shrunk onto a canvas.
    zoom_out_scale: range of the shrink factor.
    augmenter: the traced ops (`shared_augmenter()` when None).
    pastes: the last this many crops get copies of the image's own objects
      pasted in (`paste_objects`), shrunk by a factor drawn from `paste_scale`,
      none under `paste_min_side`.

  Returns:
    (uint8 pixels [S, S, 3] as the model sees them (`images.pixels_to_input`),
    boxes [K', 4], class ids [K']) per view.
    Randomness comes from TensorFlow's global seed (set once per training).
  """
  augmenter = augmenter or shared_augmenter()
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  class_ids = np.asarray(class_ids, np.int32).reshape(-1)
  ids = tf.constant(class_ids)
  original = resize_for_model(image, input_size)
  views = [(original, boxes, class_ids)]
  if count > 1:
    views.append((np.ascontiguousarray(original[:, ::-1]),
                  np.asarray(box_ops.horizontal_flip_boxes(boxes), np.float32), class_ids))
  pixels = tf.constant(np.asarray(image, np.uint8)) if count > 2 and len(boxes) else None
  # numpy draws for the pastes, seeded from the global seed's sequence like the traced ops
  rng = np.random.default_rng(int(tf.random.uniform([], 0, 2**31 - 1, tf.int64))) if pastes else None
  for number in range(count - 2):  # crops of the full-resolution image, stretched to the input
    crop, crop_boxes, crop_ids = (augmenter.crop(pixels, tf.constant(boxes), ids)
                                  if pixels is not None else (original, boxes, ids))
    resized = resize_for_model(Image.fromarray(np.asarray(crop, np.uint8)), input_size)
    if len(boxes) and number >= count - 2 - pastes:
      resized, crop_boxes, crop_ids = paste_objects(resized, np.asarray(crop_boxes), np.asarray(crop_ids),
                                                    image, boxes, class_ids, rng, paste_scale,
                                                    paste_min_side)
    views.append(_jittered(augmenter, resized, crop_boxes, crop_ids))
  for _ in range(zoom_outs):
    shrunk, scale = _shrink_onto_canvas(image, input_size, float(tf.random.uniform(
        [], *zoom_out_scale)))
    views.append(_jittered(augmenter, shrunk, boxes * scale, ids))
  return views


PASTES_PER_VIEW = (1, 3)
PASTE_MAX_COVER = 0.3  # of any box already in the view, and of the pasted one
PASTE_FEATHER = 0.15  # share of a pasted patch's side that fades in at each edge


def paste_objects(view: np.ndarray, view_boxes: np.ndarray, view_ids: np.ndarray,
                  image: Image.Image, boxes: np.ndarray, class_ids: np.ndarray,
                  rng: np.random.Generator, scale: tuple[float, float], min_side: float = 0.0):
  """`view` with 1-3 copies of the image's labeled objects pasted where they cover
  no box much: each a label drawn evenly among the image's, one of its boxes, shrunk
  by a factor in `scale` from its size in the image but to no side (square root of
  its area) under `min_side`, edges faded into the view.

  Returns:
    (pixels, boxes, class ids) of the view with the pasted objects' boxes added.
  """
  side = view.shape[0]
  out = view.astype(np.float32)
  kept_boxes, kept_ids = [b for b in view_boxes.reshape(-1, 4)], list(view_ids.reshape(-1))
  labels = np.unique(class_ids)
  for _ in range(rng.integers(PASTES_PER_VIEW[0], PASTES_PER_VIEW[1] + 1)):
    label = rng.choice(labels)
    ymin, xmin, ymax, xmax = boxes[rng.choice(np.flatnonzero(class_ids == label))]
    low = max(scale[0], min_side / max(np.sqrt((ymax - ymin) * (xmax - xmin)), 1e-6))
    if low > scale[1]:
      continue  # already as small as it may be
    factor = rng.uniform(low, scale[1])
    height, width = round((ymax - ymin) * factor * side), round((xmax - xmin) * factor * side)
    source = (round(xmin * image.width), round(ymin * image.height),
              round(xmax * image.width), round(ymax * image.height))
    if min(height, width) < 4 or source[2] - source[0] < 2 or source[3] - source[1] < 2:
      continue
    for _ in range(10):
      top, left = rng.integers(0, side - height + 1), rng.integers(0, side - width + 1)
      new = np.array([top, left, top + height, left + width], np.float32) / side
      if all(_covers(new, box) <= PASTE_MAX_COVER and _covers(box, new) <= PASTE_MAX_COVER
             for box in kept_boxes):
        break
    else:
      continue
    patch = np.asarray(image.crop(source).resize((width, height), Image.Resampling.BICUBIC,
                                                 reducing_gap=3.0), np.float32)
    alpha = _feather(height, width)[..., None]
    region = out[top:top + height, left:left + width]
    region[:] = alpha * patch + (1.0 - alpha) * region
    kept_boxes.append(new)
    kept_ids.append(label)
  return (np.clip(out, 0, 255).astype(np.uint8), np.asarray(kept_boxes, np.float32).reshape(-1, 4),
          np.asarray(kept_ids, np.int32))


def _covers(a: np.ndarray, b: np.ndarray) -> float:
  """The share of box `b` (ymin, xmin, ymax, xmax) that box `a` covers."""
  height = min(a[2], b[2]) - max(a[0], b[0])
  width = min(a[3], b[3]) - max(a[1], b[1])
  area = (b[2] - b[0]) * (b[3] - b[1])
  return float(max(height, 0) * max(width, 0) / area) if area > 0 else 1.0


def _feather(height: int, width: int) -> np.ndarray:
  """Weights [height, width] rising linearly from the patch's edges to 1 inside."""
  def ramp(n):
    fade = max(1.0, PASTE_FEATHER * n)
    steps = np.arange(n, dtype=np.float32) + 0.5
    return np.clip(np.minimum(steps, n - steps) / fade, 0.0, 1.0)
  return np.outer(ramp(height), ramp(width))


def _jittered(augmenter: Augmenter, pixels, boxes, class_ids):
  """A view mirrored at random and colour-jittered, as numpy arrays."""
  pixels, boxes, class_ids = augmenter.jitter(pixels, tf.constant(boxes, tf.float32), class_ids)
  return (np.asarray(pixels, np.uint8), np.asarray(boxes, np.float32).reshape(-1, 4),
          np.asarray(class_ids, np.int32).reshape(-1))


def _shrink_onto_canvas(image: Image.Image, input_size: int, scale: float):
  """The image stretched to the input and shrunk by ~`scale` into the top-left of a
  black input-sized canvas (as official.vision's scale jitter places it), and the
  factor its boxes scale by."""
  side = max(1, round(input_size * scale))
  canvas = np.zeros((input_size, input_size, 3), np.uint8)
  canvas[:side, :side] = resize_for_model(image, side)
  return canvas, side / input_size
