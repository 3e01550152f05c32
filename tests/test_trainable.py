"""What trains: heads only, heads + top of the extractor, + its upper blocks, or everything.

Each mode trains a few steps on the shapes set (the stages up to training,
`pipeline.fit`), then the trained extractor is compared layer by layer with
the base it was restored from.
"""

import numpy as np
import pytest

from model import pipeline, ssd as ssd_lib
from model.config import TrainConfig
from model.tasks import load_tasks_file
from tests.conftest import SMALL_INPUT

SHORT = {'budget.base': 10, 'budget.per_first_image': 0, 'budget.max': 10, 'input.size': SMALL_INPUT,
         'views.max_per_image': 4, 'schedule.heads_only_tail': 0.6}


def top_layer_names() -> set[str]:
  names = {'Conv_1'}
  for index, channels in enumerate(ssd_lib._EXTRA_LAYERS):  # pylint: disable=protected-access
    names.update(ssd_lib.extra_layer_names(index, channels))
  return names


def changed_layers(trained: ssd_lib.SSD, base: ssd_lib.SSD) -> set[str]:
  changed = set()
  for layer in trained.feature_extractor.layers:
    weights = layer.get_weights()
    if not weights:
      continue
    source = base.feature_extractor.get_layer(layer.name).get_weights()
    if any(not np.array_equal(a, b) for a, b in zip(weights, source)):
      changed.add(layer.name)
  return changed


@pytest.fixture(scope='module')
def trained_by_mode(base_paths, shapes_dataset):
  tasks = load_tasks_file(shapes_dataset / 'tasks.json')
  return {mode: pipeline.fit(tasks, shapes_dataset, base_paths.model_dir, pipeline.Stopwatch(),
                             max_images=4, config=TrainConfig(trainable=mode).with_overrides(SHORT))
          for mode in ('heads', 'top', 'upper', 'most', 'all')}


def test_heads_mode_leaves_the_extractor_as_restored(trained_by_mode, base_model):
  assert changed_layers(trained_by_mode['heads'].model, base_model[0]) == set()


def test_top_mode_trains_conv_1_and_the_extra_layers_only(trained_by_mode, base_model):
  assert changed_layers(trained_by_mode['top'].model, base_model[0]) == top_layer_names()


def test_upper_mode_trains_the_stride_16_blocks_and_the_top(trained_by_mode, base_model):
  trained = trained_by_mode['upper'].model
  blocks = tuple(f'expanded_conv_{index}_' for index in range(ssd_lib.FIRST_MAP_BLOCK, 17))
  upper = {layer.name for layer in trained.feature_extractor.layers
           if layer.name.startswith(blocks) and layer.get_weights()}
  assert len(upper) == 4 * 3  # expand, depthwise, project in each of blocks 13..16
  assert changed_layers(trained, base_model[0]) == top_layer_names() | upper


def test_most_mode_trains_all_but_the_stride_8_stem(trained_by_mode, base_model):
  trained = trained_by_mode['most'].model
  first = ssd_lib.FIRST_TRAINED_BLOCK['most']
  blocks = tuple(f'expanded_conv_{index}_' for index in range(first, 17))
  most = {layer.name for layer in trained.feature_extractor.layers
          if layer.name.startswith(blocks) and layer.get_weights()}
  assert len(most) == (17 - first) * 3  # expand, depthwise, project in each of blocks 6..16
  assert changed_layers(trained, base_model[0]) == top_layer_names() | most


def test_all_mode_trains_the_backbone_too(trained_by_mode, base_model):
  changed = changed_layers(trained_by_mode['all'].model, base_model[0])
  assert top_layer_names() <= changed
  assert {'Conv', 'expanded_conv_project'} <= changed  # the first layers


def test_the_mode_is_chosen_and_every_mode_lowers_the_loss(trained_by_mode):
  for mode, fitted in trained_by_mode.items():
    assert fitted.config.trainable == mode
    # A run from the base: no images labeled since a previous version to count;
    # the labels a base class finds are looked at where 'most' may train.
    trainable = fitted.all_choices()['trainable']
    found = trainable.pop('labels_the_base_finds')
    assert trainable == {'value': mode, 'why': 'set', 'other_labels_since': None}
    assert (found is None) == (mode != 'most'), (mode, found)
    losses = fitted.report.losses
    assert np.mean(losses[-5:]) < np.mean(losses[:5]), (mode, losses)


def test_the_class_head_learns_from_the_colour_maps_in_every_mode(trained_by_mode):
  for mode, fitted in trained_by_mode.items():
    kernels = [conv.kernel.numpy() for conv in fitted.model.class_head.colour_convs]
    assert len(kernels) == 6 and kernels[0].any(), mode


def test_the_step_traced_while_the_views_are_made_trains_as_one_traced_at_its_first_step(
    trained_by_mode, base_paths, shapes_dataset, monkeypatch):
  """`pipeline.fit` traces the train step in another thread while it makes the
  views; traced at the first step instead, the same run takes the same steps."""
  import contextlib
  monkeypatch.setattr(pipeline, 'traced_meanwhile', lambda trainer: contextlib.nullcontext())
  tasks = load_tasks_file(shapes_dataset / 'tasks.json')
  fitted = pipeline.fit(tasks, shapes_dataset, base_paths.model_dir, pipeline.Stopwatch(),
                        max_images=4, config=TrainConfig(trainable='top').with_overrides(SHORT))
  assert fitted.report.losses == trained_by_mode['top'].report.losses


def test_a_model_kept_from_the_last_iteration_trains_as_a_new_one(base_paths, shapes_dataset,
                                                                 tmp_path):
  """A process that trains again restores an iteration into the last one's model
  of the same shape, traced step and all (`model_pool`): another project's
  iteration in between (other images, another seed) leaves no trace in it."""
  from model import model_pool
  tasks = load_tasks_file(shapes_dataset / 'tasks.json')
  config = TrainConfig(trainable='top').with_overrides(SHORT)

  def fit():
    return pipeline.fit(tasks, shapes_dataset, base_paths.model_dir, pipeline.Stopwatch(),
                        max_images=4, config=config)
  model_pool.clear()
  built_anew = fit()
  pipeline.train_iteration(tasks, shapes_dataset, tmp_path / 'other', base_paths.model_dir,
                           max_images=6, config=config.with_overrides({'seed': 5}),
                           export_kinds=())
  reused = fit()
  assert reused.built.reused and not built_anew.built.reused
  assert model_pool.take(reused.built.key) is None  # taken: no one else gets it meanwhile
  assert reused.report.losses == built_anew.report.losses
  for kept, new in zip(reused.model.weights, built_anew.model.weights):
    np.testing.assert_array_equal(kept.numpy(), new.numpy(), err_msg=kept.name)


def test_the_last_steps_train_the_heads_alone_on_the_extractor_s_maps(trained_by_mode):
  """With `heads_only_tail` 0.6, the run's last 6 of 10 steps are heads-only steps
  on feature maps computed once: the losses they see are those of the steps
  through the extractor, and they leave the extractor as it is."""
  import tensorflow as tf
  from model.int8_tune import weights_kept
  from model.train import Trainer
  fitted = trained_by_mode['top']
  assert fitted.all_choices()['heads_only_steps']['value'] == 6
  assert trained_by_mode['heads'].all_choices()['heads_only_steps'] == {
      'value': 0, 'why': 'only the heads train'}
  views, model = fitted.views, fitted.model
  trainer = Trainer(model, views.split, fitted.config)
  features = [tf.constant(f) for f in views.train.features]
  maps = trainer.frozen_maps(features)
  targets = tf.constant(views.train.class_targets[:6]), tf.constant(views.train.box_targets[:6])
  through = trainer.losses([tf.cast(f[:6], tf.float32) for f in features], *targets)
  heads = trainer.head_losses([tf.cast(m[:6], tf.float32) for m in maps], *targets)
  np.testing.assert_allclose(np.array(heads), np.array(through), rtol=1e-2)

  extractor = [w.numpy() for w in model.feature_extractor.weights]
  class_head = [w.numpy() for w in model.class_head.weights]
  with weights_kept(model):  # the fixture's model stays as it trained
    trainer.train(views.train, 3, 1e-3, 0.1, heads_only=3)
    for before, after in zip(extractor, model.feature_extractor.weights):
      np.testing.assert_array_equal(before, after.numpy())
    assert any(not np.array_equal(b, a.numpy())
               for b, a in zip(class_head, model.class_head.weights))


def test_heads_only_steps_follow_the_tail_share_and_the_memory_they_need(trained_by_mode):
  from model.train import heads_only_steps
  fitted = trained_by_mode['top']
  split, config = fitted.views.split, fitted.config
  assert heads_only_steps(split, 100, 325, config)[0] == 195
  upper = trained_by_mode['upper']
  count, why = heads_only_steps(upper.views.split, 100, 325, upper.config)
  assert count == 0 and 'lowest feature map' in why
  count, why = heads_only_steps(split, 100, 325, config.with_overrides(
      {'schedule.heads_only_max_mb': 1.0}))
  assert count == 0 and 'MB' in why
  assert heads_only_steps(split, 100, 325, TrainConfig(trainable='top')) == (
      0, 'off (schedule.heads_only_tail is 0)')  # the default
  qat = config.with_overrides({'compression.quantization_aware': True})
  assert heads_only_steps(split, 100, 325, qat) == (
      0, 'quantization-aware or pruned training wraps the extractor to the end')


def test_a_fresh_column_s_first_steps_train_the_heads_alone(trained_by_mode):
  """The shapes' columns start fresh: with `heads_first` 0.3 the first 3 of 10
  steps train the heads on the restored extractor's maps, leaving it as it is;
  the steps after them train it."""
  from model.int8_tune import weights_kept
  from model.train import Trainer
  fitted = trained_by_mode['top']
  assert any(column.head is None for column in fitted.columns)
  assert fitted.all_choices()['heads_first_steps']['value'] == 3
  views, model = fitted.views, fitted.model
  trainer = Trainer(model, views.split, fitted.config)

  def extractor_moves(steps, heads_first):
    before = [w.numpy() for w in model.feature_extractor.weights]
    with weights_kept(model):  # the fixture's model stays as it trained
      trainer.train(views.train, steps, 1e-3, 0.1, heads_first=heads_first)
      return any(not np.array_equal(b, a.numpy())
                 for b, a in zip(before, model.feature_extractor.weights))
  assert not extractor_moves(3, heads_first=3)
  assert extractor_moves(3, heads_first=2)


def test_heads_first_steps_only_where_a_column_starts_fresh_and_the_top_trains(
    trained_by_mode):
  from model.train import heads_first_steps
  split, config = trained_by_mode['top'].views.split, TrainConfig(trainable='top')
  assert heads_first_steps(split, 100, 330, config, fresh_column=True)[0] == 99
  assert heads_first_steps(split, 100, 330, config, fresh_column=False) == (
      0, 'every class column starts from a fitted one')
  assert heads_first_steps(trained_by_mode['heads'].views.split, 100, 330, config, True) == (
      0, 'only the heads train')
  upper = trained_by_mode['upper']
  count, why = heads_first_steps(upper.views.split, 100, 330, upper.config, True)
  assert count == 0 and 'lowest feature map' in why
  count, why = heads_first_steps(split, 100, 330, config.with_overrides(
      {'schedule.heads_only_max_mb': 1.0}), True)
  assert count == 0 and 'MB' in why


def test_split_extractor_reproduces_the_feature_maps(base_model):
  extractor = base_model[0].feature_extractor
  trunk, top = ssd_lib.split_extractor(extractor)
  image = np.random.default_rng(0).uniform(-1, 1, (1, 300, 300, 3)).astype(np.float32)
  whole = extractor(image)
  map0, block = trunk(image)
  parts = [map0, *top(block)]
  for a, b in zip(whole, parts):
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
  trunk, upper = ssd_lib.split_extractor(extractor, ssd_lib.FIRST_TRAINED_BLOCK['upper'])
  assert trunk.output.shape[1:] == (19, 19, 96)  # block 12's output, under map 0
  for a, b in zip(whole, upper(trunk(image))):
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
  trunk, most = ssd_lib.split_extractor(extractor, ssd_lib.FIRST_TRAINED_BLOCK['most'])
  assert trunk.output.shape[1:] == (38, 38, 32)  # block 5's output, at stride 8
  for a, b in zip(whole, most(trunk(image))):
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)


def test_an_unknown_mode_is_refused():
  with pytest.raises(ValueError, match='trainable'):
    TrainConfig(trainable='backbone')


def test_a_trainer_s_steps_are_traced_once(trained_by_mode):
  """Adam's moments exist before the step is traced: a tf.function whose trace
  creates variables is traced twice, which cost a second an iteration."""
  from model.train import Trainer
  fitted = trained_by_mode['top']
  trainer = Trainer(fitted.model, fitted.views.split, fitted.config)
  trainer.trace()
  assert trainer.step.experimental_get_tracing_count() == 1
  assert trainer.heads_step.experimental_get_tracing_count() == 1
  moments = sum(len(v) for v in (trainer.class_variables, trainer.box_variables,
                                 trainer.extractor_variables)) * 2
  assert sum(len(o.variables) for o in trainer.rates.optimizers.values()) == moments + 3


def test_fitted_columns_train_a_share_of_the_first_images_budget_and_say_so(trained_by_mode):
  """The shapes' columns start fresh; were they fitted from base classes, a run
  from the base would train a third of its first images' budget (no heads-first steps),
  all of it where a base class fits weakly, and a warm start its share as before."""
  import dataclasses
  from model.config import TrainConfig
  from model.warm_start import KEPT
  fitted = trained_by_mode['top']
  config, views = TrainConfig(trainable='top'), fitted.views
  fresh = pipeline.plan_schedule(10, fitted.columns, config, views)
  base_fit = [dataclasses.replace(c, head=object(), reason='base class "Dog" fits')
              for c in fitted.columns]
  from_base = pipeline.plan_schedule(10, base_fit, config, views)
  kept = pipeline.plan_schedule(10, [dataclasses.replace(c, reason=KEPT) for c in base_fit],
                                config, views)
  weak = pipeline.plan_schedule(10, [dataclasses.replace(base_fit[0], score=0.06),
                                     *base_fit[1:]], config, views)
  assert (fresh.steps, from_base.steps, kept.steps, weak.steps) == (330, 150, 162, 325)
  assert 'a class column starts fresh' in fresh.steps_why and fresh.heads_first_steps == 99
  assert 'every class column starts from a fitted one' in from_base.steps_why
  assert 'scores under 0.1 on its boxes' in weak.steps_why
  assert from_base.heads_first_steps == weak.heads_first_steps == 0


def test_a_warm_start_that_trains_more_of_the_extractor_takes_the_whole_budget(trained_by_mode,
                                                                               tmp_path):
  """Where more trains than in the previous iteration ('upper' after 'top', 'most' chosen
  for labels mixed up), the added blocks are not warm: the share of a warm start is not
  enough for them."""
  import dataclasses
  import json
  from model.config import TrainConfig
  from model.run_folder import RUN_INFO_FILE
  from model.warm_start import KEPT
  fitted = trained_by_mode['top']
  kept = [dataclasses.replace(c, head=object(), reason=KEPT) for c in fitted.columns]
  (tmp_path / RUN_INFO_FILE).write_text(json.dumps({'train_config': {'trainable': 'top'}}))

  def planned(trainable):
    return pipeline.plan_schedule(10, kept, TrainConfig(trainable=trainable), fitted.views,
                                  tmp_path)
  grown, same = planned('upper'), planned('top')
  assert (grown.steps, same.steps) == (325, 162)
  assert 'more of the extractor trains now (top -> upper)' in grown.steps_why
  assert 'knows every label' in same.steps_why
