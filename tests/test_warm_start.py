"""Partial restore, class-head initialization and incremental label changes."""

import dataclasses
import json
import shutil

import numpy as np
import pytest

from model import anchors as anchors_lib, choices, pipeline, run_folder, ssd as ssd_lib, warm_start
from model import tasks as tasks_lib
from model.config import AnchorConfig, SSDConfig, TrainConfig
from tests.synthetic import make_task_set

# Training kept tiny: these tests check what restores and what carries over, not quality.
TINY = TrainConfig().with_overrides({'budget.base': 30, 'budget.max': 30,
                                     'views.max_per_image': 2})


def class_column(head, level, column, num_columns):
  """Kernel and bias of class `column` for every anchor of one level's conv."""
  kernel, bias = (w.numpy() for w in head.convs[level].weights)
  anchors = kernel.shape[-1] // num_columns
  index = [a * num_columns + column for a in range(anchors)]
  return kernel[..., index], bias[index]


def assert_same_weights(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x.numpy(), y.numpy())


def test_new_model_restores_extractor_and_box_head_but_not_the_class_head(base_model, base_paths):
  base, _ = base_model
  model = warm_start.build_project_model(SSDConfig(num_classes=2), parts_from=base_paths.checkpoint_prefix)
  assert_same_weights(model.feature_extractor.weights, base.feature_extractor.weights)
  assert_same_weights(model.box_head.weights, base.box_head.weights)
  assert [c.filters for c in model.class_head.convs] == [9, 18, 18, 18, 18, 18]
  # Still the builder's random initialization: nothing of the base head came in.
  kernel, _ = class_column(model.class_head, 0, 0, 3)
  base_kernel, _ = class_column(base.class_head, 0, 0, 24)
  assert not np.allclose(kernel, base_kernel)


def test_a_box_head_rescaled_to_smaller_anchors_decodes_the_same_boxes(base_model, base_paths):
  import tensorflow as tf
  from official.vision.ops import box_ops
  base, _ = base_model
  config = SSDConfig(num_classes=2, anchors=AnchorConfig(lowest_layer_scale=0.06))
  model = warm_start.build_project_model(config, parts_from=base_paths.checkpoint_prefix)
  images = tf.random.uniform([2, 300, 300, 3], -1.0, 1.0, seed=3)
  features = base.feature_extractor(images)

  def decoded(head, ssd_config):
    anchors = tf.constant(anchors_lib.anchors_yxyx(ssd_config))
    return box_ops.decode_boxes(head(features), anchors, weights=list(ssd_config.box_scale_factors))

  changed = anchors_lib.anchors_yxyx(config) != anchors_lib.anchors_yxyx(base.config)
  assert changed.any(axis=1).sum() == 19 * 19  # the lowest map's square anchors only
  np.testing.assert_allclose(decoded(model.box_head, config), decoded(base.box_head, base.config),
                             atol=1e-5)
  assert not np.allclose(model.box_head(features), base.box_head(features))


def test_a_label_naming_a_base_class_starts_from_it(base_model, base_paths):
  base, base_labels = base_model
  labels = ['dog', 'widget']
  model = warm_start.build_project_model(SSDConfig(num_classes=len(labels)), parts_from=base_paths.checkpoint_prefix)
  sources = warm_start.choose_base_sources(labels, base.class_head, base_labels, fits={})
  assert sources['dog'].index == base_labels.index('Dog')
  assert sources['widget'].head is None
  warm_start.init_class_head(model.class_head, warm_start.ColumnSource(base.class_head, 0, 'bg'),
                          [sources[l] for l in labels], seed=0)
  for level in range(6):
    for ours, theirs in ((0, 0), (1, base_labels.index('Dog'))):
      np.testing.assert_array_equal(class_column(model.class_head, level, ours, 3)[0],
                                    class_column(base.class_head, level, theirs, 24)[0])
      np.testing.assert_array_equal(class_column(model.class_head, level, ours, 3)[1],
                                    class_column(base.class_head, level, theirs, 24)[1])
    _, fresh_bias = class_column(model.class_head, level, 2, 3)
    np.testing.assert_allclose(fresh_bias, np.log(0.01 / 0.99), rtol=1e-5)


def test_class_fit_prefers_the_class_that_singles_out_the_boxes():
  # Class 1 fires everywhere, class 2 fires only on the boxes: class 2 fits.
  logits = np.full((2, 50, 3), -4.0)
  logits[..., 1] = 2.0
  targets = np.zeros((2, 50), np.int32)
  targets[:, :5] = 1
  logits[:, :5, 2] = 1.0
  fit, on_boxes = warm_start.class_fit(logits, targets, ['thing'])['thing']
  assert np.argmax(fit[1:]) + 1 == 2
  sources = warm_start.choose_base_sources(['thing'], None, ['bg', 'a', 'b'], {'thing': (fit, on_boxes)})
  assert sources['thing'].index == 2
  # Its score on the boxes goes with it (the step budget reads it): sigmoid(1).
  assert sources['thing'].score == pytest.approx(1 / (1 + np.exp(-1.0)))
  # A class scoring under the bar on the boxes starts nothing: the column is fresh.
  weak = warm_start.choose_base_sources(['thing'], None, ['bg', 'a', 'b'],
                                        {'thing': (fit, on_boxes)}, min_score=0.8)
  assert weak['thing'].head is None and weak['thing'].reason.startswith('fresh')
  assert TrainConfig().warm_start.min_fit_score == 0.05  # the bar a run uses
  with pytest.raises(ValueError, match='min_fit_score'):
    TrainConfig().with_overrides({'warm_start.min_fit_score': 1.5})


def test_a_base_class_finds_a_label_where_the_best_fitting_one_scores_the_bar_on_its_boxes():
  bar = TrainConfig().budget.fitted_min_score
  targets = np.zeros((2, 50), np.int32)
  targets[:, :5] = 1
  logits = np.full((2, 50, 3), -4.0)
  logits[:, :5, 1] = -1.9  # class 1 singles out the boxes at ~0.13
  fit, on_boxes = warm_start.class_fit(logits, targets, ['thing'])['thing']
  assert warm_start.base_class_finds(fit, on_boxes, bar)
  # Singling them out at a score under the bar is no find.
  logits[:, :5, 1] = -3.0
  fit, on_boxes = warm_start.class_fit(logits, targets, ['thing'])['thing']
  assert fit[1] == pytest.approx(1.0, abs=0.01) and not warm_start.base_class_finds(
      fit, on_boxes, bar)


def test_next_iteration_keeps_kept_labels_drops_removed_and_adds_new(trained_run, tmp_path,
                                                                    base_paths):
  previous, previous_labels = run_folder.load_run_model(trained_run)
  assert previous_labels == ['disc', 'square']
  # Its class head read colour and learned from it; the checkpoint brought that back.
  assert all(conv.kernel.numpy().any() for conv in previous.class_head.colour_convs[:2])
  # The label set changes: square removed, triangle added.
  tasks = make_task_set(tmp_path, 6, ('triangle', 'disc'), 'train', seed=5)
  out = tmp_path / 'iteration-2'
  pipeline.train_iteration(tasks, tmp_path, out, base_paths.model_dir, previous=trained_run,
                            config=TINY, export_kinds=())
  model, labels = run_folder.load_run_model(out)
  assert labels == ['disc', 'triangle']  # kept labels first, in their old order
  info = json.loads((out / 'run.json').read_text())
  assert info['started_from'] == str(trained_run)
  assert (info['colour'], info['colour_kernel']) == (True, 3)
  assert model.class_head.colour_convs[0].kernel.shape[:2] == (3, 3)
  metrics = json.loads((out / 'metrics.json').read_text())
  assert [h['iteration'] for h in metrics['history']] == [1, 2]
  # Nothing is held out of 6 images: every label shows from the default (the images
  # new to the previous iteration could move it: a setting, off).
  assert metrics['evaluation']['score_thresholds'] == {label: {
      'value': 0.35, 'why': '0 of its boxes held out (under 3): the default'}
      for label in ('disc', 'triangle')}
  # But all 6 are new to it: the previous iteration's entry says how it did on them
  # (its discs: triangles are not its label).
  later = metrics['history'][0]['later']
  assert later['images'] == 6 and 0.5 <= later['map50'] <= 1.0, later
  # The extractor started from the previous iteration's: the stride-8 stem,
  # which 'most' leaves frozen (no base class finds the shapes), is exactly that one.
  assert info['train_config']['trainable'] == 'most'
  first = ssd_lib.FIRST_TRAINED_BLOCK['most']
  trunk, _ = ssd_lib.split_extractor(model.feature_extractor, first)
  previous_trunk, _ = ssd_lib.split_extractor(previous.feature_extractor, first)
  assert_same_weights(trunk.weights, previous_trunk.weights)
  assert [c.filters for c in model.class_head.convs] == [9, 18, 18, 18, 18, 18]


def test_kept_label_columns_carry_over_exactly(trained_run, base_model):
  previous, previous_labels = run_folder.load_run_model(trained_run)
  base, base_labels = base_model
  labels = ['square', 'triangle']
  from model.config import SSDConfig
  model = ssd_lib.build_ssd(SSDConfig(num_classes=2))
  base_sources = warm_start.choose_base_sources(['triangle'], base.class_head, base_labels, fits={})
  columns = warm_start.columns_for_labels(labels, previous_labels, previous.class_head, base_sources)
  warm_start.init_class_head(model.class_head, warm_start.ColumnSource(previous.class_head, 0, 'bg'),
                          columns, seed=0)
  for level in range(6):
    for ours, theirs in ((0, 0), (1, previous_labels.index('square') + 1)):
      for a, b in zip(class_column(model.class_head, level, ours, 3),
                      class_column(previous.class_head, level, theirs, 3)):
        np.testing.assert_array_equal(a, b)


def test_next_iteration_can_change_the_input_size(trained_run, tmp_path, base_paths):
  # TRAIN_INPUT_SIZE changed between iterations: the network is fully
  # convolutional, so every restored weight still fits the new size.
  previous, previous_labels = run_folder.load_run_model(trained_run)
  assert previous.config.input_size == 300
  tasks = make_task_set(tmp_path, 4, ('disc', 'square'), 'train', seed=6)
  out = tmp_path / 'iteration-2'
  pipeline.train_iteration(tasks, tmp_path, out, base_paths.model_dir, previous=trained_run,
                            config=TINY.with_overrides({'input.size': 384}), export_kinds=())
  model, labels = run_folder.load_run_model(out)
  assert labels == previous_labels
  assert model.config.input_size == 384
  assert json.loads((out / 'run.json').read_text())['input_size'] == 384
  # The frozen stem ('most': the shapes are new to the base) is the previous
  # iteration's, unchanged by the size.
  first = ssd_lib.FIRST_TRAINED_BLOCK['most']
  trunk, _ = ssd_lib.split_extractor(model.feature_extractor, first)
  previous_trunk, _ = ssd_lib.split_extractor(previous.feature_extractor, first)
  assert_same_weights(trunk.weights, previous_trunk.weights)
  # Anchors follow the larger feature maps (24x24 ... 1x1 instead of 19x19 ... 1x1).
  outputs = model(np.zeros((1, 384, 384, 3), np.float32))
  num_anchors = anchors_lib.generate_anchors_cycxhw(model.config).shape[0]
  assert num_anchors > anchors_lib.generate_anchors_cycxhw(previous.config).shape[0]
  assert outputs['class_logits'].shape == (1, num_anchors, 3)
  assert outputs['box_encodings'].shape == (1, num_anchors, 4)


def test_a_class_head_loads_alone_as_the_whole_model_has_it(base_model, base_paths, trained_run):
  """Training starts its columns from the base's and the previous run's class heads,
  loaded without an extractor: the same weights the whole model restores."""
  from model import base_weights
  head, labels = base_weights.load_base_class_head(base_paths.model_dir)
  assert labels == base_model[1]
  for ours, whole in zip(head.weights, base_model[0].class_head.weights):
    np.testing.assert_array_equal(ours.numpy(), whole.numpy())
  head, labels, config = run_folder.load_run_class_head(trained_run)
  model, model_labels = run_folder.load_run_model(trained_run)
  assert (labels, config) == (model_labels, model.config)
  for ours, whole in zip(head.weights, model.class_head.weights):
    np.testing.assert_array_equal(ours.numpy(), whole.numpy())
  assert len(head.weights) == 18  # six convs (kernel, bias) and six colour kernels


def test_a_run_whose_checkpoint_is_cut_short_is_a_run_error(trained_run, tmp_path):
  copy = tmp_path / 'run'
  shutil.copytree(trained_run, copy)
  data = next(copy.glob('ckpt.data-*'))
  data.write_bytes(data.read_bytes()[:1000])
  with pytest.raises(run_folder.RunError, match='checkpoint unreadable'):
    run_folder.load_run_class_head(copy)


def test_the_previous_run_detects_the_new_images_only_and_at_most_so_many(trained_run,
                                                                          shapes_dataset, tmp_path):
  """What stands in for held-out images in choosing score thresholds: the images the
  previous run did not train on, as it detects them."""
  trained = pipeline.load_examples(tasks_lib.load_tasks_file(shapes_dataset / 'tasks.json'),
                                   shapes_dataset, TrainConfig())
  assert pipeline.later_images(trained, trained_run, at_most=32) is None  # none are new
  new = pipeline.load_examples(make_task_set(tmp_path, 6, ('disc', 'square'), 'train', seed=8),
                               tmp_path, TrainConfig())
  later = pipeline.later_images(new, trained_run, at_most=4)
  assert later.labels == ['disc', 'square'] and len(later.found) == 4
  assert [e.task_id for e in later.truth[0]] == [e.task_id for e in new.examples[:4]]
  assert all(later.found) and later.score()['images'] == 4
  assert pipeline.later_images(new, None, at_most=4) is None


def test_labels_the_previous_version_mixed_up_make_most_of_the_extractor_train(
    trained_run, tmp_path, base_paths):
  """Images labeled since whose discs are labeled square and squares disc (as a red and
  a yellow ball would be mixed up): the previous version names them by the other label,
  so this iteration trains 'most', on the whole budget rather than a warm start's share."""
  tasks = json.loads(json.dumps(make_task_set(tmp_path, 6, ('disc', 'square'), 'train', seed=5))
                     .replace('"disc"', '"-"').replace('"square"', '"disc"')
                     .replace('"-"', '"square"'))
  # 6 images, a shape each; under 100 images the shapes, which no base class
  # finds, would train 'most' anyway: the rule alone here.
  config = TINY.with_overrides({'most_from_found_boxes': 5, 'most_under_images': None})
  fitted = pipeline.fit(tasks, tmp_path, base_paths.model_dir, pipeline.Stopwatch(),
                        previous=trained_run, config=config)
  chosen = fitted.all_choices()['trainable']
  other, found = chosen['other_labels_since']
  assert found >= 5 and other >= 0.8 * found, chosen
  assert fitted.config.trainable == 'most' and 'by another label' in chosen['why']
  # The same images labeled as drawn: named right, nothing changes.
  fitted = pipeline.fit(make_task_set(tmp_path / 'right', 6, ('disc', 'square'), 'train',
                                      seed=5), tmp_path / 'right', base_paths.model_dir,
                        pipeline.Stopwatch(), previous=trained_run, config=config)
  other, found = fitted.all_choices()['trainable']['other_labels_since']
  assert found >= 5 and other <= 0.1 * found
  assert fitted.config.trainable != 'most'


def test_a_subset_seed_keeps_the_subset_under_another_training_seed(shapes_dataset):
  tasks = tasks_lib.load_tasks_file(shapes_dataset / 'tasks.json')

  def subset(config, subset_seed=None):
    training = pipeline.load_examples(tasks, shapes_dataset, config, max_images=4,
                                      subset_seed=subset_seed)
    return [e.task_id for e in training.examples]

  drawn = subset(TINY)
  assert subset(TINY.with_overrides({'seed': 7}), subset_seed=TINY.seed) == drawn
  assert any(subset(TINY.with_overrides({'seed': s})) != drawn for s in (7, 8, 9))


def test_labels_no_base_class_finds_train_most_of_the_extractor(shapes_dataset, base_paths):
  tasks = tasks_lib.load_tasks_file(shapes_dataset / 'tasks.json')
  training = pipeline.load_examples(tasks, shapes_dataset, TINY, max_images=6)
  assert training.labels == ['disc', 'square']
  # No base class scores 0.1 on a drawn disc (one does on the squares).
  found = choices.labels_the_base_finds(training, base_paths.model_dir, TINY)
  assert 'disc' not in found and found <= {'square'}
  config, chosen = choices.choose_settings(TINY, training, base_finds=found)
  assert config.trainable == 'most' and chosen['trainable']['labels_the_base_finds'] == sorted(found)
  # The extractor moves faster where no label is some base class's to keep.
  faster = choices.choose_settings(TINY, training, base_finds=set())[0]
  assert (faster.trainable, faster.schedule.extractor_scale) == ('most', 0.3)
  warm = choices.choose_settings(TINY, training, base_finds=set(), from_base=False)[0]
  assert (warm.trainable, warm.schedule.extractor_scale) == ('most', 0.1)  # already adapted
  assert config.schedule.extractor_scale == (0.3 if not found else 0.1)
  # A label that names a base class is found by it, without a look at the images.
  named = dataclasses.replace(training, labels=['Dog', 'Car'])
  assert choices.labels_the_base_finds(named, base_paths.model_dir, TINY) == {'Dog', 'Car'}
  assert TINY.choose_trainable(6, 0.0, None, labels_fitted=True)[0] == 'top'
  more = dataclasses.replace(training, labels=['disc', 'square', 'Dog'])
  assert choices.labels_the_base_finds(more, base_paths.model_dir, TINY) == found | {'Dog'}
  # A project whose columns all start fresh has no base class to find anything.
  fresh = TINY.with_overrides({'warm_start.class_init': 'fresh'})
  assert choices.labels_the_base_finds(named, base_paths.model_dir, fresh) == set()


def test_a_run_from_before_the_colour_kernel_starts_the_next_iteration(trained_run, tmp_path,
                                                                       base_paths):
  """A project's last version published with 1x1 colour kernels (no `colour_kernel`
  in its run.json): it still loads, and the next iteration's 3x3 kernels start
  from its kernels at their centre taps."""
  old = tmp_path / 'old-run'
  shutil.copytree(trained_run, old)
  model, labels = run_folder.load_run_model(trained_run)
  one_by_one = ssd_lib.build_ssd(dataclasses.replace(model.config, colour_kernel=1),
                                 feature_extractor=model.feature_extractor,
                                 box_head=model.box_head)
  for new, conv in zip(one_by_one.class_head.convs, model.class_head.convs):
    new.set_weights(conv.get_weights())
  for new, conv in zip(one_by_one.class_head.colour_convs, model.class_head.colour_convs):
    new.set_weights([conv.kernel.numpy()[1:2, 1:2]])
  paths = run_folder.RunPaths(old)
  ssd_lib.checkpoint_for(one_by_one).write(str(paths.checkpoint_prefix))
  info = json.loads(paths.run_info.read_text())
  del info['colour_kernel']
  paths.run_info.write_text(json.dumps(info))
  loaded, _ = run_folder.load_run_model(old)
  assert loaded.config.colour_kernel == 1
  head = ssd_lib.build_ssd(model.config).class_head
  columns = [warm_start.ColumnSource(loaded.class_head, i + 1, 'kept') for i in range(len(labels))]
  warm_start.init_class_head(head, warm_start.ColumnSource(loaded.class_head, 0, 'bg'), columns,
                             seed=0)
  for ours, theirs in zip(head.colour_convs, loaded.class_head.colour_convs):
    np.testing.assert_array_equal(ours.kernel.numpy()[1, 1], theirs.kernel.numpy()[0, 0])
  out = tmp_path / 'next'
  pipeline.train_iteration(make_task_set(tmp_path, 4, tuple(labels), 'train', seed=7), tmp_path,
                           out, base_paths.model_dir, previous=old, config=TINY, export_kinds=())
  assert json.loads((out / 'run.json').read_text())['colour_kernel'] == 3
