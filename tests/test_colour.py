"""The class head's colour input: the image's mean colour per cell of each feature map."""

import numpy as np
import pytest
import tensorflow as tf

from model import evaluate, export, pipeline, ssd as ssd_lib, warm_start
from model.config import ExportConfig, SSDConfig, TrainConfig
from model.tasks import evaluation_examples, load_example_images, parse_tasks
from tests.conftest import SMALL_INPUT
from tests.synthetic import make_task_set


@pytest.mark.parametrize('size', [300, 384, 448, 512])
def test_each_colour_map_has_its_feature_map_s_side(size):
  config = SSDConfig(num_classes=1, input_size=size, colour=True)
  extractor = ssd_lib.build_feature_extractor(size, colour=True)
  outputs = extractor(tf.zeros([1, size, size, 3]))
  maps, colours = outputs[:6], outputs[6:]
  assert [m.shape[1] for m in maps] == [c.shape[1] for c in colours] == config.feature_map_sizes()
  assert all(c.shape[-1] == 3 for c in colours)


def test_a_colour_map_cell_holds_its_pixels_mean():
  image = np.zeros([1, 300, 300, 3], np.float32)
  image[:] = [0.5, -0.25, 1.0]
  # Cells cut short by the image's edge average what is there: every cell of every map.
  for colours in ssd_lib.colour_maps(tf.constant(image)):
    np.testing.assert_allclose(colours[0], np.broadcast_to([0.5, -0.25, 1.0], colours.shape[1:]),
                               atol=1e-6)
  image[:] = 0.0
  image[0, 134:166, 134:166] = 1.0  # holds the middle cell of map 0, not its neighbours' middles
  first = ssd_lib.colour_maps(tf.constant(image))[0][0].numpy()
  np.testing.assert_allclose(first[9, 9], 1.0, atol=1e-6)
  assert first[9, 7].max() == first[7, 9].max() == 0.0


def test_the_colour_convs_start_at_zero_and_change_the_logits_once_trained():
  config = SSDConfig(num_classes=2, colour=True)
  model = ssd_lib.build_ssd(config)
  plain = ssd_lib.build_ssd(SSDConfig(num_classes=2), box_head=model.box_head)
  plain.feature_extractor.set_weights(model.feature_extractor.get_weights())
  plain.class_head.set_weights([w for conv in model.class_head.convs for w in conv.get_weights()])
  images = tf.random.uniform([1, 300, 300, 3], -1.0, 1.0, seed=1)
  np.testing.assert_allclose(model(images)['class_logits'], plain(images)['class_logits'], atol=1e-5)
  for conv in model.class_head.colour_convs:
    conv.set_weights([np.ones_like(conv.kernel.numpy())])
  assert not np.allclose(model(images)['class_logits'], plain(images)['class_logits'], atol=1e-3)


@pytest.mark.parametrize('side', [1, 3])
def test_the_exported_scores_read_the_colour_as_the_model_does(side):
  model = ssd_lib.build_ssd(SSDConfig(num_classes=2, colour=True, colour_kernel=side))
  assert model.class_head.colour_convs[0].kernel.shape[:2] == (side, side)
  rng = np.random.default_rng(0)
  for conv in model.class_head.colour_convs:
    conv.set_weights([rng.normal(0, 1.0, conv.kernel.shape).astype(np.float32)])
  images = tf.random.uniform([1, 300, 300, 3], -1.0, 1.0, seed=2)
  heads, _, _ = export.heads_function(model, ExportConfig())
  _, scores = heads(images)
  expected = tf.sigmoid(model(images)['class_logits']).numpy()
  shown = expected > 1 / (1 + np.exp(-ExportConfig().min_class_logit))  # above the bound
  shown[..., 0] = False  # the background column is not exported
  np.testing.assert_allclose(scores.numpy()[shown], expected[shown], atol=1e-4)


def test_kept_labels_take_their_colour_columns_and_other_columns_start_without(base_model):
  base, base_labels = base_model
  previous = ssd_lib.build_ssd(SSDConfig(num_classes=2, colour=True)).class_head
  rng = np.random.default_rng(0)
  for conv in previous.colour_convs:
    conv.set_weights([rng.normal(0, 1.0, conv.kernel.shape).astype(np.float32)])
  head = ssd_lib.build_ssd(SSDConfig(num_classes=3, colour=True)).class_head
  columns = [warm_start.ColumnSource(previous, 2, 'kept "b"'),
             warm_start.ColumnSource(base.class_head, base_labels.index('Dog'), 'named'),
             warm_start.ColumnSource(None, 0, 'fresh')]
  warm_start.init_class_head(head, warm_start.ColumnSource(previous, 0, 'bg'), columns, seed=0)
  for level, conv in enumerate(head.colour_convs):
    kernel = conv.kernel.numpy()
    source = previous.colour_convs[level].kernel.numpy()
    anchors = kernel.shape[-1] // 4
    for a in range(anchors):
      np.testing.assert_array_equal(kernel[..., a * 4], source[..., a * 3])  # background
      np.testing.assert_array_equal(kernel[..., a * 4 + 1], source[..., a * 3 + 2])  # "b"
      assert not kernel[..., a * 4 + 2].any() and not kernel[..., a * 4 + 3].any()


def test_a_run_s_colour_kernels_fit_a_head_of_another_side():
  """1x1 (runs before `colour_kernel`) into 3x3: the centre tap, the same outputs;
  3x3 into 1x1: the taps' sum, the same on a uniform colour."""
  rng = np.random.default_rng(0)
  heads = {side: ssd_lib.build_ssd(SSDConfig(num_classes=1, colour=True,
                                             colour_kernel=side)).class_head for side in (1, 3)}
  for source_side, target_side in ((1, 3), (3, 1)):
    source, target = heads[source_side], heads[target_side]
    for conv in source.colour_convs:
      conv.set_weights([rng.normal(0, 1.0, conv.kernel.shape).astype(np.float32)])
    kept = warm_start.ColumnSource(source, 1, 'kept')
    warm_start.init_class_head(target, warm_start.ColumnSource(source, 0, 'bg'), [kept], seed=0)
    for level, conv in enumerate(target.colour_convs):
      taken, given = conv.kernel.numpy(), source.colour_convs[level].kernel.numpy()
      if target_side == 3:
        np.testing.assert_array_equal(taken[1, 1], given[0, 0])
        assert not np.delete(taken.reshape(9, *taken.shape[2:]), 4, axis=0).any()
      else:
        np.testing.assert_allclose(taken[0, 0], given.sum((0, 1)), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_labels_told_apart_by_colour_alone_are_told_apart(base_paths, tmp_path):
  """Red and yellow discs: what MobileNetV2's frozen blocks hand on mixes them up."""
  shapes = ('disc', 'yellow disc')
  tasks = make_task_set(tmp_path, 8, shapes, 'train', seed=1, per_image=2, sides=(30, 60))
  test = make_task_set(tmp_path, 12, shapes, 'test', seed=2, per_image=2, sides=(30, 60),
                       start_id=100)
  examples, images = load_example_images(evaluation_examples(parse_tasks(test)[0]), tmp_path)
  scores = {}
  for colour in (True, False):
    config = TrainConfig(seed=0).with_overrides({'input.size': SMALL_INPUT,
                                                 'input.colour': colour})
    fitted = pipeline.fit(tasks, tmp_path, base_paths.model_dir, pipeline.Stopwatch(),
                          config=config)
    found = evaluate.checkpoint_detect(fitted.model, fitted.training.labels)(images)
    scores[colour] = evaluate.coco_map(examples, images, found, fitted.training.labels)['map50']
  assert scores[True] >= 0.45, scores  # 0.57 against 0.37 when written
  assert scores[True] >= scores[False] + 0.1, scores
