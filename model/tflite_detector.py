"""Serving-side inference: a .tflite SSD with ai-edge-litert, no TensorFlow.

Takes an image, returns labeled boxes with scores in the original image's
pixels. Works with both exported files: float32 input in [-1, 1], or the
pixels themselves as uint8 (the int8 file's input maps them onto [-1, 1]).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from model.boxes import Detection, normalized_yxyx_to_pixel_xyxy, overlap_free
from model.config import ExportConfig
from model.images import pixels_to_input, resize_for_model

POSTPROCESS_OP = 'TFLite_Detection_PostProcess'


def tflite_ops(interpreter) -> list[dict]:
  """The operators of a loaded .tflite in execution order (name, input and output tensors).

  The one place that uses the interpreter's private op listing: ai-edge-litert
  has no public one.
  """
  return interpreter._get_ops_details()  # pylint: disable=protected-access


class TFLiteDetector:
  """A .tflite detector with the four TFLite SSD outputs.

  Args:
    model: the .tflite file, or its bytes.
    labels: real labels in class-id order (labels.txt).
    num_threads: interpreter threads (XNNPACK).
    nms_iou_threshold: the exported op's, applied again once boxes are clipped.
  """

  def __init__(self, model: str | Path | bytes, labels: list[str], num_threads: int = 2,
               nms_iou_threshold: float = ExportConfig.nms_iou_threshold):
    from ai_edge_litert.interpreter import Interpreter
    self.labels = list(labels)
    self.nms_iou_threshold = nms_iou_threshold
    source = {'model_content': model} if isinstance(model, bytes) else {'model_path': str(model)}
    self.interpreter = Interpreter(**source, num_threads=num_threads)
    self.interpreter.allocate_tensors()
    (self.input,) = self.interpreter.get_input_details()
    self.input_size = int(self.input['shape'][1])
    self.outputs = self._postprocess_outputs()

  def _postprocess_outputs(self) -> list[int]:
    """Tensor indices of boxes, classes, scores, count: the op's outputs in order."""
    for op in tflite_ops(self.interpreter):
      if op['op_name'] == POSTPROCESS_OP:
        return list(op['outputs'])
    raise ValueError(f'no {POSTPROCESS_OP} op in the model: not a detection .tflite')

  def _input_tensor(self, image: Image.Image) -> np.ndarray:
    pixels = resize_for_model(image, self.input_size)
    if self.input['dtype'] == np.uint8:
      # As a camera hands them over. Requantizing p / 127.5 - 1 with the input's
      # zero point 127 instead gives p - 0.5, rounded to even: odd pixels lose a
      # level, a pattern that cost small objects 0.04 mAP@0.5 (choices.md).
      return pixels[None]
    x = pixels_to_input(pixels)
    if self.input['dtype'] == np.float32:
      return x[None]
    scale, zero_point = self.input['quantization']
    info = np.iinfo(self.input['dtype'])
    q = np.round(x / scale + zero_point)
    return np.clip(q, info.min, info.max).astype(self.input['dtype'])[None]

  def raw(self, image: Image.Image) -> dict[str, np.ndarray]:
    """The four outputs for one image: boxes [K, 4] normalized yxyx, classes, scores, count."""
    self.interpreter.set_tensor(self.input['index'], self._input_tensor(image))
    self.interpreter.invoke()
    boxes, classes, scores, count = (self.interpreter.get_tensor(i) for i in self.outputs)
    n = int(count.reshape(-1)[0])
    return {'boxes': boxes[0, :n], 'classes': classes[0, :n].astype(np.int32),
            'scores': scores[0, :n], 'count': n}

  def detect(self, image: Image.Image, min_score: float = 0.25) -> list[Detection]:
    """Detections in `image`'s pixels, best first, scores >= min_score.

    Boxes are clipped to the image and suppressed once more, as the checkpoint's
    detector suppresses them clipped: one object, one box.
    """
    out = self.raw(image)
    order = np.argsort(-out['scores'], kind='stable')
    classes, scores = out['classes'][order], out['scores'][order]
    valid = (scores >= min_score) & (classes >= 0) & (classes < len(self.labels))
    classes, scores = classes[valid], scores[valid]
    pixels = normalized_yxyx_to_pixel_xyxy(out['boxes'][order][valid], image.width, image.height)
    return [Detection(self.labels[classes[i]], float(scores[i]), tuple(map(float, pixels[i])))
            for i in overlap_free(pixels, self.nms_iou_threshold)]
