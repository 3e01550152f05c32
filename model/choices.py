"""What the labeled data decides for a run: metrics.json's `choices`.

The input size from the labels' box sides, what trains and the extractor's
rate from the number of images, how many boxes are small and whether a base
class finds each label (the base .tflite on the first training images), and
the matching; `choose_settings` fills them into the run's `TrainConfig`, each
with the reason it gives. The rules and their thresholds are `config.py`'s;
what they were measured on is `benchmarks/results/choices.md`.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from model.config import TrainConfig

if TYPE_CHECKING:
  from model.pipeline import LaterImages, TrainingSet

log = logging.getLogger(__name__)


def typical_sides(examples, quantile: float = 0.5) -> dict[str, float]:
  """label -> the `quantile` (median) of its boxes' sqrt(height * width),
  normalized to the image side."""
  sides: dict[str, list[float]] = {}
  for example in examples:
    for label, (ymin, xmin, ymax, xmax) in zip(example.labels, example.boxes):
      sides.setdefault(label, []).append(float(np.sqrt((ymax - ymin) * (xmax - xmin))))
  return {label: float(np.quantile(values, quantile)) for label, values in sides.items()}


def lowest_map_share(examples, ssd_config) -> float:
  """The share of the labeled boxes whose best-fitting anchors are the lowest map's."""
  from model.anchors import best_maps
  boxes = np.concatenate([np.reshape(e.boxes, (-1, 4)) for e in examples] or [np.zeros((0, 4))])
  if not len(boxes):
    return 0.0
  return float(np.mean(best_maps(ssd_config, boxes[:, 2] - boxes[:, 0],
                                 boxes[:, 3] - boxes[:, 1]) == 0))


# Training images the base runs on to tell whether a base class finds each label.
FIT_CHECK_IMAGES = 16


def labels_the_base_finds(training: TrainingSet, model_dir: Path, config: TrainConfig
                          ) -> set[str]:
  """The labels a base class finds the boxes of: one the label names, or the one
  that fits its boxes best (`base_fits`) where it scores `budget.fitted_min_score`
  or more on them (`pipeline.start_class_head` measures the fit again on the
  views). What a previous iteration learned does not count: a label new to the
  base stays so, and keeps the extractor's blocks it needs in training."""
  from model import base_weights, warm_start
  if config.warm_start.class_init != 'base-fit':
    return set()  # every column starts fresh
  base_labels = base_weights.read_labels(base_weights.ensure_base(model_dir))
  named = {label for label in training.labels
           if warm_start.base_class_by_name(label, base_labels) is not None}
  if len(named) == len(training.labels):
    return named
  return named | {label for label, (fit, on_boxes) in base_fits(training, model_dir).items()
                  if warm_start.base_class_finds(fit, on_boxes, config.budget.fitted_min_score)}


def base_fits(training: TrainingSet, model_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """`warm_start.class_fit` of every base class to each label: the base .tflite on the
  first FIT_CHECK_IMAGES training images at its own 300 px."""
  from model import anchors as anchors_lib, base_weights, warm_start
  from model.config import SSDConfig
  from model.images import to_model_input
  from model.targets import shared_assigner
  paths = base_weights.ensure_base(model_dir)
  examples, images = training.part(training.fit[:FIT_CHECK_IMAGES])
  base = SSDConfig(num_classes=len(base_weights.read_labels(paths)) - 1)
  assigner = shared_assigner(anchors_lib.anchors_yxyx(base), base.box_scale_factors)
  label_ids = training.label_ids
  targets = np.stack([assigner.assign(e.boxes, [label_ids[l] for l in e.labels])[0]
                      for e in examples])
  inputs = np.stack([to_model_input(image, base.input_size) for image in images])
  logits = base_weights.tflite_raw_outputs(paths.tflite, inputs, exact=False)['class_logits']
  return warm_start.class_fit(logits, targets, training.labels)


def choose_settings(config: TrainConfig, training: TrainingSet,
                    later: LaterImages | None = None,
                    base_finds: set[str] | None = None,
                    from_base: bool = True) -> tuple[TrainConfig, dict]:
  """Fills in what `config` leaves to the data, to how the previous version did on
  the images labeled since (`later`), to the labels a base class finds
  (`base_finds`, from `labels_the_base_finds`; None: not looked at) and to
  whether the run starts `from_base` rather than from a previous iteration.

  Returns:
    (the config with every choice made, {choice: {"value", "why"}} for metrics.json).
  """
  examples = training.part(training.fit)[0]
  sides = typical_sides(examples)
  size, size_why = config.input.choose(typical_sides(examples, config.input.size_quantile))
  if size != config.input.size:
    log.info('Input size %d: %s', size, size_why)
  on_lowest_map = lowest_map_share(
      examples, dataclasses.replace(config.input, size=size).ssd_config(1))
  many, many_why = config.choose_many_images(on_lowest_map)
  config = config.with_overrides({'views.many_images': many})  # the extractor's rate follows it
  other_labels = later.other_labels(config.score_thresholds.default) if later else None
  labels_fitted = base_finds is not None and base_finds >= set(training.labels)
  trainable, trainable_why = config.choose_trainable(len(training.fit), on_lowest_map,
                                                     other_labels, labels_fitted)
  extractor_scale, extractor_why = config.with_overrides(  # the rate follows what trains
      {'trainable': trainable}).choose_extractor_scale(
          len(training.fit), on_lowest_map, base_finds == set(), from_base)
  adaptive, adaptive_why = config.matching.choose_adaptive(
      min(sides.values(), default=1.0), config.input.anchors.lowest_layer_scale)
  return (config.with_overrides({'input.size': size, 'trainable': trainable,
                                 'schedule.extractor_scale': extractor_scale,
                                 'matching.adaptive_views': adaptive}),
          {'input_size': {'value': size, 'why': size_why},
           'trainable': {'value': trainable, 'why': trainable_why,
                         # (boxes the previous version named by another label, found)
                         'other_labels_since': other_labels,
                         'labels_the_base_finds': None if base_finds is None
                         else sorted(base_finds)},
           'extractor_learning_rate_scale': {'value': extractor_scale, 'why': extractor_why},
           'adaptive_matching': {'value': adaptive, 'why': adaptive_why},
           'many_views_from_images': {'value': many, 'why': many_why}})
