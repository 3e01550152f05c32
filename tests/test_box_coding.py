"""Box coding as the base SSD uses it, through tf-models-official's decoder.

The TF Object Detection API's Faster R-CNN coder with scale factors (10, 10,
5, 5): cy = ty/10*ha + ya, cx = tx/10*wa + xa, h = exp(th/5)*ha, w = exp(tw/5)*wa.
"""

import math

import numpy as np
from official.vision.ops import box_ops

from model import anchors
from model.config import SSDConfig

CONFIG = SSDConfig(num_classes=1)
# One anchor: centre (0.5, 0.4), height 0.2, width 0.1.
ANCHOR = anchors.cycxhw_to_yxyx(np.array([[0.5, 0.4, 0.2, 0.1]], np.float32))


def decode(encoding):
  return box_ops.decode_boxes(np.array([encoding], np.float32), ANCHOR,
                              weights=list(CONFIG.box_scale_factors)).numpy()[0]


def test_zero_encoding_is_the_anchor():
  np.testing.assert_allclose(decode([0, 0, 0, 0]), [0.4, 0.35, 0.6, 0.45], atol=1e-6)


def test_centre_shifts_by_one_anchor_size_per_ten():
  # ty = 10 moves the centre down by one anchor height, tx = -10 left by one width.
  np.testing.assert_allclose(decode([10, -10, 0, 0]), [0.6, 0.25, 0.8, 0.35], atol=1e-6)


def test_size_doubles_at_five_ln_two():
  t = 5 * math.log(2)
  np.testing.assert_allclose(decode([0, 0, t, t]), [0.3, 0.3, 0.7, 0.5], atol=1e-6)


def test_encode_then_decode_round_trips():
  box = np.array([[0.1, 0.2, 0.5, 0.9]], np.float32)
  encoded = box_ops.encode_boxes(box, ANCHOR, weights=list(CONFIG.box_scale_factors))
  decoded = box_ops.decode_boxes(encoded, ANCHOR, weights=list(CONFIG.box_scale_factors))
  np.testing.assert_allclose(decoded.numpy(), box, atol=1e-5)
