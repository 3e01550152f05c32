"""Anchor targets for SSD training, with tf-models-official's matcher and coder.

Each anchor is matched to the ground-truth box it overlaps most: IoU >= the
positive threshold -> that box's class and encoded box; below the negative
threshold -> background; in between -> ignored. Every box also claims its best
anchor, so no labeled object goes unmatched.

A box that no anchor covers well (small, or of an odd shape) would get that one
anchor only. With `adaptive_top_k`, each box's IoUs are scaled so that its own
threshold, the mean + standard deviation of its k best IoUs (as in ATSS,
Zhang et al. 2020), lands on the positive one; boxes whose threshold is above
it keep their IoUs, so well-covered objects match as before.
"""

from __future__ import annotations

import functools

import numpy as np
import tensorflow as tf
from official.vision.ops import box_matcher, box_ops, iou_similarity, target_gather

IGNORE = -1  # class target of anchors left out of the loss
_POSITIVE, _NEGATIVE, _IGNORED = 1, -1, -2


def shared_assigner(anchors_yxyx: np.ndarray, scale_factors, positive_iou=0.5, negative_iou=0.4,
                    adaptive_top_k=0, adaptive_views='all') -> 'TargetAssigner':
  """The process's `TargetAssigner` for these anchors and settings: its two
  traces take ~0.2 s, which the next iteration of a long-lived process skips."""
  anchors = np.ascontiguousarray(anchors_yxyx, np.float32)
  return _shared(anchors.tobytes(), anchors.shape, tuple(scale_factors), positive_iou,
                 negative_iou, adaptive_top_k, adaptive_views)


@functools.lru_cache(maxsize=4)
def _shared(anchors: bytes, shape, scale_factors, *settings) -> 'TargetAssigner':
  return TargetAssigner(np.frombuffer(anchors, np.float32).reshape(shape), scale_factors,
                        *settings)


class TargetAssigner:
  """Matches anchors to ground truth.

  Args:
    anchors_yxyx: float32 [N, 4] normalized (ymin, xmin, ymax, xmax).
    scale_factors: box coder scale factors (ty, tx, th, tw).
    positive_iou, negative_iou: match thresholds.
    adaptive_top_k: the k of each box's own threshold (0: none).
  """

  def __init__(self, anchors_yxyx: np.ndarray, scale_factors, positive_iou=0.5,
               negative_iou=0.4, adaptive_top_k=0, adaptive_views='all'):
    self.anchors = tf.constant(anchors_yxyx, tf.float32)
    self.positive_iou = positive_iou
    self.negative_iou = negative_iou
    self.adaptive_top_k = adaptive_top_k
    self.adaptive_views = adaptive_views
    self.scale_factors = list(scale_factors)
    self.similarity = iou_similarity.IouSimilarity()
    self.matcher = box_matcher.BoxMatcher(
        thresholds=[negative_iou, positive_iou],
        indicators=[_NEGATIVE, _IGNORED, _POSITIVE],
        force_match_for_each_col=True)
    self.gather = target_gather.TargetGather()
    # Traced once per kind of view: eagerly, dispatching the matcher's ops cost
    # ~20 ms a view, more than augmenting it. Nothing here branches on a tensor
    # in Python, so AutoGraph has nothing to convert: without it both traces
    # take 0.4 s instead of 1.8 s.
    spec = [tf.TensorSpec([None, 4], tf.float32), tf.TensorSpec([None], tf.int32)]
    self._traced = {lift: tf.function(functools.partial(self._targets, lift=lift),
                                      input_signature=spec, autograph=False)
                    for lift in (False, True)}

  def settings(self) -> tuple:
    """Everything but the anchors that decides the targets."""
    return (self.positive_iou, self.negative_iou, self.adaptive_top_k, self.adaptive_views,
            tuple(self.scale_factors))

  def assign(self, boxes: np.ndarray, class_ids: np.ndarray,
             zoomed_out: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Targets of one image.

    Args:
      boxes: float [K, 4] normalized (ymin, xmin, ymax, xmax); K may be 0.
      class_ids: int [K], 1-based (0 is the background).
      zoomed_out: a view whose objects were shrunk (adaptive_views 'zoom-outs').

    Returns:
      class_targets: int32 [N]: 0 background, 1..C a class, IGNORE ignored.
      box_targets: float32 [N, 4] encoded (ty, tx, th, tw); zeros where not positive.
    """
    num_anchors = self.anchors.shape[0]
    if len(boxes) == 0:
      return np.zeros([num_anchors], np.int32), np.zeros([num_anchors, 4], np.float32)
    lift = bool(self.adaptive_top_k) and (zoomed_out or self.adaptive_views == 'all')
    class_targets, box_targets = self._traced[lift](
        tf.constant(boxes, tf.float32), tf.constant(np.asarray(class_ids, np.int32)))
    return class_targets.numpy(), box_targets.numpy()

  def _targets(self, gt_boxes, class_ids, lift: bool):
    similarity = self.similarity(self.anchors, gt_boxes)  # [N, K]
    if lift:
      similarity = self._lift_poorly_covered(similarity)
    matched, indicators = self.matcher(similarity)
    positive = tf.equal(indicators, _POSITIVE)
    matched_classes = self.gather(class_ids[:, None], matched)[:, 0]
    matched_boxes = self.gather(gt_boxes, matched)
    class_targets = tf.where(positive, matched_classes,
                             tf.where(tf.equal(indicators, _IGNORED), IGNORE, 0))
    encoded = box_ops.encode_boxes(matched_boxes, self.anchors, weights=self.scale_factors)
    return class_targets, tf.where(positive[:, None], encoded, 0.0)

  def _lift_poorly_covered(self, similarity: tf.Tensor) -> tf.Tensor:
    """IoUs [N, K] scaled per box so that its adaptive threshold becomes the positive one."""
    best = tf.math.top_k(tf.transpose(similarity), k=self.adaptive_top_k).values  # [K, k]
    mean, variance = tf.nn.moments(best, axes=[1])
    threshold = tf.clip_by_value(mean + tf.sqrt(variance), 1e-3, self.positive_iou)
    return similarity * (self.positive_iou / threshold)[None, :]
