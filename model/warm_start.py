"""A project's model from the base (or from its previous iteration): partial restore.

Like TensorFlow's eager few-shot notebook, the feature extractor and the
box-regression head are restored through a checkpoint object that names only
them (the "fake checkpoint"); the classification head is new, one column per
project label plus the background. Unlike the notebook, a label's column does
not start from noise: it starts from the source class that fits it best.

Class-head layout: a 1x1 conv per feature map whose output channel
`a * (C + 1) + c` is class c (0 = background) of anchor a at that cell.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable

import numpy as np

from model import anchors as anchors_lib, ssd as ssd_lib
from model.config import AnchorConfig, SSDConfig, WarmStartConfig

log = logging.getLogger(__name__)

# Prior probability of a fresh class column: bias = log(p / (1 - p)), as in RetinaNet.
FRESH_PRIOR = 0.01


@dataclasses.dataclass(frozen=True)
class ColumnSource:
  """Where a new class column comes from: column `index` of `head` (None: fresh).

  With `blend`, the column is the weighted mean of several source columns,
  (index, weight) pairs: its logit is the same mean of theirs.
  """

  head: ssd_lib.PredictionHead | None
  index: int
  reason: str
  blend: tuple[tuple[int, float], ...] = ()
  # A base class chosen by its fit: its mean score on the label's boxes (None:
  # named, kept or fresh).
  score: float | None = None


def restore_parts(model: ssd_lib.SSD, checkpoint_prefix: Path, parts: tuple[str, ...]) -> None:
  """Restores exactly `parts` of `model` from a checkpoint of the three named parts.

  Raises:
    AssertionError / ValueError: when a named part does not match the checkpoint.
  """
  status = ssd_lib.checkpoint_for(model, parts=parts).read(str(checkpoint_prefix))
  status.expect_partial().assert_existing_objects_matched()


def base_class_by_name(label: str, base_labels: list[str]) -> int | None:
  """The base class a label names (case-insensitive, spaces/underscores alike), if any."""
  key = label.strip().lower().replace('_', ' ')
  for index, name in enumerate(base_labels):
    if index and name.lower() == key:
      return index
  return None


def _anchor_average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
  """Average precision of ranking anchors by `scores` to find the `positive` ones."""
  order = np.argsort(-scores, kind='stable')
  hits = positive[order]
  precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
  return float((precision * hits).sum() / max(1, hits.sum()))


def class_fit(class_logits: np.ndarray, class_targets: np.ndarray,
              labels: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """How well each source class singles out each label's boxes.

  Fit = average precision of ranking all non-ignored anchors by that class's
  score, with the anchors matched to the label as positives: a class that
  fires on the boxes and stays quiet elsewhere fits. Ties (common with one
  image) go to the class that scores highest on the boxes. Measure it on the
  original images: crops and colour jitter blur which class fits.

  Args:
    class_logits: float [V, N, K] logits of a source head over V images.
    class_targets: int [V, N] targets (1-based label ids, 0 background, -1 ignored).
    labels: the project's labels; label i has id i + 1.

  Returns:
    label -> (fit [K], best score on the label's boxes [K]), for labels with boxes.
  """
  scores = 1.0 / (1.0 + np.exp(-class_logits))
  valid = class_targets >= 0
  result = {}
  for i, label in enumerate(labels):
    matched = class_targets == i + 1
    if not matched.any():
      continue
    on_boxes = np.mean([scores[v][matched[v]].max(axis=0)
                        for v in range(len(scores)) if matched[v].any()], axis=0)
    fit = np.array([_anchor_average_precision(scores[..., k][valid], matched[valid])
                    for k in range(scores.shape[-1])])
    result[label] = (fit + 1e-3 * on_boxes, on_boxes)
  return result


def best_base_class(fit: np.ndarray) -> int:
  """The base class that fits a label's boxes best (`class_fit`), never the background."""
  return int(np.argmax(fit[1:])) + 1


def base_class_finds(fit: np.ndarray, on_boxes: np.ndarray, min_score: float) -> bool:
  """Whether the base class that fits a label best (`class_fit`) finds its boxes: it
  scores `min_score` or more on them. (Also asking for an anchor AP of 0.25 was
  tried: benchmarks/results/choices.md, "A base class finds a label".)"""
  return bool(on_boxes[best_base_class(fit)] >= min_score)


def choose_base_sources(labels: list[str], base_head, base_labels: list[str],
                        fits: dict[str, tuple[np.ndarray, np.ndarray]], blend: int = 1,
                        min_score: float = WarmStartConfig.min_fit_score
                        ) -> dict[str, ColumnSource]:
  """For each label: the base class it names, else the best-fitting one (`class_fit`)
  if it scores `min_score` or more on the label's boxes, else fresh."""
  sources = {}
  for label in labels:
    named = base_class_by_name(label, base_labels)
    if named is not None:
      sources[label] = ColumnSource(base_head, named, f'named base class "{base_labels[named]}"')
      continue
    if label in fits:
      fit, on_boxes = fits[label]
      best = best_base_class(fit)
      if on_boxes[best] >= min_score:
        top = [int(i) + 1 for i in np.argsort(-fit[1:])[:blend]]
        top = [i for i in top if on_boxes[i] >= min_score]
        mix = tuple((i, 1.0 / len(top)) for i in top) if len(top) > 1 else ()
        names = ' + '.join(f'"{base_labels[i]}"' for i in top)
        sources[label] = ColumnSource(
            base_head, best, f'base class {names} fits its boxes best '
            f'(anchor AP {fit[best]:.2f}, score {on_boxes[best]:.2f})', mix,
            float(on_boxes[best]))
        continue
    sources[label] = ColumnSource(None, 0, 'fresh (no base class fits)')
  return sources


def init_class_head(head: ssd_lib.PredictionHead, background: ColumnSource,
                    columns: list[ColumnSource], seed: int) -> None:
  """Sets every column of `head`: background first, then one per label.

  Columns copied from a source head take its kernel and bias for every anchor
  (its colour kernel too, where both heads read colour: else zeros); fresh ones
  get small random kernels, the FRESH_PRIOR bias and no colour.
  """
  rng = np.random.default_rng(seed)
  sources = [background, *columns]
  new_k = len(sources)
  fresh_bias = np.log(FRESH_PRIOR / (1 - FRESH_PRIOR))
  for level, conv in enumerate(head.convs):
    kernel, bias = (w.numpy() for w in conv.weights)
    anchors = kernel.shape[-1] // new_k
    colour = np.zeros(head.colour_convs[level].kernel.shape, np.float32) if head.colour_convs else None
    for c, source in enumerate(sources):
      if source.head is None:
        for a in range(anchors):
          kernel[..., a * new_k + c] = rng.normal(0.0, 0.01, kernel.shape[:-1])
          bias[a * new_k + c] = fresh_bias
        continue
      src_kernel, src_bias = (w.numpy() for w in source.head.convs[level].weights)
      src_colour = (_fit_window(source.head.colour_convs[level].kernel.numpy(), colour.shape[0])
                    if colour is not None and source.head.colour_convs else None)
      for a in range(anchors):
        column, taken = a * new_k + c, _source_column(source, a, src_kernel.shape[-1] // anchors)
        kernel[..., column], bias[column] = taken(src_kernel), taken(src_bias)
        if src_colour is not None:
          colour[..., column] = taken(src_colour)
    conv.set_weights([kernel, bias])
    if colour is not None:
      head.colour_convs[level].set_weights([colour])


def _fit_window(kernel: np.ndarray, side: int) -> np.ndarray:
  """A colour kernel [k, k, ...] as one of side x side (`SSDConfig.colour_kernel`
  changed between runs): a smaller one goes to the centre (the same outputs), a
  larger one's outer taps join its centre tap (the same on a uniform colour)."""
  k = kernel.shape[0]
  if k <= side:
    pad = (side - k) // 2
    return np.pad(kernel, [(pad, pad), (pad, pad)] + [(0, 0)] * (kernel.ndim - 2))
  cut = (k - side) // 2
  inner = kernel[cut:cut + side, cut:cut + side].copy()
  inner[side // 2, side // 2] += kernel.sum((0, 1)) - inner.sum((0, 1))
  return inner


def _source_column(source: ColumnSource, anchor: int, source_columns: int):
  """weights [..., anchors * source_columns] -> the source's column (or blend) of `anchor`."""
  parts = source.blend or ((source.index, 1.0),)
  return lambda weights: sum(w * weights[..., anchor * source_columns + i] for i, w in parts)


def build_project_model(config: SSDConfig, *, parts_from: Path,
                        parts: tuple[str, ...] = ('feature_extractor', 'box_head'),
                        source_anchors: AnchorConfig = AnchorConfig()) -> ssd_lib.SSD:
  """A new SSD of `config` with `parts` restored from the checkpoint at `parts_from`,
  whose box head was trained with `source_anchors`.

  The class head is left as built (random); `init_class_head` fills it.
  """
  model = ssd_lib.build_ssd(config)
  restore_project_model(model, parts_from=parts_from, parts=parts, source_anchors=source_anchors)
  return model


def restore_project_model(model: ssd_lib.SSD, *, parts_from: Path,
                          parts: tuple[str, ...] = ('feature_extractor', 'box_head'),
                          source_anchors: AnchorConfig = AnchorConfig()) -> None:
  """Restores `parts` of a built SSD (`build_project_model`) in place, the box
  head fitted to its anchors."""
  if parts:
    restore_parts(model, parts_from, parts)
  if 'box_head' in parts:
    fit_box_head_to_anchors(model.box_head,
                            dataclasses.replace(model.config, anchors=source_anchors), model.config)


def fit_box_head_to_anchors(head: ssd_lib.PredictionHead, source: SSDConfig,
                            target: SSDConfig) -> None:
  """Rescales a box head trained with `source`'s anchors so that, with
  `target`'s, it decodes the same boxes.

  A box decodes to center = anchor center + t_yx / scale x anchor side and
  side = anchor side x exp(t_hw / scale): an anchor r times smaller needs the
  center outputs r times larger (kernel and bias) and the size outputs
  shifted by scale x log r (bias). Both heads are 1x1 convs, so this is exact.
  """
  factors = target.box_scale_factors
  for conv, old_specs, new_specs in zip(head.convs, anchors_lib.anchor_specs(source),
                                        anchors_lib.anchor_specs(target)):
    kernel, bias = (w.numpy() for w in conv.weights)
    for a, ((old_scale, old_ratio), (new_scale, new_ratio)) in enumerate(zip(old_specs, new_specs)):
      ratio_h = (old_scale / np.sqrt(old_ratio)) / (new_scale / np.sqrt(new_ratio))
      ratio_w = (old_scale * np.sqrt(old_ratio)) / (new_scale * np.sqrt(new_ratio))
      for coordinate, ratio in enumerate((ratio_h, ratio_w)):
        kernel[..., 4 * a + coordinate] *= ratio
        bias[4 * a + coordinate] *= ratio
        bias[4 * a + 2 + coordinate] += factors[2 + coordinate] * np.log(ratio)
    conv.set_weights([kernel, bias])


KEPT = 'kept from the previous iteration'


def columns_for_labels(labels: list[str], previous_labels: list[str] | None,
                       previous_head, base_sources: dict[str, ColumnSource]) -> list[ColumnSource]:
  """Kept labels keep their previous column; new ones start from the base (or fresh)."""
  columns = []
  for label in labels:
    if previous_labels and label in previous_labels:
      columns.append(ColumnSource(previous_head, previous_labels.index(label) + 1, KEPT))
    else:
      columns.append(base_sources[label])
  return columns


def log_sources(labels: list[str], columns: list[ColumnSource]) -> None:
  for label, source in zip(labels, columns):
    log.info('Class head column for "%s": %s', label, source.reason)


@dataclasses.dataclass(frozen=True)
class HeadSources:
  """The class heads a new one can start from.

  Attributes:
    base_head, base_labels: the pretrained SSD's (labels with `???` at 0).
    previous_head, previous_labels: the previous iteration's (real labels), or None.
  """

  base_head: ssd_lib.PredictionHead
  base_labels: list[str]
  previous_head: ssd_lib.PredictionHead | None = None
  previous_labels: list[str] | None = None


def start_class_head(head: ssd_lib.PredictionHead, labels: list[str], sources: HeadSources, *,
                     config: WarmStartConfig, seed: int,
                     fit_data: Callable[[], tuple[np.ndarray, np.ndarray]]) -> list[ColumnSource]:
  """Fills every column of `head`: the background and kept labels from the previous
  iteration, new labels from the base class that names or fits them (or fresh).

  Args:
    config: how new columns start (`class_init`, `blend`, `min_fit_score`).
    fit_data: () -> (base class logits [V, N, K], class targets [V, N]) on the
      training images as they are; called only when a new label needs a fit.

  Returns:
    where each label's column came from, in label order.
  """
  previous = sources.previous_labels or []
  new_labels = [label for label in labels if label not in previous]
  # class_init 'fresh': no base class fits anything.
  base_labels = sources.base_labels if config.class_init == 'base-fit' else []
  fits = {}
  if base_labels and any(base_class_by_name(l, base_labels) is None for l in new_labels):
    fits = class_fit(*fit_data(), labels)
  base_sources = choose_base_sources(new_labels, sources.base_head, base_labels, fits,
                                     config.blend, config.min_fit_score)
  columns = columns_for_labels(labels, sources.previous_labels, sources.previous_head,
                               base_sources)
  if sources.previous_head is not None:
    background = ColumnSource(sources.previous_head, 0, 'background')
  elif config.class_init == 'fresh':
    background = ColumnSource(None, 0, 'background, fresh')
  else:
    background = ColumnSource(sources.base_head, 0, 'background')
  init_class_head(head, background, columns, seed)
  log_sources(labels, columns)
  return columns
