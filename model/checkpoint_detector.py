"""Detections from the tf_keras SSD: decode boxes and run NMS with tf-models-official.

This is the TensorFlow path (the command line, evaluation of checkpoints).
Serving runs the exported .tflite instead, with the post-processing inside it.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from official.vision.modeling.layers import detection_generator
from PIL import Image

from model import anchors as anchors_lib
from model.config import PostprocessConfig
from model.boxes import Detection, normalized_yxyx_to_pixel_xyxy
from model.images import to_model_input


class CheckpointDetector:
  """Runs an SSD on PIL images and returns labeled pixel boxes.

  Args:
    model: an `ssd.SSD`.
    labels: the real labels in class-id order (labels.txt; no background).
    postprocess: score threshold, NMS IoU and how many detections to keep.
  """

  def __init__(self, model, labels, postprocess: PostprocessConfig = PostprocessConfig()):
    if len(labels) != model.config.num_classes:
      raise ValueError(f'{len(labels)} labels for a model with {model.config.num_classes} classes')
    self.model = model
    self.labels = list(labels)
    self.input_size = model.config.input_size
    self.anchors_yxyx = tf.constant(anchors_lib.anchors_yxyx(model.config))
    # Sigmoid scores, background column dropped, class-agnostic NMS (each
    # anchor's likeliest class, then suppression across classes: what the
    # exported .tflite does), boxes clipped to the normalized image. Only the
    # multilevel generator offers class-agnostic NMS; the SSD's flat outputs
    # go in as one level.
    self.generator = detection_generator.MultilevelDetectionGenerator(
        apply_nms=True,
        pre_nms_score_threshold=postprocess.min_score,
        nms_iou_threshold=postprocess.nms_iou_threshold,
        max_num_detections=postprocess.max_detections,
        pre_nms_top_k=1000,
        nms_version='v2',
        use_class_agnostic_nms=True,
        box_coder_weights=list(model.config.box_scale_factors))

  def _detect_batch(self, images):
    outputs = self.model(images, training=False)
    batch = tf.shape(images)[0]
    anchors = tf.broadcast_to(self.anchors_yxyx[None], [batch, *self.anchors_yxyx.shape])

    def one_level(tensor):  # [B, N, K] -> {'0': [B, N, 1, K]}: N locations of one anchor
      return {'0': tensor[:, :, None, :]}

    return self.generator(one_level(outputs['box_encodings']), one_level(outputs['class_logits']),
                          one_level(anchors), image_shape=tf.ones([batch, 2]))

  def detect(self, images: list[Image.Image], batch_size: int = 8) -> list[list[Detection]]:
    """Detections per image, best first, boxes in each original image's pixels."""
    results = []
    for start in range(0, len(images), batch_size):
      chunk = images[start:start + batch_size]
      batch = np.stack([to_model_input(image, self.input_size) for image in chunk])
      found = {k: v.numpy() for k, v in self._detect_batch(tf.constant(batch)).items()
               if k != 'detection_attributes'}
      for i, image in enumerate(chunk):
        count = int(found['num_detections'][i])
        boxes = normalized_yxyx_to_pixel_xyxy(found['detection_boxes'][i, :count],
                                              image.width, image.height)
        results.append([
            # The generator's class ids count the background as 0.
            Detection(self.labels[int(cls) - 1], float(score), tuple(map(float, box)))
            for box, score, cls in zip(boxes, found['detection_scores'][i, :count],
                                       found['detection_classes'][i, :count])
        ])
    return results
