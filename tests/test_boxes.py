"""Detections as the product sees them: pixel boxes and their overlap."""

import pytest

from model.boxes import iou_xyxy


def test_iou_of_literal_boxes():
  assert iou_xyxy((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
  assert iou_xyxy((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
  assert iou_xyxy((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
  assert iou_xyxy((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0  # empty boxes overlap nothing

