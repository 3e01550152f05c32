"""Options of tensorflow-model-optimization: quantization-aware training and pruning.

One short QAT run (int8 export only) and one pruned run (float export only)
on the shapes set; each is checked for what it promises and for still finding
the shapes.
"""

import json

import numpy as np
import pytest
import tensorflow_model_optimization as tfmot

from model import compression, pipeline, run_folder, ssd as ssd_lib
from model.config import COMPRESSION_NEEDS_EXTRACTOR, TrainConfig
from model.evaluate import coco_map
from model.tflite_detector import TFLiteDetector
from model.images import load_image
from model.tasks import evaluation_examples, load_tasks_file, parse_tasks, resolve_image
from tests.conftest import SMALL_INPUT, run_model_cli
from tests.test_trainable import top_layer_names

# The top trains (the shapes would choose 'most'): what is compressed, and fast.
SHORT = TrainConfig().with_overrides({'budget.base': 120, 'budget.per_first_image': 0,
                                      'input.size': SMALL_INPUT, 'trainable': 'top',
                                      'budget.max': 120, 'views.max_per_image': 6})


@pytest.fixture(scope='module')
def optimized_runs(base_paths, shapes_dataset, tmp_path_factory):
  tasks = load_tasks_file(shapes_dataset / 'tasks.json')
  folder = tmp_path_factory.mktemp('optimized')
  qat = pipeline.train_iteration(
      tasks, shapes_dataset, folder / 'qat', base_paths.model_dir,
      config=SHORT.with_overrides({'compression.quantization_aware': True}), export_kinds=('int8',))
  pruned = pipeline.train_iteration(
      tasks, shapes_dataset, folder / 'pruned', base_paths.model_dir,
      config=SHORT.with_overrides({'compression.prune_sparsity': 0.5}), export_kinds=('float',))
  return {'qat': qat.root, 'pruned': pruned.root}


def shapes_test_split(shapes_dataset):
  examples, _ = parse_tasks(load_tasks_file(shapes_dataset / 'tasks.json'))
  examples = evaluation_examples(examples, 'test')
  return examples, [load_image(resolve_image(e, shapes_dataset)) for e in examples]


def tflite_map50(run_dir, kind, shapes_dataset):
  examples, images = shapes_test_split(shapes_dataset)
  labels = run_folder.read_run(run_dir)[1]
  detector = TFLiteDetector(run_folder.RunPaths(run_dir).tflite(kind), labels)
  found = [detector.detect(image, min_score=0.01) for image in images]
  return coco_map(examples, images, found, labels)['map50']


def test_qat_int8_model_finds_the_shapes(optimized_runs, shapes_dataset):
  metrics = json.loads((optimized_runs['qat'] / 'metrics.json').read_text())
  assert metrics['optimization']['quantization_aware'] is True
  assert tflite_map50(optimized_runs['qat'], 'int8', shapes_dataset) >= 0.6


def test_qat_checkpoint_holds_plain_trained_layers(optimized_runs, base_model):
  # The quantization-aware copy's weights went back into the SSD's own layers:
  # the checkpoint loads into the plain model and its top differs from the base.
  trained, _ = run_folder.load_run_model(optimized_runs['qat'])
  base = base_model[0]
  for name in top_layer_names():
    assert not np.array_equal(trained.feature_extractor.get_layer(name).get_weights()[0],
                              base.feature_extractor.get_layer(name).get_weights()[0]), name
  assert np.array_equal(trained.feature_extractor.get_layer('Conv').get_weights()[0],
                        base.feature_extractor.get_layer('Conv').get_weights()[0])


def test_qat_ranges_start_from_the_float_activations():
  extractor = ssd_lib.build_feature_extractor(96)
  _, top = ssd_lib.split_extractor(extractor)
  wrapped = compression.Optimized(tfmot.quantization.keras.quantize_model(top), 'qat')
  inputs = np.random.default_rng(0).uniform(-2.0, 3.0, (8, *top.input.shape[1:])).astype(np.float32)
  wrapped.calibrate(top, inputs, batch_size=8)
  input_layer = wrapped.model.layers[1]  # tfmot's QuantizeLayer: `<its name>_min` and `_max`
  low, high = (float(v.numpy()) for v in input_layer.non_trainable_weights
               if v.name.split('/')[-1].startswith((f'{input_layer.name}_min',
                                                    f'{input_layer.name}_max')))
  assert low == pytest.approx(inputs.min(), abs=1e-5)
  assert high == pytest.approx(inputs.max(), abs=1e-5)
  relu6 = wrapped.model.get_layer('quant_Conv_1_relu6')
  low, high = (float(v.numpy()) for v in relu6.non_trainable_weights
               if v.name.split('/')[-1].startswith(('output_min', 'output_max')))
  # tfmot's own start is [-6, 6]; a ReLU6 output starts at [0, its batch max].
  assert low == 0.0 and 0.0 < high <= 6.0


def test_pruning_zeroes_half_of_each_trained_kernel_and_leaves_the_trunk(optimized_runs, base_model):
  trained, _ = run_folder.load_run_model(optimized_runs['pruned'])
  base = base_model[0]
  for name in top_layer_names():
    kernel = trained.feature_extractor.get_layer(name).get_weights()[0]
    # At least half: base kernels hold zeros already (Conv_1 12%, the last 3x3 56%).
    assert np.mean(kernel == 0) >= 0.49, name
  assert np.array_equal(trained.feature_extractor.get_layer('expanded_conv_16_project').get_weights()[0],
                        base.feature_extractor.get_layer('expanded_conv_16_project').get_weights()[0])


def test_pruned_model_compresses_better_and_still_finds_the_shapes(optimized_runs, trained_run,
                                                                   shapes_dataset):
  pruned = json.loads((optimized_runs['pruned'] / 'metrics.json').read_text())
  dense = json.loads((trained_run / 'metrics.json').read_text())
  assert pruned['optimization']['extractor_sparsity'] > dense['optimization']['extractor_sparsity'] + 0.2
  assert (pruned['file_bytes_gzip']['model.tflite']
          < 0.85 * dense['file_bytes_gzip']['model.tflite'])
  assert tflite_map50(optimized_runs['pruned'], 'float', shapes_dataset) >= 0.6


@pytest.mark.parametrize('settings', [
    {'trainable': 'heads', 'compression.quantization_aware': True},
    {'compression.prune_sparsity': 0.5, 'trainable': 'heads'},
    {'compression.quantization_aware': True, 'compression.prune_sparsity': 0.5},
    {'compression.prune_sparsity': 1.0},
    {'views.zoom_outs': 0.5}])  # no such field
def test_impossible_combinations_are_refused(settings):
  with pytest.raises(ValueError):
    TrainConfig().with_overrides(settings)


def test_cli_refuses_qat_with_heads_only_and_creates_nothing(shapes_dataset, base_paths, tmp_path):
  out = tmp_path / 'run'
  result = run_model_cli('train', '--tasks', shapes_dataset / 'tasks.json', '--out', out,
                         '--train', 'heads', '--qat', model_dir=base_paths.model_dir)
  assert result.returncode == 2
  assert COMPRESSION_NEEDS_EXTRACTOR in result.stderr
  assert not out.exists()


def test_qat_of_the_whole_extractor_trains_and_exports(base_paths, shapes_dataset, tmp_path,
                                                       base_model):
  # trainable='all': every layer of the extractor is wrapped, including the
  # linear "project" convs whose kernel tfmot holds outside the inner layer.
  tasks = load_tasks_file(shapes_dataset / 'tasks.json')
  run = pipeline.train_iteration(
      tasks, shapes_dataset, tmp_path / 'run', base_paths.model_dir, max_images=3,
      config=TrainConfig(trainable='all').with_overrides({
          'compression.quantization_aware': True, 'input.size': SMALL_INPUT,
          'budget.base': 6, 'budget.per_first_image': 0,
          'budget.max': 6, 'views.max_per_image': 2}),
      export_kinds=('int8',))
  assert run.tflite('int8').stat().st_size > 1_000_000
  trained, _ = run_folder.load_run_model(run.root)
  for name in ('Conv', 'expanded_conv_project', 'Conv_1'):
    assert not np.array_equal(trained.feature_extractor.get_layer(name).get_weights()[0],
                              base_model[0].feature_extractor.get_layer(name).get_weights()[0]), name
