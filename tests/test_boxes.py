"""Detections as the product sees them: pixel boxes, IoU, one label per object."""

import pytest

from model.boxes import Detection, iou_xyxy, one_label_per_object


def test_iou_of_literal_boxes():
  assert iou_xyxy((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
  assert iou_xyxy((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
  assert iou_xyxy((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
  assert iou_xyxy((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0  # empty boxes overlap nothing


def test_one_label_per_object_keeps_the_likeliest_label_of_one_object():
  orange = Detection('orange', 0.87, (10, 10, 50, 50))
  apple_same_place = Detection('apple', 0.70, (12, 11, 52, 50))
  apple_elsewhere = Detection('apple', 0.60, (100, 100, 140, 140))
  assert one_label_per_object([apple_same_place, orange, apple_elsewhere], 0.5) == [
      orange, apple_elsewhere]


def test_one_label_per_object_leaves_touching_objects_and_same_label_boxes_alone():
  left = Detection('cell', 0.9, (0, 0, 10, 10))
  right_other_label = Detection('platelet', 0.8, (6, 0, 16, 10))  # IoU 0.25
  overlapping_same_label = Detection('cell', 0.7, (1, 0, 11, 10))  # NMS's business, not ours
  assert one_label_per_object([left, right_other_label, overlapping_same_label], 0.5) == [
      left, right_other_label, overlapping_same_label]
