"""Score thresholds for pre-annotations: per label, the score from which a box is shown.

An annotator fixes a pre-annotation with one edit per box shown that is wrong
(to delete) and one per object left without a box (to draw). Too low a
threshold shows part-boxes and background, too high hides objects; where the
fewest edits lie depends on the data (crowded cells, a lone animal) and on the
model, so an iteration with held-out images chooses it there, label by label,
where the edits cost least (those labeled since the previous version, as that
version detected them, can stand in: a setting, off); drawing a missed box takes
longer than deleting a wrong one (why: benchmarks/results/score_thresholds.md,
choices.md).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from model.config import ScoreThresholdConfig

# A detection is right where it overlaps a box of its label by more than this
# (COCO's matching at mAP@0.5: the best unmatched box, highest scores first).
MATCH_IOU = 0.5


@dataclasses.dataclass(frozen=True)
class Outcomes:
  """One label's detections on some images, matched to its boxes there."""

  scores: np.ndarray  # [D]
  right: np.ndarray  # [D] bool: matched to one of the label's boxes
  boxes: int  # the label's boxes on those images

  def cost(self, threshold: float, missed_cost: float) -> float:
    """An annotator's work when boxes from `threshold` on are shown, in box deletions."""
    wrong, missed = self.edits(threshold)
    return wrong + missed_cost * missed

  def edits(self, threshold: float) -> tuple[int, int]:
    """(boxes shown wrongly, objects missed) when boxes from `threshold` on are shown."""
    shown = self.scores >= threshold
    found = int((shown & self.right).sum())
    return int(shown.sum()) - found, self.boxes - found


def match(examples, images, detections, labels: list[str]) -> dict[str, Outcomes]:
  """label -> its detections' `Outcomes` on `images`.

  Args:
    examples: ground truth aligned with `images` (normalized boxes, label names).
    detections: per image, `Detection`s (pixel boxes), every score the caller wants counted.
  """
  import tensorflow as tf
  from official.vision.evaluation.instance_metrics import COCOMatchingAlgorithm
  from official.vision.ops import box_ops
  class_id = {label: i + 1 for i, label in enumerate(labels)}
  found = [[d for d in image_found if d.label in class_id] for image_found in detections]
  truth = [[i for i, label in enumerate(e.labels) if label in class_id] for e in examples]
  # All images in one batch (the matcher loops over detections, ~1 ms a step in
  # eager mode), padded with class 0, which matches nothing.
  shape = (len(found), max(map(len, found), default=0), max(map(len, truth), default=0) or 1)
  found_boxes, found_classes = np.zeros(shape[:2] + (4,), np.float32), np.zeros(shape[:2], np.int32)
  found_scores = np.full(shape[:2], -1.0, np.float32)
  truth_boxes = np.full((shape[0], shape[2], 4), -1.0, np.float32)
  truth_classes = np.zeros((shape[0], shape[2]), np.int32)
  for n, (example, image, image_found, kept) in enumerate(zip(examples, images, found, truth)):
    scale = np.array([image.height, image.width, image.height, image.width], np.float32)
    for k, d in enumerate(image_found):
      found_boxes[n, k] = (d.box[1], d.box[0], d.box[3], d.box[2])
      found_classes[n, k], found_scores[n, k] = class_id[d.label], d.score
    truth_boxes[n, :len(kept)] = example.boxes[kept] * scale
    truth_classes[n, :len(kept)] = [class_id[example.labels[i]] for i in kept]
  right = np.zeros(shape[:2], bool)
  if shape[1]:
    ious = box_ops.bbox_overlap(tf.constant(found_boxes), tf.constant(truth_boxes))
    is_right, _ = COCOMatchingAlgorithm(iou_thresholds=(MATCH_IOU,))(
        ious, tf.constant(found_classes), tf.constant(found_scores), tf.constant(truth_classes))
    right = is_right.numpy()[..., 0]
  return {label: Outcomes(found_scores[found_classes == cid], right[found_classes == cid],
                          int((truth_classes == cid).sum()))
          for label, cid in class_id.items()}


def choose(held_out: dict[str, Outcomes], config: ScoreThresholdConfig,
           since_previous: dict[str, Outcomes] | None = None) -> dict[str, dict]:
  """label -> {'value': its threshold, 'why'}: where its edits cost least (a missed box
  `config.missed_cost` wrong ones; ties: the threshold nearest `config.default`) on the
  held-out images, given `config.min_boxes` of its boxes there; else, where
  `config.previous_weight` is set (off by default), that share of the way there from
  the default by the images labeled since the previous version as that version
  detected them (`since_previous`: the edits its pre-annotations left the annotator;
  this model scores otherwise), given as many boxes; else the default. (Not the
  training images: the model has learned them, and its right boxes there score far
  above those on new images.)"""
  since_previous = since_previous or {}
  chosen = {}
  for label, outcome in sorted(held_out.items()):
    previous = since_previous.get(label)
    if outcome.boxes >= config.min_boxes:
      chosen[label] = _least_work(outcome, config, 'held-out boxes')
    elif previous is not None and previous.boxes >= config.min_boxes and config.previous_weight:
      chosen[label] = _least_work(previous, config, 'boxes labeled since the previous '
                                  'version, as it detected them', config.previous_weight)
    else:
      since = (f', {previous.boxes} labeled since the previous version'
               if previous and config.previous_weight else '')
      chosen[label] = {'value': config.default, 'why': (
          f'{outcome.boxes} of its boxes held out{since} (under {config.min_boxes}): the default')}
  return chosen


def _least_work(outcome: Outcomes, config: ScoreThresholdConfig, boxes: str,
                weight: float = 1.0) -> dict:
  """{'value', 'why'}: `weight` of the way from the default to where `outcome`'s edits
  cost least (the nearest step of the grid, ties toward the default)."""
  grid, default = config.grid(), config.default
  best = min(grid, key=lambda t: (outcome.cost(t, config.missed_cost), abs(t - default)))
  target = default + weight * (best - default)
  value = min(grid, key=lambda t: (round(abs(t - target), 6), abs(t - default)))
  (wrong, missed), (wrong_0, missed_0) = outcome.edits(best), outcome.edits(default)
  way = ('' if weight == 1.0 or best == default
         else f' ({weight:g} of the way from the default to {best:g})')
  return {'value': value, 'why': (
      f'least work on {outcome.boxes} {boxes}{way}: {wrong} wrong + {missed} missed '
      f'(at {default:g}: {wrong_0} + {missed_0}; a missed box costs {config.missed_cost:g} '
      'wrong ones)')}
