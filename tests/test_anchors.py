"""The SSD anchor grid: count, order and literal values."""

import math

import numpy as np
import pytest

from model import anchors
from model.config import SSDConfig


def test_300_gives_1917_anchors_on_the_od_api_maps():
  config = SSDConfig(num_classes=1)
  assert config.feature_map_sizes() == [19, 10, 5, 3, 2, 1]
  assert config.anchors.anchors_per_location() == [3, 6, 6, 6, 6, 6]
  grid = anchors.generate_anchors_cycxhw(config)
  assert grid.shape == (1917, 4) == (config.num_anchors(), 4)
  assert grid.dtype == np.float32


def test_lowest_layer_has_the_three_reduced_anchors_in_order():
  grid = anchors.generate_anchors_cycxhw(SSDConfig(num_classes=1))
  c = 0.5 / 19
  r2 = math.sqrt(2)
  np.testing.assert_allclose(grid[0:3], [
      [c, c, 0.1, 0.1],
      [c, c, 0.2 / r2, 0.2 * r2],
      [c, c, 0.2 * r2, 0.2 / r2],
  ], rtol=1e-6)
  # Order is row, column, spec: anchor 3 is the next column, anchor 57 the next row.
  np.testing.assert_allclose(grid[3, :2], [c, 1.5 / 19], rtol=1e-6)
  np.testing.assert_allclose(grid[19 * 3, :2], [1.5 / 19, c], rtol=1e-6)


def test_second_layer_scales_ratios_and_interpolated_anchor():
  grid = anchors.generate_anchors_cycxhw(SSDConfig(num_classes=1))
  first = grid[19 * 19 * 3:19 * 19 * 3 + 6]
  s = 0.35  # 0.2 + 0.75 * 1 / 5
  np.testing.assert_allclose(first[:, :2], [[0.05, 0.05]] * 6, rtol=1e-6)
  np.testing.assert_allclose(first[:, 2:], [
      [s, s],
      [s / math.sqrt(2), s * math.sqrt(2)],
      [s * math.sqrt(2), s / math.sqrt(2)],
      [s / math.sqrt(3), s * math.sqrt(3)],
      [s * math.sqrt(3), s / math.sqrt(3)],
      [math.sqrt(0.35 * 0.5), math.sqrt(0.35 * 0.5)],
  ], rtol=1e-5)


def test_last_layer_is_one_centred_cell_reaching_scale_one():
  grid = anchors.generate_anchors_cycxhw(SSDConfig(num_classes=1))
  last = grid[-6:]
  np.testing.assert_allclose(last[:, :2], 0.5)
  np.testing.assert_allclose(last[0, 2:], [0.95, 0.95], rtol=1e-6)
  np.testing.assert_allclose(last[-1, 2:], [math.sqrt(0.95)] * 2, rtol=1e-6)


@pytest.mark.parametrize('size, maps', [(320, [20, 10, 5, 3, 2, 1]),
                                        (640, [40, 20, 10, 5, 3, 2])])
def test_larger_inputs_grow_the_grid(size, maps):
  config = SSDConfig(num_classes=1, input_size=size)
  assert config.feature_map_sizes() == maps
  expected = maps[0] ** 2 * 3 + sum(n * n * 6 for n in maps[1:])
  assert anchors.generate_anchors_cycxhw(config).shape == (expected, 4)


def test_cycxhw_to_yxyx():
  out = anchors.cycxhw_to_yxyx(np.array([[0.5, 0.25, 0.2, 0.1]], np.float32))
  np.testing.assert_allclose(out, [[0.4, 0.2, 0.6, 0.3]], rtol=1e-6)
  with pytest.raises(ValueError):
    anchors.cycxhw_to_yxyx(np.zeros((2, 3)))


@pytest.mark.parametrize('size', [31, 301])
def test_bad_input_sizes_are_refused(size):
  with pytest.raises(ValueError, match='input_size'):
    SSDConfig(num_classes=1, input_size=size)


def test_each_box_goes_to_the_map_whose_anchor_shapes_fit_it_best():
  config = SSDConfig(num_classes=1)
  scales = config.anchors.scales()  # 0.2, 0.35, 0.5, 0.65, 0.8, 0.95, 1.0
  heights = np.array([0.03, 0.1, 0.2 * math.sqrt(2), scales[1], scales[2], 0.99])
  widths = np.array([0.03, 0.1, 0.2 / math.sqrt(2), scales[1], scales[2], 0.99])
  np.testing.assert_array_equal(anchors.best_maps(config, heights, widths), [0, 0, 0, 1, 2, 5])


def test_the_share_of_boxes_on_the_lowest_map_decides_what_trains():
  from types import SimpleNamespace

  from model.config import TrainConfig
  from model.choices import lowest_map_share
  cells = [SimpleNamespace(boxes=np.array([[0.1, 0.1, 0.2, 0.2], [0.5, 0.5, 0.58, 0.6]]))]
  animal = [SimpleNamespace(boxes=np.array([[0.1, 0.2, 0.8, 0.7]]))]
  config = SSDConfig(num_classes=1)
  assert lowest_map_share(cells, config) == 1.0
  assert lowest_map_share(cells + animal * 2, config) == 0.5
  assert lowest_map_share([SimpleNamespace(boxes=np.zeros((0, 4)))], config) == 0.0
  without_few_image_rule = TrainConfig(most_under_images=None)
  assert without_few_image_rule.choose_trainable(10, lowest_map_share(cells, config))[0] == 'upper'
  assert without_few_image_rule.choose_trainable(10, lowest_map_share(animal, config))[0] == 'top'
