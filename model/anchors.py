"""The SSD anchor grid (TF Object Detection API `multiple_grid_anchor_generator`).

Pure numpy: the grid is a constant of the model, built once per input size,
fed to box decoding in TensorFlow and to the TFLite post-processing op.
"""

from __future__ import annotations

import math

import numpy as np

from model.config import SSDConfig


def anchor_specs(config: SSDConfig) -> list[list[tuple[float, float]]]:
  """(scale, aspect ratio) of every anchor at one cell, per feature map.

  Returns:
    One list per feature map, in the order the heads emit them.
  """
  anchors = config.anchors
  scales = anchors.scales()
  specs = []
  for layer in range(anchors.num_layers):
    if layer == 0 and anchors.reduce_lowest_layer:
      specs.append([(anchors.lowest_layer_scale, 1.0), (scales[0], 2.0),
                    (scales[0], 0.5)])
      continue
    layer_specs = [(scales[layer], ratio) for ratio in anchors.aspect_ratios]
    layer_specs.append((math.sqrt(scales[layer] * scales[layer + 1]), 1.0))
    specs.append(layer_specs)
  return specs


def best_maps(config: SSDConfig, heights: np.ndarray, widths: np.ndarray) -> np.ndarray:
  """The feature map whose anchor shapes fit each box best (IoU of the shapes,
  centred on each other; where on the grid the box lies is left out).

  Args:
    heights, widths: [K] the boxes' sides, normalized to the image.

  Returns:
    int [K]: the index of each box's map.
  """
  heights = np.asarray(heights, np.float64)[:, None]
  widths = np.asarray(widths, np.float64)[:, None]
  fits = []
  for specs in anchor_specs(config):
    scales, ratios = (np.array(values) for values in zip(*specs))
    anchor_h, anchor_w = scales / np.sqrt(ratios), scales * np.sqrt(ratios)
    inter = np.minimum(heights, anchor_h) * np.minimum(widths, anchor_w)
    fits.append((inter / (heights * widths + anchor_h * anchor_w - inter)).max(axis=1))
  return np.argmax(np.stack(fits, axis=1), axis=1)


def generate_anchors_cycxhw(config: SSDConfig) -> np.ndarray:
  """All anchors of the model, normalized to the input image.

  Returns:
    float32 array [num_anchors, 4] of (ycenter, xcenter, height, width) in
    normalized image units, ordered by feature map, then row, then column,
    then anchor spec: the order of the heads' outputs.
  """
  grids = []
  for side, specs in zip(config.feature_map_sizes(), anchor_specs(config)):
    centers = (np.arange(side, dtype=np.float64) + 0.5) / side
    cy, cx = np.meshgrid(centers, centers, indexing='ij')
    scales = np.array([s for s, _ in specs])
    ratios = np.array([r for _, r in specs])
    heights = scales / np.sqrt(ratios)
    widths = scales * np.sqrt(ratios)
    per_cell = len(specs)
    grid = np.stack([
        np.repeat(cy.reshape(-1), per_cell),
        np.repeat(cx.reshape(-1), per_cell),
        np.tile(heights, side * side),
        np.tile(widths, side * side),
    ], axis=-1)
    grids.append(grid)
  return np.concatenate(grids, axis=0).astype(np.float32)


def cycxhw_to_yxyx(anchors: np.ndarray) -> np.ndarray:
  """(ycenter, xcenter, h, w) -> (ymin, xmin, ymax, xmax), same units.

  Raises:
    ValueError: if the last dimension is not 4.
  """
  if anchors.shape[-1] != 4:
    raise ValueError(f'anchors must end in 4 coordinates, got shape {anchors.shape}')
  cy, cx, h, w = np.split(anchors, 4, axis=-1)
  return np.concatenate([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2],
                        axis=-1).astype(anchors.dtype)


def anchors_yxyx(config: SSDConfig) -> np.ndarray:
  """The network's anchors as float32 [N, 4] normalized (ymin, xmin, ymax, xmax)."""
  return cycxhw_to_yxyx(generate_anchors_cycxhw(config))
