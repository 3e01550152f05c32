"""Box-aware augmented views of a training image, with tf-models-official's ops.

View 0 is the image as it is, view 1 its mirror; further views are random
crops that keep the boxes whose centres they contain (clipped), each mirrored
at random and colour-jittered. Every view is stretched to the model input, as
at inference time.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from official.vision.ops import box_ops, preprocess_ops
from PIL import Image

from model.images import to_model_input


def make_views(image: Image.Image, boxes: np.ndarray, class_ids: np.ndarray, count: int,
               input_size: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """`count` views of one image.

  Args:
    image: RGB, upright.
    boxes: float32 [K, 4] normalized (ymin, xmin, ymax, xmax).
    class_ids: int32 [K].
    count: number of views (at least 1).
    input_size: side of the model input.

  Returns:
    (model input float32 [S, S, 3] in [-1, 1], boxes [K', 4], class ids [K']) per view.
    Randomness comes from TensorFlow's global seed (set once per training).
  """
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  class_ids = np.asarray(class_ids, np.int32).reshape(-1)
  pixels = tf.constant(np.asarray(image, np.uint8))
  views = [(to_model_input(image, input_size), boxes, class_ids)]
  if count > 1:
    views.append(_view(tf.image.flip_left_right(pixels),
                       box_ops.horizontal_flip_boxes(boxes), class_ids, input_size))
  for _ in range(count - 2):
    crop, crop_boxes, crop_ids = pixels, tf.constant(boxes), tf.constant(class_ids)
    if len(boxes):
      crop, crop_boxes, crop_ids = preprocess_ops.random_crop_image_with_boxes_and_labels(
          pixels, crop_boxes, crop_ids, min_scale=0.3, aspect_ratio_range=(0.5, 2.0),
          min_overlap_params=(0.0, 1.4, 0.2, 0.1), max_retry=50)
    if tf.random.uniform([]) < 0.5:
      crop = tf.image.flip_left_right(crop)
      crop_boxes = box_ops.horizontal_flip_boxes(crop_boxes)
    crop = preprocess_ops.color_jitter(crop, brightness=0.2, contrast=0.2, saturation=0.2)
    views.append(_view(crop, crop_boxes, crop_ids, input_size))
  return views


def _view(pixels, boxes, class_ids, input_size):
  image = Image.fromarray(np.asarray(pixels, np.uint8))
  return (to_model_input(image, input_size),
          np.asarray(boxes, np.float32).reshape(-1, 4),
          np.asarray(class_ids, np.int32).reshape(-1))
