"""Detections as the product sees them: pixel boxes and their overlap."""

import numpy as np
import pytest

from model.boxes import iou_xyxy


def test_iou_of_literal_boxes():
  assert iou_xyxy((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
  assert iou_xyxy((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
  assert iou_xyxy((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
  assert iou_xyxy((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0  # empty boxes overlap nothing



def test_overlap_free_drops_a_box_a_better_one_covers_once_both_are_clipped():
  from model.boxes import overlap_free
  # Two boxes past the left edge: IoU 0.28 as the op's NMS saw them, 0.67 clipped at x = 0.
  unclipped = np.array([[-60, 0, 20, 40], [-5, 0, 30, 40]], np.float64)
  clipped = np.clip(unclipped, 0, None)
  assert overlap_free(unclipped, 0.5) == [0, 1]
  assert overlap_free(clipped, 0.5) == [0]
  # Apart, or touching less than the threshold: all kept, in their order.
  apart = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 4]], np.float64)
  assert overlap_free(apart, 0.5) == [0, 1, 2]
  assert overlap_free(np.zeros((0, 4)), 0.5) == []
