"""Training views carry over to the next iteration for the images it keeps unchanged."""

import dataclasses
import types

import numpy as np
import pytest
import tensorflow as tf
import tf_keras
from PIL import Image

from model import pipeline, views as views_lib
from model.config import TrainConfig, ViewsConfig
from model.targets import TargetAssigner

SIZE = 64


def grid_anchors(cells: int = 4) -> np.ndarray:
  step = 1.0 / cells
  return np.array([[y * step, x * step, (y + 1) * step, (x + 1) * step]
                   for y in range(cells) for x in range(cells)], np.float32)


def tiny_frozen(pooling=tf_keras.layers.AveragePooling2D):
  """Stands in for the extractor's frozen part: 64x64 inputs -> an 8x8 map."""
  images = tf_keras.Input((SIZE, SIZE, 3))
  return tf_keras.Model(images, [pooling(8)(images)])


def made_images():
  """Two 80x60 images with a box each, and their examples."""
  from model.tasks import Example
  rng = np.random.default_rng(0)
  images, examples = [], []
  for index, label in enumerate(('cat', 'dog')):
    pixels = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
    images.append(Image.fromarray(pixels))
    examples.append(Example(task_id=index, image=f'{index}.png', split='train',
                            boxes=np.array([[0.1, 0.2, 0.6, 0.7]], np.float32), labels=[label],
                            labeled=True))
  return examples, images


def make(examples, images, label_ids, views_each=4, zoom_outs=2, frozen=None, **reuse):
  tf.random.set_seed(1)
  assigner = TargetAssigner(grid_anchors(), (10.0, 10.0, 5.0, 5.0))
  return views_lib.make_cached_views(examples, images, label_ids, assigner,
                                     frozen or tiny_frozen(),
                                     views_each=views_each, zoom_outs=zoom_outs,
                                     input_size=SIZE, crop_min_scale=0.3,
                                     shrink=ViewsConfig(zoom_out_scale=(0.4, 0.9)),
                                     **reuse)


def stored_from(examples, images, labels, tmp_path):
  """A first iteration's views, saved and read back as the next iteration finds them."""
  pixels, cached = make(examples, images, {label: i + 1 for i, label in enumerate(labels)})
  views_lib.StoredViews(
      'same settings', labels, 4, 2, [views_lib.fingerprint(*p) for p in zip(examples, images)],
      pixels, cached.class_targets, cached.box_targets,
  ).save(tmp_path / 'views.npz')
  return pixels, cached, views_lib.StoredViews.load(tmp_path / 'views.npz')


def test_unchanged_images_take_their_stored_views_with_class_ids_renumbered(tmp_path):
  examples, images = made_images()
  pixels, cached, stored = stored_from(examples, images, ['cat', 'dog'], tmp_path)
  assert stored.signature == 'same settings' and stored.pixels.dtype == np.uint8
  # The next iteration numbers the labels the other way round and wants fewer views.
  fingerprints = [views_lib.fingerprint(*p) for p in zip(examples, images)]
  again, reused = make(examples, images, {'dog': 1, 'cat': 2}, views_each=3, zoom_outs=1,
                       reuse=stored, fingerprints=fingerprints)
  assert reused.reused == 2 and reused.per_image == 4 and len(reused) == 8
  rows = [0, 1, 2, 4, 6, 7, 8, 10]  # per image: its first 3 views, then its first zoom-out
  np.testing.assert_array_equal(again, pixels[rows])
  np.testing.assert_array_equal(reused.box_targets, cached.box_targets[rows])
  swapped = np.array([0, 2, 1, -1])[cached.class_targets[rows]]
  np.testing.assert_array_equal(reused.class_targets, swapped)
  assert set(np.unique(reused.class_targets[:4])) >= {2} and 1 not in reused.class_targets[:4]


def test_a_moved_box_or_more_views_than_stored_makes_views_afresh(tmp_path):
  examples, images = made_images()
  _, _, stored = stored_from(examples, images, ['cat', 'dog'], tmp_path)
  ids = {'cat': 1, 'dog': 2}
  examples[1] = dataclasses.replace(examples[1], boxes=np.array([[0.3, 0.2, 0.9, 0.7]], np.float32))
  fingerprints = [views_lib.fingerprint(*p) for p in zip(examples, images)]
  moved = make(examples, images, ids, reuse=stored, fingerprints=fingerprints)[1]
  assert moved.reused == 1
  # which views came over: training draws the others more often (`train.batch_odds`)
  assert moved.carried.tolist() == [True] * moved.per_image + [False] * moved.per_image
  assert make(examples, images, ids, views_each=5, reuse=stored,
              fingerprints=fingerprints)[1].reused == 0


def test_a_missing_or_damaged_views_file_is_no_views(tmp_path, caplog):
  assert views_lib.StoredViews.load(tmp_path / 'views.npz') is None
  (tmp_path / 'views.npz').write_bytes(b'not a zip')
  assert views_lib.StoredViews.load(tmp_path / 'views.npz') is None
  assert 'Ignoring the stored views' in caplog.text


def test_reused_views_take_their_cached_outputs_where_the_frozen_part_is_the_same(tmp_path):
  examples, images = made_images()
  ids, frozen = {'cat': 1, 'dog': 2}, tiny_frozen()
  pixels, cached = make(examples, images, ids, frozen=frozen)
  fingerprints = [views_lib.fingerprint(*p) for p in zip(examples, images)]
  marked = [f + 1 for f in cached.features]  # outputs no one computes again
  views_lib.StoredViews(
      'same settings', ['cat', 'dog'], 4, 2, fingerprints, pixels, cached.class_targets,
      cached.box_targets, views_lib.frozen_signature(frozen), marked, cached.peaks + 1,
  ).save(tmp_path / 'views.npz')
  stored = views_lib.StoredViews.load(tmp_path / 'views.npz')
  # The second image's box moved: its views are made and run through `frozen` afresh.
  examples[1] = dataclasses.replace(examples[1], boxes=np.array([[0.3, 0.2, 0.9, 0.7]], np.float32))
  fingerprints[1] = views_lib.fingerprint(examples[1], images[1])
  _, again = make(examples, images, ids, frozen=tiny_frozen(), reuse=stored,
                  fingerprints=fingerprints)
  assert again.reused == 1
  np.testing.assert_array_equal(again.features[0][:6], marked[0][:6])
  np.testing.assert_array_equal(again.peaks[:6], cached.peaks[:6] + 1)
  # the second image as it is (view 0) comes out of `frozen`, as it did the first time
  np.testing.assert_array_equal(again.features[0][6], cached.features[0][6])
  # The images in the other order: each takes its own stored rows.
  _, swapped = make([examples[1], examples[0]], [images[1], images[0]],
                    ids, frozen=tiny_frozen(), reuse=stored, fingerprints=fingerprints[::-1])
  np.testing.assert_array_equal(swapped.features[0][6:], marked[0][:6])
  np.testing.assert_array_equal(swapped.peaks[6:], cached.peaks[:6] + 1)
  # Another frozen part: every output is computed again.
  _, other = make(examples, images, ids, frozen=tiny_frozen(tf_keras.layers.MaxPooling2D),
                  reuse=stored, fingerprints=fingerprints)
  assert other.reused == 1 and not np.array_equal(other.features[0][:6], marked[0][:6])


class _Handed(Exception):
  """What the pipeline handed the views' maker (raised by the stand-in below)."""


def test_the_pipeline_makes_views_by_the_rule_for_its_number_of_training_images(monkeypatch):
  def handed(*_, **settings):
    raise _Handed(settings)
  monkeypatch.setattr(views_lib, 'make_cached_views', handed)
  examples, images = made_images()
  training = pipeline.TrainingSet(examples, images, ['cat', 'dog'], [0, 1], [], None)

  def settings(**views):
    config = TrainConfig().with_overrides({'input.size': 300, 'views.carry_over': False,
                                           **{f'views.{k}': v for k, v in views.items()}})
    model = types.SimpleNamespace(config=config.input.ssd_config(2))
    with pytest.raises(_Handed) as made:
      pipeline.make_views(model, types.SimpleNamespace(frozen=None), training, config)
    handed = made.value.args[0]
    return {**{key: handed[key] for key in ('views_each', 'zoom_outs', 'crop_min_scale')},
            'mosaic': handed['shrink'].mosaic}
  # Two images are a handful: strong crops and shrunk views (mosaics). Counted as
  # many, the same two get mild crops, none shrunk.
  assert settings() == {'views_each': 16, 'zoom_outs': 7, 'crop_min_scale': 0.3, 'mosaic': 1.0}
  assert settings(many_images=2) == {'views_each': 16, 'zoom_outs': 0, 'crop_min_scale': 0.7,
                                     'mosaic': 1.0}
  assert settings(mosaic=0.0)['mosaic'] == 0.0


def test_the_frozen_parts_outputs_are_traced_once_and_do_not_keep_the_model():
  import gc
  import weakref
  frozen = tiny_frozen()
  pixels = np.random.default_rng(0).integers(0, 255, (3, SIZE, SIZE, 3), dtype=np.uint8)
  first, _ = views_lib.cache_features(frozen, pixels)
  traced = views_lib._traced_outputs(frozen)  # pylint: disable=protected-access
  again, _ = views_lib.cache_features(frozen, pixels[::-1])
  assert views_lib._traced_outputs(frozen) is traced  # pylint: disable=protected-access
  np.testing.assert_array_equal(first[0], again[0][::-1])
  gone = weakref.ref(frozen)
  del frozen, traced
  gc.collect()
  assert gone() is None
