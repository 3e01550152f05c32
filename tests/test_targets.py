"""Anchor targets: positives, the ignore band, forced matches, encoded boxes."""

import numpy as np

from model.targets import IGNORE, TargetAssigner, shared_assigner

# Three anchors (normalized yxyx): one on the object, one half over it, one far away.
ANCHORS = np.array([[0.1, 0.1, 0.5, 0.5], [0.1, 0.3, 0.5, 0.7], [0.6, 0.6, 0.9, 0.9]], np.float32)
SCALES = (10.0, 10.0, 5.0, 5.0)


def test_matched_ignored_and_background_anchors():
  # IoU of the object with anchor 0 is 1, with anchor 1 it is 1/3, with anchor 2 it is 0.
  classes, boxes = TargetAssigner(ANCHORS, SCALES, 0.5, 0.3).assign(
      np.array([[0.1, 0.1, 0.5, 0.5]], np.float32), np.array([2]))
  assert classes.tolist() == [2, IGNORE, 0]  # 1/3 lies between 0.3 and 0.5: ignored
  np.testing.assert_allclose(boxes[0], 0.0, atol=1e-6)  # on its anchor: a zero encoding
  assert not boxes[1:].any()


def test_every_box_claims_its_best_anchor_even_below_the_threshold():
  # A box overlapping anchor 1 by IoU 0.44 at best (in the ignore band) still gets it.
  box = np.array([[0.0, 0.3, 0.6, 0.9]], np.float32)
  classes, boxes = TargetAssigner(ANCHORS, SCALES, 0.5, 0.3).assign(box, np.array([1]))
  assert classes.tolist() == [0, 1, 0]
  ty, tx, th, tw = boxes[1]
  assert abs(ty) < 1e-6 and tx > 0 and th > 0 and tw > 0  # shifted right, taller, wider


def test_an_image_without_boxes_is_all_background():
  classes, boxes = TargetAssigner(ANCHORS, SCALES).assign(np.zeros((0, 4), np.float32),
                                                          np.zeros(0, np.int32))
  assert classes.tolist() == [0, 0, 0] and not boxes.any()


# A grid of 0.2-wide anchors: a 0.1-wide box overlaps its best one by IoU 0.25 at most.
GRID = np.array([[y, x, y + 0.2, x + 0.2] for y in np.arange(0, 0.9, 0.1)
                 for x in np.arange(0, 0.9, 0.1)], np.float32)


def positives(classes):
  return int((classes > 0).sum())


def test_adaptive_matching_gives_a_poorly_covered_box_more_than_its_best_anchor():
  small = np.array([[0.42, 0.42, 0.52, 0.52]], np.float32)
  plain, _ = TargetAssigner(GRID, SCALES).assign(small, np.array([1]))
  adaptive, boxes = TargetAssigner(GRID, SCALES, adaptive_top_k=9).assign(small, np.array([1]))
  assert positives(plain) == 1
  assert positives(adaptive) >= 2
  assert np.all(boxes[adaptive > 0] != 0.0)  # every positive has its encoded box


def test_adaptive_matching_leaves_a_well_covered_box_as_it_was():
  fitting = np.array([[0.4, 0.4, 0.6, 0.6], [0.0, 0.0, 0.25, 0.2]], np.float32)
  ids = np.array([1, 2])
  plain = TargetAssigner(GRID, SCALES).assign(fitting, ids)
  adaptive = TargetAssigner(GRID, SCALES, adaptive_top_k=9).assign(fitting, ids)
  for a, b in zip(plain, adaptive):
    np.testing.assert_array_equal(a, b)


def test_adaptive_matching_on_zoom_outs_only_leaves_other_views_as_they_were():
  small = np.array([[0.42, 0.42, 0.52, 0.52]], np.float32)
  assigner = TargetAssigner(GRID, SCALES, adaptive_top_k=9, adaptive_views='zoom-outs')
  assert positives(assigner.assign(small, np.array([1]))[0]) == 1
  assert positives(assigner.assign(small, np.array([1]), zoomed_out=True)[0]) >= 2


def test_traced_targets_equal_eager_ones_on_random_boxes():
  """The traced assignment (no AutoGraph) computes what the same ops do eagerly."""
  import tensorflow as tf
  from model import anchors as anchors_lib
  from model.config import SSDConfig
  assigner = TargetAssigner(anchors_lib.anchors_yxyx(SSDConfig(num_classes=3)), SCALES, 0.5,
                            0.4, adaptive_top_k=9, adaptive_views='zoom-outs')
  rng = np.random.default_rng(0)
  for case in range(12):
    count = int(rng.integers(1, 15))
    corner = rng.uniform(0, 0.9, (count, 2))
    side = rng.uniform(0.01, 0.5, (count, 2))  # tiny to large
    boxes = np.concatenate([corner, np.minimum(corner + side, 1.0)], axis=1).astype(np.float32)
    ids = rng.integers(1, 4, count).astype(np.int32)
    zoomed_out = bool(case % 2)
    classes, encoded = assigner.assign(boxes, ids, zoomed_out=zoomed_out)
    eager = assigner._targets(tf.constant(boxes), tf.constant(ids), lift=zoomed_out)  # pylint: disable=protected-access
    np.testing.assert_array_equal(classes, eager[0].numpy())
    np.testing.assert_allclose(encoded, eager[1].numpy(), atol=1e-5)
    assert (classes > 0).any()


def test_the_shared_assigner_is_one_per_anchors_and_settings():
  box, ids = np.array([[0.0, 0.3, 0.6, 0.9]], np.float32), np.array([1])
  shared = shared_assigner(ANCHORS, SCALES, 0.5, 0.3)
  assert shared is shared_assigner(ANCHORS.copy(), list(SCALES), 0.5, 0.3)
  assert shared is not shared_assigner(ANCHORS, SCALES, 0.6, 0.3)
  assert shared is not shared_assigner(ANCHORS[:2], SCALES, 0.5, 0.3)
  own = TargetAssigner(ANCHORS, SCALES, 0.5, 0.3).assign(box, ids)
  for made, expected in zip(shared.assign(box, ids), own):
    np.testing.assert_array_equal(made, expected)
