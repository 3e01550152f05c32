"""The detector's typed settings: choices made from the data, and what is refused."""

import pytest

from model.config import AnchorConfig, ExportConfig, TrainConfig


def test_the_lowest_anchor_is_the_base_s_unless_set():
  assert TrainConfig().with_overrides({'input.size': 300}).input.ssd_config(2).anchors \
      == AnchorConfig()
  chosen = TrainConfig().with_overrides({'input.size': 448, 'input.lowest_anchor': 0.05}).input
  assert chosen.ssd_config(3).anchors.lowest_layer_scale == 0.05
  assert chosen.ssd_config(3).input_size == 448
  with pytest.raises(ValueError):
    TrainConfig().with_overrides({'input.lowest_anchor': 0.0})


def test_input_size_grows_until_the_smallest_label_spans_36_pixels():
  config = TrainConfig()
  assert config.input.choose({'raccoon': 0.69})[0] == 300
  # BCCD: platelets typically 21 px at 300 (36 at 512); red cells 55
  size, why = config.input.choose({'RBC': 55 / 300, 'Platelets': 21 / 300})
  assert size == 512 and '"Platelets"' in why and '36 px at 512' in why
  assert config.input.choose({'duck': 0.156})[0] == 300  # 47 px
  assert config.input.choose({'thing': 0.1})[0] == 384  # 30 px at 300, 38 at 384
  assert config.input.choose({'speck': 0.01})[0] == 512  # the largest there is
  assert config.with_overrides({'input.size': 384}).input.choose({'speck': 0.01}) == (384, 'set')
  with pytest.raises(ValueError, match='even'):
    config.with_overrides({'input.size': 301})


def test_a_label_s_typical_side_is_the_quantile_of_its_boxes_the_input_asks_for():
  from types import SimpleNamespace
  from model import choices
  # One label's squares of sides 0.06 .. 0.24 (18 .. 72 px at 300).
  sides = [0.06, 0.08, 0.10, 0.12, 0.14, 0.16, 0.18, 0.20, 0.22, 0.24]
  examples = [SimpleNamespace(labels=['apple'], boxes=[(0.0, 0.0, side, side)]) for side in sides]
  assert choices.typical_sides(examples)['apple'] == pytest.approx(0.15)  # the median
  assert choices.typical_sides(examples, 0.25)['apple'] == pytest.approx(0.105)
  median = TrainConfig().with_overrides({'input.size_quantile': 0.5}).input
  lower = TrainConfig().with_overrides({'input.size_quantile': 0.25}).input
  assert median.choose(choices.typical_sides(examples, median.size_quantile))[0] == 300
  assert lower.choose(choices.typical_sides(examples, lower.size_quantile))[0] == 384
  with pytest.raises(ValueError, match='size_quantile'):
    TrainConfig().with_overrides({'input.size_quantile': 1.5})


def test_training_images_keep_the_pixels_their_smallest_crop_needs():
  assert TrainConfig().max_image_side() == 1707  # 512 / 0.3
  assert TrainConfig().with_overrides({'input.size': 640}).max_image_side() == 2134


def test_step_budget_per_first_and_further_images():
  config = TrainConfig()
  assert [config.budget.steps(n) for n in (1, 5, 10, 160)] == [75, 275, 325, 1000]
  assert config.with_overrides({'budget.max': 200}).budget.steps(10) == 200
  # A warm start that knows every label trains the share of its images that are new,
  # from a quarter to a half (half when not known), never less than the base.
  budget = config.budget
  assert (budget.steps(10), budget.steps(10, warm=True), budget.steps(1, warm=True)) == (325, 162, 38)
  assert [budget.steps(10, True, new) for new in (0.0, 0.2, 0.4, 0.8)] == [81, 81, 130, 162]
  assert budget.steps(1, True, 0.0) == 25
  # A fresh class column lengthens a run from the base of two to a few images, never a
  # warm start; more images keep their budget.
  assert [budget.steps(n, fresh_column=True) for n in (1, 2, 5, 10, 11, 160)] == [
      75, 150, 330, 330, 335, 1000]
  assert budget.steps(10, True, 0.2, fresh_column=True) == 81
  # Every column fitted: about a third of the first images' budget, from two images
  # on; more images keep theirs, a warm start its share.
  assert [budget.steps(n, fitted_columns=True) for n in (1, 2, 5, 10, 11, 160)] == [
      75, 45, 100, 150, 160, 1000]
  assert budget.steps(10, True, 0.2, fitted_columns=True) == 81
  with pytest.raises(ValueError, match='fitted_factor'):
    config.with_overrides({'budget.fitted_factor': 0})


def test_views_per_image_shrink_as_images_grow_then_stay_close_to_the_photos():
  views = TrainConfig().views

  def chosen(images):
    return views.per_image(images), views.zoom_outs_per_image(images), views.crop_scale(images)
  # A handful: many views each, strong crops and zoom-outs, 480 views at most.
  assert [chosen(n) for n in (1, 60, 99)] == [(16, 7, 0.3), (8, 3, 0.3), (4, 1, 0.3)]
  # Many images: up to 1800 views of mild crops, no zoom-outs; the original and
  # its mirror at least.
  assert [chosen(n) for n in (100, 263, 1000)] == [(16, 0, 0.7), (6, 0, 0.7), (2, 0, 0.7)]
  assert views.why(263) == '263 training images (from 100 on): up to 1800 views, close to the photos'


def test_early_stopping_trusts_the_held_out_loss_only_from_half_the_budget():
  from model.config import EarlyStoppingConfig
  from model.train import EarlyStopping
  stopper = EarlyStopping(400, EarlyStoppingConfig(every=50, patience=2))
  # A low loss early on counts for nothing: no rolling back to step 50.
  assert stopper.observe(50, 0.1) == (False, False)
  assert stopper.observe(150, 0.9) == (False, False)
  assert stopper.observe(200, 0.5) == (True, False)
  assert stopper.observe(250, 0.4) == (True, False)
  assert stopper.observe(300, 0.45) == (False, False)
  assert stopper.observe(350, 0.41) == (False, True)  # 100 steps = 2 x 50 without a better one
  assert stopper.best_step == 250


def test_a_warm_start_draws_its_new_images_views_for_at_least_their_share():
  import numpy as np
  from model.train import batch_odds
  two_of_ten_new = np.array([True] * 8 + [False] * 2)
  odds, share = batch_odds(two_of_ten_new, 0.5)
  assert share == 0.5 and np.isclose(odds[~two_of_ten_new].sum(), 0.5)
  assert np.isclose(odds.sum(), 1.0) and len(set(odds[two_of_ten_new])) == 1
  # Drawn as often as they come: new images that are many already, all new or none.
  assert batch_odds(np.array([True] * 4 + [False] * 6), 0.5) == (None, 0.6)
  assert batch_odds(np.zeros(3, bool), 0.5) == (None, 1.0)
  assert batch_odds(np.ones(3, bool), 0.5) == (None, 0.0)
  assert batch_odds(None, 0.5) == (None, 1.0)  # nothing carried over: nothing to tell apart
  with pytest.raises(ValueError, match='new_image_share'):
    TrainConfig().with_overrides({'schedule.new_image_share': 1.5})


def test_the_heads_alone_take_a_share_of_the_steps_under_one():
  for name in ('heads_first', 'heads_only_tail'):
    with pytest.raises(ValueError, match=name):
      TrainConfig().with_overrides({f'schedule.{name}': 1.0})


def test_most_of_the_extractor_trains_while_images_are_few_and_a_label_is_new_to_the_base():
  config = TrainConfig()
  assert config.choose_trainable(1)[0] == 'most'
  assert config.choose_trainable(config.most_under_images - 1, 0.9)[0] == 'most'
  assert config.choose_trainable(config.most_under_images)[0] == 'upper'
  assert TrainConfig(trainable='top').choose_trainable(10) == ('top', 'set')
  # Every label starts from a column that finds its boxes: the rules below.
  assert config.choose_trainable(10, 0.0, None, labels_fitted=True)[0] == 'top'
  assert config.choose_trainable(10, 0.9, None, labels_fitted=True)[0] == 'upper'


def test_more_of_the_extractor_trains_once_images_are_many_or_boxes_small():
  config = TrainConfig(most_under_images=None)  # the rules under it
  assert config.choose_trainable(10)[0] == 'top'
  assert config.choose_trainable(config.upper_from_images - 1)[0] == 'top'
  assert config.choose_trainable(config.upper_from_images)[0] == 'upper'
  # Most boxes on the lowest map, which only the stride-16 blocks make.
  assert config.choose_trainable(10, lowest_map_share=0.9)[0] == 'upper'
  assert config.choose_trainable(10, lowest_map_share=0.5)[0] == 'top'
  assert TrainConfig(trainable='heads').choose_trainable(500, 1.0) == ('heads', 'set')
  # Many images of small objects: all but the stride-8 stem.
  assert config.choose_trainable(config.most_from_images_of_small_objects, 0.9)[0] == 'most'
  assert config.choose_trainable(config.most_from_images_of_small_objects - 1, 0.9)[0] == 'upper'
  assert config.choose_trainable(500, 0.3)[0] == 'upper'


def test_most_of_the_extractor_trains_where_the_previous_version_mixed_up_labels():
  config = TrainConfig()
  share, least = config.most_from_other_label_share, config.most_from_found_boxes
  assert config.choose_trainable(500, 0.3, (round(share * 40), 40))[0] == 'most'
  assert config.choose_trainable(500, 0.9, (round(share * 40), 40))[0] == 'most'
  assert config.choose_trainable(500, 0.3, (round(share * 40) - 1, 40))[0] == 'upper'
  assert config.choose_trainable(500, 0.3, (least - 1, least - 1))[0] == 'upper'  # too few to tell
  assert config.choose_trainable(500, 0.3, None)[0] == 'upper'
  assert TrainConfig(trainable='upper').choose_trainable(500, 0.3, (40, 40))[0] == 'upper'
  never = config.with_overrides({'most_from_other_label_share': None})
  assert never.choose_trainable(500, 0.3, (40, 40))[0] == 'upper'


def test_the_extractor_moves_faster_only_with_many_images_of_boxes_on_the_lowest_map():
  config = TrainConfig()
  usual, faster = config.schedule.usual_extractor_scale, config.schedule.many_small_extractor_scale
  assert faster > usual
  many = config.views.many_images
  scale, why = config.choose_extractor_scale(many, lowest_map_share=0.94)  # BCCD's cells
  assert scale == faster and '94%' in why
  assert config.choose_extractor_scale(many - 1, 0.94)[0] == usual  # few images: small shapes lost
  assert config.choose_extractor_scale(160, 0.0)[0] == usual  # raccoon's large boxes loosened
  assert config.choose_extractor_scale(500, 0.5)[0] == usual
  set_ = config.with_overrides({'schedule.extractor_scale': 0.2})
  assert set_.choose_extractor_scale(500, 1.0) == (0.2, 'set')


def test_the_extractor_moves_faster_where_most_trains_labels_new_to_the_base():
  config = TrainConfig(trainable='most')
  usual, faster = config.schedule.usual_extractor_scale, config.schedule.new_labels_extractor_scale
  assert faster > usual
  enough = config.schedule.new_labels_fast_from_images
  scale, why = config.choose_extractor_scale(enough, 0.0, base_finds_none=True)
  assert scale == faster and 'no base class finds any label' in why
  assert config.choose_extractor_scale(enough - 1, 0.0, True)[0] == usual  # one image overfits
  assert config.choose_extractor_scale(enough, 0.0, False)[0] == usual  # a base class's label lost
  assert TrainConfig(trainable='upper').choose_extractor_scale(enough, 0.0, True)[0] == usual
  assert config.choose_extractor_scale(enough, 0.0, True, from_base=False)[0] == usual  # warm starts


def test_small_objects_get_the_many_image_views_sooner():
  config = TrainConfig()
  small, usual = config.views.small_objects_many_images, config.views.many_images
  assert small < usual
  value, why = config.choose_many_images(lowest_map_share=0.94)  # BCCD's cells
  assert value == small and '94%' in why
  assert config.choose_many_images(0.01)[0] == usual  # raccoon's large ones lost at 50 images
  assert config.choose_many_images(0.5)[0] == usual
  off = config.with_overrides({'views.small_objects_many_images': None})
  assert off.choose_many_images(0.94)[0] == usual
  # The extractor's faster rate follows the views (`choose_settings` sets the threshold first).
  chosen = config.with_overrides({'views.many_images': small})
  assert chosen.choose_extractor_scale(small, 0.94)[0] == config.schedule.many_small_extractor_scale


def test_adaptive_matching_on_zoom_outs_only_for_objects_the_anchors_cover():
  matching = TrainConfig().matching
  # ducky's duck (0.156 of the image) and raccoons: zoom-outs shrink them under the 0.1 anchor
  assert matching.choose_adaptive(0.156, 0.1)[0] == 'zoom-outs'
  # BCCD's platelets (0.071), the small shapes: already under it
  value, why = matching.choose_adaptive(0.071, 0.1)
  assert value == 'none' and '0.071' in why
  set_ = TrainConfig().with_overrides({'matching.adaptive_views': 'all'}).matching
  assert set_.choose_adaptive(0.01, 0.1) == ('all', 'set')
  with pytest.raises(ValueError, match='adaptive_views'):
    TrainConfig().with_overrides({'matching.adaptive_views': 'some'})


def test_a_tenth_is_held_out_from_20_images_on_unless_told_never(tmp_path):
  from model import pipeline
  from tests.synthetic import make_task_set
  tasks = make_task_set(tmp_path, 20, ('disc',), 'train', seed=21)
  held = pipeline.load_examples(tasks, tmp_path, TrainConfig())
  assert (len(held.fit), len(held.validation)) == (18, 2)
  assert not set(held.fit) & set(held.validation)
  never = pipeline.load_examples(tasks, tmp_path,
                                 TrainConfig().with_overrides({'early_stopping.min_images': None}))
  assert (len(never.fit), never.validation) == (20, [])


def test_the_held_out_images_are_capped_and_the_cap_keeps_the_same_draw(tmp_path):
  from model import pipeline
  from tests.synthetic import make_task_set
  tasks = make_task_set(tmp_path, 40, ('disc',), 'train', seed=22)
  tenth = pipeline.load_examples(tasks, tmp_path, TrainConfig())
  capped = pipeline.load_examples(
      tasks, tmp_path, TrainConfig().with_overrides({'early_stopping.max_validation_images': 3}))
  assert (len(tenth.validation), len(capped.validation)) == (4, 3)
  assert set(capped.validation) < set(tenth.validation)  # the same seed's draw, shortened
  assert len(capped.fit) == 37


def test_the_class_logits_bound_never_reaches_a_score_that_is_reported():
  assert ExportConfig().min_class_logit == -8.0
  ExportConfig(min_class_logit=None)
  with pytest.raises(ValueError, match='nms_score_threshold'):
    ExportConfig(min_class_logit=-4.0)  # sigmoid(-4) = 0.018 passes the threshold of 0.01
