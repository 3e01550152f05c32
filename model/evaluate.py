"""COCO-style mAP with tf-models-official's COCO evaluator (pycocotools).

Works on any detector's output (`Detection`s per image), so the TensorFlow
checkpoint and each .tflite are measured the same way.
"""

from __future__ import annotations

import contextlib
import sys

import numpy as np
from PIL import Image

from model.boxes import Detection
from model.tasks import Example

# Detections per image that COCO mAP counts (its maxDets).
MAX_DETECTIONS = 100


def _average_precision(examples, images, detections, class_id) -> tuple[float, float, int]:
  """(mAP@0.5, mAP@[.5:.95], ground-truth boxes) over the classes in `class_id`."""
  import tensorflow as tf
  from official.vision.evaluation import coco_evaluator
  evaluator = coco_evaluator.COCOEvaluator(annotation_file=None, include_mask=False,
                                           need_rescale_bboxes=False)
  total_boxes = 0
  for image_id, (example, image, found) in enumerate(zip(examples, images, detections), start=1):
    keep = [i for i, label in enumerate(example.labels) if label in class_id]
    scale = np.array([image.height, image.width, image.height, image.width], np.float32)
    gt_boxes = np.zeros((max(1, len(keep)), 4), np.float32)
    gt_classes = np.zeros(max(1, len(keep)), np.int32)
    if keep:
      gt_boxes[:] = example.boxes[keep] * scale
      gt_classes[:] = [class_id[example.labels[i]] for i in keep]
    total_boxes += len(keep)
    found = sorted((d for d in found if d.label in class_id), key=lambda d: -d.score)
    found = found[:MAX_DETECTIONS]
    # The evaluator wants the same K for every image, and COCOeval only scores
    # images that have a prediction: pad with zero-score empty boxes, which
    # rank last and so change no precision or recall.
    boxes = np.zeros((MAX_DETECTIONS, 4), np.float32)
    classes = np.full(MAX_DETECTIONS, min(class_id.values()), np.int32)
    scores = np.zeros(MAX_DETECTIONS, np.float32)
    if found:
      boxes[:len(found)] = [(d.box[1], d.box[0], d.box[3], d.box[2]) for d in found]
      classes[:len(found)] = [class_id[d.label] for d in found]
      scores[:len(found)] = [d.score for d in found]
    groundtruth = {
        'source_id': np.array([image_id]), 'height': np.array([image.height]),
        'width': np.array([image.width]), 'num_detections': np.array([len(keep)]), 'boxes': gt_boxes[None], 'classes': gt_classes[None],
    }
    prediction = {
        'source_id': np.array([image_id]), 'num_detections': np.array([len(found)]),
        'detection_boxes': boxes[None], 'detection_classes': classes[None],
        'detection_scores': scores[None],
    }
    # The evaluator wants tensors (it calls .numpy() on every field).
    evaluator.update_state(tf.nest.map_structure(tf.constant, groundtruth),
                           tf.nest.map_structure(tf.constant, prediction))
  if total_boxes == 0:
    return 0.0, 0.0, 0
  with contextlib.redirect_stdout(sys.stderr):  # pycocotools prints its summary
    metrics = evaluator.result()
  return float(metrics['AP50']), float(metrics['AP']), total_boxes


def coco_map(examples: list[Example], images: list[Image.Image],
             detections: list[list[Detection]], labels: list[str]) -> dict:
  """mAP@0.5 and mAP@[.5:.95], overall and per label (fractions 0-1).

  Args:
    examples: ground truth (normalized boxes, label names).
    images: the decoded images (for their sizes), aligned with `examples`.
    detections: per image, boxes in pixels.
    labels: the model's labels; ground truth with other labels is ignored.

  Returns:
    {"map50", "map", "per_class": {label: {"map50", "map"}}, "images", "boxes"}.

  Raises:
    ValueError: when no ground-truth box carries one of `labels`.
  """
  class_id = {label: i + 1 for i, label in enumerate(labels)}
  map50, map_all, boxes = _average_precision(examples, images, detections, class_id)
  if boxes == 0:
    raise ValueError("no ground-truth boxes with the model's labels to evaluate against")
  per_class = {}
  for label, cid in class_id.items():
    if len(class_id) == 1:
      label_map50, label_map, label_boxes = map50, map_all, boxes
    else:
      label_map50, label_map, label_boxes = _average_precision(
          examples, images, detections, {label: cid})
    if label_boxes:
      per_class[label] = {'map50': round(label_map50, 4), 'map': round(label_map, 4)}
  return {'map50': round(map50, 4), 'map': round(map_all, 4), 'per_class': per_class,
          'images': len(examples), 'boxes': boxes}


def found_under_other_labels(examples: list[Example], images: list[Image.Image],
                             detections: list[list[Detection]], labels: list[str],
                             min_score: float) -> tuple[int, int]:
  """(labeled boxes found under another label, labeled boxes found), of the boxes
  whose label is among the detector's `labels` (it cannot name the others).

  A box is found where detections scoring `min_score` or more overlap it at
  IoU `MATCH_IOU` or more; the best-scoring of them names it.
  """
  from model.boxes import iou_xyxy, normalized_yxyx_to_pixel_xyxy
  from model.score_thresholds import MATCH_IOU
  other = found = 0
  for example, image, image_found in zip(examples, images, detections):
    shown = [d for d in image_found if d.score >= min_score]
    truth = normalized_yxyx_to_pixel_xyxy(example.boxes, image.width, image.height)
    for box, label in zip(truth, example.labels):
      if label not in labels:
        continue
      overlapping = [d for d in shown if iou_xyxy(d.box, box) >= MATCH_IOU]
      if overlapping:
        found += 1
        other += max(overlapping, key=lambda d: d.score).label != label
  return other, found


# Detections down to this score reach COCO evaluation: it ranks them all, so the tail counts.
MIN_SCORE = 0.01


def tflite_detect(model, labels: list[str], min_score: float = MIN_SCORE):
  """detect(images) -> detections per image of a .tflite (a path or its bytes)."""
  from model.tflite_detector import TFLiteDetector
  detector = TFLiteDetector(model, labels)
  return lambda images: [detector.detect(image, min_score) for image in images]


def checkpoint_detect(model, labels: list[str], min_score: float = MIN_SCORE):
  """detect(images) -> detections per image of a TensorFlow SSD."""
  from model.checkpoint_detector import CheckpointDetector
  from model.config import PostprocessConfig
  return CheckpointDetector(model, labels, PostprocessConfig(min_score=min_score)).detect


def run_detector(run_dir, kind: str | None = None, min_score: float = MIN_SCORE):
  """A run's detector: its TensorFlow checkpoint (kind None) or one of its .tflite files.

  Returns:
    (detect(images) -> detections per image, the run's labels).
  """
  from model import run_folder
  if kind:
    paths, labels, _ = run_folder.read_run(run_dir)
    return tflite_detect(paths.tflite(kind), labels, min_score), labels
  model, labels = run_folder.load_run_model(run_dir)
  return checkpoint_detect(model, labels, min_score), labels


def evaluate_run(run_dir, examples: list[Example], images: list[Image.Image],
                 kind: str | None = None) -> dict:
  """`coco_map` of a run folder's checkpoint (kind None) or .tflite (FLOAT, INT8) on examples."""
  detect, labels = run_detector(run_dir, kind)
  return coco_map(examples, images, detect(images), labels)
