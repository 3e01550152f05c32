"""Our box coding agrees with the base SSD's: the targets training writes decode back to the
labeled boxes under the scale factors the model config declares (the TF Object Detection
API's (10, 10, 5, 5), which the pretrained box head was trained with)."""

import numpy as np
from official.vision.ops import box_ops

from model import anchors
from model.config import SSDConfig
from model.targets import TargetAssigner

CONFIG = SSDConfig(num_classes=1)


def test_the_config_declares_the_pretrained_box_heads_scale_factors():
  assert tuple(CONFIG.box_scale_factors) == (10.0, 10.0, 5.0, 5.0)


def test_centre_size_anchors_become_corner_boxes():
  # Centre (0.5, 0.4), height 0.2, width 0.1.
  np.testing.assert_allclose(anchors.cycxhw_to_yxyx(np.array([[0.5, 0.4, 0.2, 0.1]])),
                             [[0.4, 0.35, 0.6, 0.45]], atol=1e-6)


def test_training_targets_decode_back_to_the_labeled_boxes():
  anchor_boxes = anchors.cycxhw_to_yxyx(np.array([[0.5, 0.4, 0.2, 0.1], [0.3, 0.7, 0.4, 0.4]],
                                                 np.float32))
  labeled = np.array([[0.38, 0.33, 0.63, 0.46], [0.12, 0.48, 0.5, 0.95]], np.float32)
  classes, encoded = TargetAssigner(anchor_boxes, CONFIG.box_scale_factors).assign(
      labeled, np.array([1, 1]))
  assert classes.tolist() == [1, 1]
  assert np.abs(encoded).max() > 0.1  # not the anchors themselves
  decoded = box_ops.decode_boxes(encoded, anchor_boxes, weights=list(CONFIG.box_scale_factors))
  np.testing.assert_allclose(decoded.numpy(), labeled, atol=1e-5)
