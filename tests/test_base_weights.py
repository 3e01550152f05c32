"""The pretrained base: fetched, cut out, rebuilt in tf_keras, and proven exact."""

import hashlib
import json
import shutil

import numpy as np
import pytest

from model import base_weights, ssd as ssd_lib
from model.config import BasePaths
from model.images import load_image, to_model_input
from tests.conftest import RACCOON
from tests.synthetic import textured_background

# Largest |ours - .tflite| the issue accepts on the raw outputs.
TOLERANCE = 1e-4


def made_images():
  """Images the test makes: textured backgrounds with planted shapes, plus the check set."""
  pictures = []
  for seed in range(3):
    pixels = textured_background(300, 300, seed)
    pixels[60 + 20 * seed:180, 90:230] = (200, 40 + 60 * seed, 30)  # a solid block
    pictures.append(pixels.astype(np.float32) / 127.5 - 1)
  return np.concatenate([np.stack(pictures), base_weights.check_images(seed=1)])


def assert_matches_tflite(model, tflite, images):
  difference = base_weights.max_abs_difference(model, tflite, images)
  assert set(difference) == {'box_encodings', 'class_logits'}
  assert max(difference.values()) <= TOLERANCE, difference


def test_package_and_label_map_are_the_pinned_ones(base_paths):
  assert hashlib.sha256(base_paths.tflite.read_bytes()).hexdigest() == (
      base_weights.PACKAGE.tflite_sha256)
  labels = base_weights.read_labels(base_paths)
  assert len(labels) == 24
  assert labels[0] == '???'
  assert (labels[1], labels[4], labels[20], labels[23]) == ('Bicycle', 'Person', 'Dog', 'Car')
  assert tuple(labels) == base_weights.PACKAGE.labels


def test_model_has_three_named_parts_of_the_right_shape(base_model):
  model, _ = base_model
  assert [len(model.box_head.convs), len(model.class_head.convs)] == [6, 6]
  assert [c.filters for c in model.box_head.convs] == [12, 24, 24, 24, 24, 24]
  assert [c.filters for c in model.class_head.convs] == [72, 144, 144, 144, 144, 144]
  maps = model.feature_extractor.outputs
  assert [tuple(m.shape[1:]) for m in maps] == [
      (19, 19, 576), (10, 10, 1280), (5, 5, 512), (3, 3, 256), (2, 2, 256), (1, 1, 128)]
  out = model(np.zeros((1, 300, 300, 3), np.float32))
  assert out['box_encodings'].shape == (1, 1917, 4)
  assert out['class_logits'].shape == (1, 1917, 24)


def test_rebuild_matches_the_tflite_on_made_images(base_model, base_paths):
  model, _ = base_model
  assert_matches_tflite(model, base_paths.tflite, made_images())


@pytest.mark.skipif(not RACCOON.is_dir(), reason='../shared/datasets/raccoon is not on this machine')
def test_rebuild_matches_the_tflite_on_a_real_photo(base_model, base_paths):
  model, _ = base_model
  photo = to_model_input(load_image(RACCOON / 'images' / 'raccoon-1.jpg'), 300)
  assert_matches_tflite(model, base_paths.tflite, photo[None])


def test_manifest_records_the_measured_difference_and_the_code_that_converted(base_paths):
  manifest = json.loads(base_paths.manifest.read_text())
  assert manifest['num_classes'] == 23
  assert 0 < max(manifest['max_abs_difference'].values()) <= TOLERANCE
  assert manifest['converter'] == base_weights.converter_fingerprint()
  assert base_weights.converted_by_this_code(base_paths)


def test_the_converter_fingerprint_changes_with_the_converting_code(tmp_path, monkeypatch):
  package = tmp_path / 'model'
  package.mkdir()
  for name in base_weights.CONVERTER_MODULES:
    (package / name).write_text(f'# {name}\n')
  monkeypatch.setattr(base_weights, '__file__', str(package / 'base_weights.py'))
  before = base_weights.converter_fingerprint()
  (package / 'ssd.py').write_text('# ssd.py, changed\n')
  assert base_weights.converter_fingerprint() != before


def test_each_part_restores_on_its_own(base_model, base_paths):
  """A checkpoint object naming only two parts restores those and leaves the third."""
  base, _ = base_model
  fresh = ssd_lib.build_ssd(base.config)
  class_before = [w.numpy() for w in fresh.class_head.weights]
  ssd_lib.checkpoint_for(fresh, parts=('feature_extractor', 'box_head')).read(
      str(base_paths.checkpoint_prefix)).expect_partial().assert_existing_objects_matched()
  for ours, source in zip(fresh.feature_extractor.weights + fresh.box_head.weights,
                          base.feature_extractor.weights + base.box_head.weights):
    np.testing.assert_array_equal(ours.numpy(), source.numpy())
  for after, before, source in zip(fresh.class_head.weights, class_before,
                                   base.class_head.weights):
    np.testing.assert_array_equal(after.numpy(), before)
    assert not np.array_equal(after.numpy(), source.numpy())


def test_a_bare_tflite_converts_without_the_package(base_paths, tmp_path):
  paths = base_weights.ensure_base(tmp_path / 'models', base_paths.tflite)
  assert base_weights.read_labels(paths) == base_weights.read_labels(base_paths)
  assert paths.checkpoint_prefix.with_suffix('.index').is_file()


def test_missing_source_file_is_a_clear_error(tmp_path):
  with pytest.raises(base_weights.BaseWeightsError, match='does not exist'):
    base_weights.ensure_base(tmp_path / 'models', tmp_path / 'nowhere.tgz')
  assert not (tmp_path / 'models' / 'base').exists()


@pytest.mark.parametrize('name', ['model.tflite', 'package.tgz'])
def test_corrupt_weights_file_is_refused_by_its_hash(tmp_path, name):
  corrupt = tmp_path / name
  corrupt.write_bytes(b'\x00garbage' * 100)
  with pytest.raises(base_weights.BaseWeightsError, match='sha256'):
    base_weights.ensure_base(tmp_path / 'models', corrupt)
  assert not (tmp_path / 'models' / 'base').exists()


def test_without_npm_or_a_file_the_error_names_both_ways(tmp_path, monkeypatch):
  monkeypatch.setenv('PATH', str(tmp_path))  # no npm on it
  with pytest.raises(base_weights.BaseWeightsError) as error:
    base_weights.ensure_base(tmp_path / 'models')
  message = str(error.value)
  assert 'npm' in message and '--from' in message


def test_damaged_checkpoint_says_how_to_repair(base_paths, tmp_path):
  copy = BasePaths(tmp_path / 'models')
  shutil.copytree(base_paths.base_dir, copy.base_dir)
  data = copy.checkpoint_prefix.with_name('ckpt.data-00000-of-00001')
  data.write_bytes(data.read_bytes()[:1000])
  with pytest.raises(base_weights.BaseWeightsError, match='fetch-base --force'):
    base_weights.load_base_ssd(copy.model_dir)
  with pytest.raises(base_weights.BaseWeightsError, match='fetch-base --force'):
    base_weights.load_base_class_head(copy.model_dir)  # what training starts from
