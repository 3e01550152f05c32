"""Detections as the rest of the product sees them: label, score, pixel box.

No TensorFlow here: the TFLite detector and the backend share it.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Detection:
  """One detected object.

  Attributes:
    label: class name from the model's label map.
    score: confidence in [0, 1].
    box: (x1, y1, x2, y2) in pixels of the original (upright) image.
  """

  label: str
  score: float
  box: tuple[float, float, float, float]

  def to_json(self) -> dict:
    """The `predict` command's form: integer pixel box, score to 4 decimals."""
    return {'label': self.label, 'score': round(self.score, 4),
            'box': [int(round(v)) for v in self.box]}


def normalized_yxyx_to_pixel_xyxy(boxes: np.ndarray, width: int,
                                  height: int) -> np.ndarray:
  """(ymin, xmin, ymax, xmax) in [0, 1] -> (x1, y1, x2, y2) in pixels, clipped to the image.

  Args:
    boxes: float array [N, 4].
    width, height: size of the original image in pixels.
  """
  boxes = np.clip(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), 0.0, 1.0)
  return np.stack([boxes[:, 1] * width, boxes[:, 0] * height,
                   boxes[:, 3] * width, boxes[:, 2] * height], axis=-1)


def iou_xyxy(a, b) -> float:
  """Intersection over union of two (x1, y1, x2, y2) boxes."""
  ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = ix * iy
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / union if union > 0 else 0.0



def overlap_free(boxes: np.ndarray, iou_threshold: float) -> list[int]:
  """Indices of the boxes (x1, y1, x2, y2), best first, that overlap no better kept
  one by more than `iou_threshold`: greedy suppression, class-agnostic.

  For boxes clipped to the image after TFLite's post-processing op: its NMS
  saw them unclipped, so two boxes past an edge can overlap more once clipped.
  """
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  low = np.maximum(boxes[:, None, :2], boxes[None, :, :2])
  high = np.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
  inter = np.prod(np.clip(high - low, 0, None), axis=-1)
  area = np.prod(boxes[:, 2:] - boxes[:, :2], axis=-1)
  union = area[:, None] + area[None, :] - inter
  iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
  keep = []
  for i in range(len(boxes)):
    if not keep or iou[i, keep].max() <= iou_threshold:
      keep.append(i)
  return keep
