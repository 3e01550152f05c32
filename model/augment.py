"""Box-aware augmented views of a training image, with tf-models-official's ops.

View 0 is the image as it is, view 1 its mirror; then random crops that keep
the boxes whose centres they contain (clipped), and last the shrunk views, so
that objects also appear smaller than in any photo given: mosaics (four of the
crops tiled 2x2) or, where a crop would cut an object, zoom-outs (the image
shrunk onto a black canvas). Every view is stretched to the model input, as at inference
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
               input_size: int, zoom_outs: int = 0, augmenter: Augmenter | None = None,
               shrink: ViewsConfig = ViewsConfig(),
               ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """`count` views of one image (original, mirror, crops), then `zoom_outs` shrunk ones:
  a share `shrink.mosaic` of them 2x2 mosaics of its crops, the rest zoom-outs;
  all zoom-outs where a box spans more than `shrink.mosaic_max_side` of the
  image's height or width, which most crops cut (a mosaic would show parts of it).

  Args:
    image: RGB, upright.
    boxes: float32 [K, 4] normalized (ymin, xmin, ymax, xmax).
    class_ids: int32 [K].
    count: number of views before the zoom-outs (at least 1).
    input_size: side of the model input.
    zoom_outs: number of views of the image shrunk onto a canvas, or tiled.
    augmenter: the traced ops (`shared_augmenter()` when None).
    shrink: the views' settings: `mosaic`, `mosaic_max_side` and the zoom-outs'
      shrink factor range `zoom_out_scale`.

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
  for _ in range(count - 2):  # crops of the full-resolution image, stretched to the input
    crop, crop_boxes, crop_ids = (augmenter.crop(pixels, tf.constant(boxes), ids)
                                  if pixels is not None else (original, boxes, ids))
    resized = resize_for_model(Image.fromarray(np.asarray(crop, np.uint8)), input_size)
    views.append(_jittered(augmenter, resized, crop_boxes, crop_ids))
  largest_side = np.max(boxes[:, 2:] - boxes[:, :2]) if len(boxes) else 0.0
  whole_in_crops = largest_side <= shrink.mosaic_max_side
  mosaics = round(shrink.mosaic * zoom_outs) if count > 2 and whole_in_crops else 0
  for _ in range(zoom_outs - mosaics):
    shrunk, scale = _shrink_onto_canvas(image, input_size, float(tf.random.uniform(
        [], *shrink.zoom_out_scale)))
    views.append(_jittered(augmenter, shrunk, boxes * scale, ids))
  for _ in range(mosaics):
    views.append(_mosaic(views[2:count], input_size))
  return views


def _jittered(augmenter: Augmenter, pixels, boxes, class_ids):
  """A view mirrored at random and colour-jittered, as numpy arrays."""
  pixels, boxes, class_ids = augmenter.jitter(pixels, tf.constant(boxes, tf.float32), class_ids)
  return (np.asarray(pixels, np.uint8), np.asarray(boxes, np.float32).reshape(-1, 4),
          np.asarray(class_ids, np.int32).reshape(-1))


def _mosaic(crops: list, input_size: int):
  """Four of `crops` (views at the input's size) shrunk into the quarters of a 2x2
  grid split at a random point: the objects smaller, among the image's own
  content rather than on a black canvas."""
  split = np.round(tf.random.uniform([2], 0.3, 0.7).numpy() * input_size).astype(int)
  picks = tf.random.uniform([4], 0, len(crops), tf.int32).numpy()
  canvas = np.zeros((input_size, input_size, 3), np.uint8)
  all_boxes, all_ids = [], []
  for pick, (top, left) in zip(picks, [(0, 0), (0, 1), (1, 0), (1, 1)]):
    pixels, boxes, ids = crops[pick]
    y0, y1 = (0, split[0]) if top == 0 else (split[0], input_size)
    x0, x1 = (0, split[1]) if left == 0 else (split[1], input_size)
    tile = Image.fromarray(pixels).resize((x1 - x0, y1 - y0), Image.Resampling.BICUBIC)
    canvas[y0:y1, x0:x1] = np.asarray(tile, np.uint8)
    scale = np.array([y1 - y0, x1 - x0, y1 - y0, x1 - x0], np.float32) / input_size
    all_boxes.append(boxes * scale + np.array([y0, x0, y0, x0], np.float32) / input_size)
    all_ids.append(ids)
  return (canvas, np.concatenate(all_boxes).astype(np.float32).reshape(-1, 4),
          np.concatenate(all_ids).astype(np.int32))


def _shrink_onto_canvas(image: Image.Image, input_size: int, scale: float):
  """The image stretched to the input and shrunk by ~`scale` into the top-left of a
  black input-sized canvas (as official.vision's scale jitter places it), and the
  factor its boxes scale by."""
  side = max(1, round(input_size * scale))
  canvas = np.zeros((input_size, input_size, 3), np.uint8)
  canvas[:side, :side] = resize_for_model(image, side)
  return canvas, side / input_size
