"""COCO mAP of detections (tf-models-official's evaluator) as the product reports it."""

import numpy as np
import pytest
from PIL import Image

from model.boxes import Detection
from model.evaluate import coco_map, found_under_other_labels
from model.tasks import Example

IMAGE = Image.new('RGB', (200, 100))
# Two objects: a cat on the left, a dog on the right (normalized yxyx).
TRUTH = Example(1, 'a.jpg', 'test', np.array([[0.1, 0.05, 0.9, 0.4], [0.2, 0.6, 0.8, 0.95]],
                                            np.float32), ('cat', 'dog'), True)
CAT = Detection('cat', 0.9, (10, 10, 80, 90))      # the same boxes in pixels
DOG = Detection('dog', 0.8, (120, 20, 190, 80))


def test_perfect_detections_score_one_and_none_score_zero():
  perfect = coco_map([TRUTH], [IMAGE], [[CAT, DOG]], ['cat', 'dog'])
  assert perfect['map50'] == pytest.approx(1.0) and perfect['map'] == pytest.approx(1.0)
  assert perfect['per_class'] == {'cat': {'map50': 1.0, 'map': 1.0},
                                  'dog': {'map50': 1.0, 'map': 1.0}}
  assert (perfect['images'], perfect['boxes']) == (1, 2)
  nothing = coco_map([TRUTH], [IMAGE], [[]], ['cat', 'dog'])
  assert nothing['map50'] == 0.0 and nothing['map'] == 0.0


def test_a_wrong_label_or_a_loose_box_counts_against_its_class_only():
  swapped = Detection('dog', 0.9, CAT.box)
  result = coco_map([TRUTH], [IMAGE], [[swapped, DOG]], ['cat', 'dog'])
  assert result['per_class']['cat']['map50'] == 0.0
  assert 0.0 < result['per_class']['dog']['map50'] < 1.0  # a false dog ranks above the true one
  loose = Detection('cat', 0.9, (10, 10, 80, 50))  # IoU 0.5 with the cat: not > 0.5 for 0.75
  result = coco_map([TRUTH], [IMAGE], [[loose, DOG]], ['cat', 'dog'])
  assert result['per_class']['cat']['map50'] == pytest.approx(1.0)
  assert result['per_class']['cat']['map'] < 0.5


def test_labels_the_model_does_not_have_are_left_out_and_none_at_all_is_an_error():
  only_cats = coco_map([TRUTH], [IMAGE], [[CAT]], ['cat'])
  assert only_cats['map50'] == pytest.approx(1.0) and only_cats['boxes'] == 1
  with pytest.raises(ValueError, match='no ground-truth boxes'):
    coco_map([TRUTH], [IMAGE], [[CAT]], ['bird'])


def test_a_box_is_named_by_the_best_scoring_detection_over_it_and_weak_ones_are_not_shown():
  labels, dog_over_cat = ['cat', 'dog'], Detection('dog', 0.6, (12, 10, 80, 88))

  def named(found, min_score=0.35, known=labels):
    return found_under_other_labels([TRUTH], [IMAGE], [found], known, min_score)
  assert named([CAT, DOG]) == (0, 2)
  assert named([CAT, dog_over_cat, DOG]) == (0, 2)
  assert named([dog_over_cat, DOG]) == (1, 2)
  # Under the score shown, or beside the box (IoU < 0.5): not found at all.
  assert named([dog_over_cat, DOG], min_score=0.7) == (0, 1)
  assert named([Detection('dog', 0.9, (60, 10, 130, 90))]) == (0, 0)
  # A label the detector does not know (new since) is not counted against it.
  assert named([dog_over_cat, DOG], known=['dog']) == (0, 1)
