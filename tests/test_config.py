"""The detector's typed settings: choices made from the data, and what is refused."""

import pytest

from model.config import TrainConfig


def test_input_size_grows_until_the_smallest_label_spans_30_pixels():
  config = TrainConfig()
  assert config.input.choose({'raccoon': 0.69})[0] == 300
  # BCCD: platelets typically 21 px at 300; red cells 55
  size, why = config.input.choose({'RBC': 55 / 300, 'Platelets': 21 / 300})
  assert size == 448 and '"Platelets"' in why and '31 px at 448' in why
  assert config.input.choose({'speck': 0.01})[0] == 448  # the largest there is
  assert config.with_overrides({'input.size': 384}).input.choose({'speck': 0.01}) == (384, 'set')
  with pytest.raises(ValueError, match='even'):
    config.with_overrides({'input.size': 301})


def test_step_budget_per_first_and_further_images():
  config = TrainConfig()
  assert [config.budget.steps(n) for n in (1, 5, 10, 160)] == [75, 275, 325, 1000]
  assert config.with_overrides({'budget.max': 200}).budget.steps(10) == 200


def test_views_per_image_shrink_as_images_grow():
  config = TrainConfig()
  assert (config.views.per_image(1), config.views.zoom_outs_per_image(1)) == (16, 7)
  assert (config.views.per_image(240), config.views.zoom_outs_per_image(240)) == (2, 0)
