"""The few-shot detector end to end: train, run folder, eval, predict, .tflite agreement."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from model import pipeline, run_folder
from model.boxes import iou_xyxy
from model.tflite_detector import TFLiteDetector
from model.images import load_image
from tests.conftest import REPO, SMALL_INPUT, run_model_cli

RUN_FILES = {'model.tflite', 'model_int8.tflite', 'labels.txt', 'metrics.json', 'run.json',
             'report.png',
             'ckpt.index', 'ckpt.data-00000-of-00001'}


def test_run_folder_holds_models_labels_metrics_and_checkpoint(trained_run):
  assert RUN_FILES <= {p.name for p in trained_run.iterdir()}
  assert (trained_run / 'labels.txt').read_text() == 'disc\nsquare\n'
  metrics = json.loads((trained_run / 'metrics.json').read_text())
  assert metrics['labels'] == ['disc', 'square']
  assert metrics['images']['train'] == 12
  # Per image: itself, its mirror, 14 crops and 7 zoom-outs.
  assert (metrics['images']['views'], metrics['images']['zoom_outs']) == (12 * 23, 12 * 7)
  assert metrics['steps'] == len(metrics['loss_per_step']) > 100
  assert metrics['images_per_s'] > 0 and metrics['wall_time_s']['total_s'] > 0
  assert metrics['history'] == [{'iteration': 1, 'images': 12, 'map50': None}]
  # What serves; nothing held out, so nothing tells whether int8 needs a tail or
  # where pre-annotations should stop showing boxes (the default).
  thresholds = metrics['evaluation'].pop('score_thresholds')
  assert metrics['evaluation'] == {'of': 'float .tflite', 'int8_tune': {
      'ran': False, 'why': 'no held-out images to compare the int8 file with the float one on',
      'held_out_map50': None, 'kept': 'int8'}}
  assert thresholds == {label: {'value': 0.35, 'why': '0 of its boxes held out (under 3): the default'}
                        for label in ('disc', 'square')}
  # Every choice made from the data, with why (the shapes span a fifth of the image or more).
  assert {'input_size', 'trainable', 'adaptive_matching', 'steps'} <= set(metrics['choices'])
  assert metrics['choices']['adaptive_matching']['value'] == 'zoom-outs'
  assert 'lowest anchor' in metrics['choices']['adaptive_matching']['why']
  assert metrics['choices']['trainable']['value'] == 'most'  # 12 images
  # A base class finds the drawn squares, not the discs: the extractor keeps its usual rate.
  assert metrics['choices']['trainable']['labels_the_base_finds'] == ['square']
  assert metrics['choices']['extractor_learning_rate_scale']['value'] == 0.1
  assert metrics['choices']['many_views_from_images']['value'] == 100  # not small objects
  assert metrics['choices']['views_per_image'] == {
      'value': 23, 'zoom_outs': 7, 'mosaic_share': 1.0, 'crop_min_scale': 0.3,
      'why': 'up to 480 views'}
  run_info = json.loads((trained_run / 'run.json').read_text())
  assert run_info['train_config']['trainable'] == 'most'  # the choice made, not None
  assert run_info['score_thresholds'] == {label: t['value'] for label, t in thresholds.items()}
  # What it trained on, for the next iteration to tell which images are new to it.
  assert len(set(run_info['trained_on'])) == 12 == len(run_info['trained_on'])
  from PIL import Image
  with Image.open(trained_run / 'report.png') as report:
    assert report.width > 500 and report.height > 400
  # No half-written folders are left beside it.
  assert [p.name for p in trained_run.parent.iterdir()] == [trained_run.name]


def test_training_measurably_learns(trained_run):
  losses = json.loads((trained_run / 'metrics.json').read_text())['loss_per_step']
  assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])


def test_eval_prints_one_json_object_and_finds_the_planted_shapes(trained_run, shapes_dataset,
                                                                  base_paths):
  # The checkpoint and a .tflite file (the float one scores what the checkpoint
  # does: test_float_tflite_scores_what_the_checkpoint_scores).
  for extra in ([], ['--tflite', 'int8']):
    result = run_model_cli('eval', '--run', trained_run, '--tasks', shapes_dataset / 'tasks.json',
                           '--split', 'test', *extra, model_dir=base_paths.model_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert set(report) == {'map50', 'map', 'per_class', 'images', 'boxes'}
    assert (report['images'], report['boxes']) == (18, 18)
    assert set(report['per_class']) == {'disc', 'square'}
    assert report['map50'] >= 0.6, (extra, report)


def test_predict_with_a_run_prints_labeled_boxes(trained_run, shapes_dataset, base_paths):
  tasks = json.loads((shapes_dataset / 'tasks.json').read_text())
  test_task = next(t for t in tasks if t['meta']['split'] == 'test')
  image = shapes_dataset / test_task['data']['image']
  result = run_model_cli('predict', '--run', trained_run, image, model_dir=base_paths.model_dir)
  assert result.returncode == 0, result.stderr[-2000:]
  (entry,) = json.loads(result.stdout)
  value = test_task['annotations'][0]['result'][0]['value']
  truth = [value['x'] * 3.2, value['y'] * 2.4, (value['x'] + value['width']) * 3.2,
           (value['y'] + value['height']) * 2.4]
  best = entry['detections'][0]
  assert best['label'] == value['rectanglelabels'][0]
  assert iou_xyxy(best['box'], truth) >= 0.5


@pytest.mark.parametrize('kind, min_iou, max_score_gap', [('float', 0.95, 0.02),
                                                          ('int8', 0.75, 0.15)])
def test_tflite_detections_agree_with_tensorflow(trained_run, shapes_dataset, kind, min_iou,
                                                 max_score_gap):
  from model.config import PostprocessConfig
  from model.checkpoint_detector import CheckpointDetector
  model, labels = run_folder.load_run_model(trained_run)
  tf_detector = CheckpointDetector(model, labels, PostprocessConfig(min_score=0.3))
  lite = TFLiteDetector(trained_run / run_folder.RunPaths(trained_run).tflite(kind).name, labels)
  images = [load_image(p) for p in sorted((shapes_dataset / 'images').glob('test-*.jpg'))[:3]]
  for image, ours in zip(images, tf_detector.detect(images)):
    theirs = lite.detect(image, min_score=0.3)
    assert ours and theirs
    assert theirs[0].label == ours[0].label
    assert iou_xyxy(theirs[0].box, ours[0].box) >= min_iou
    assert abs(theirs[0].score - ours[0].score) <= max_score_gap


def _test_split(shapes_dataset):
  from model import tasks as tasks_lib
  examples, _ = tasks_lib.parse_tasks(tasks_lib.load_tasks_file(shapes_dataset / 'tasks.json'))
  return tasks_lib.load_example_images(tasks_lib.evaluation_examples(examples), shapes_dataset)


def test_float_tflite_scores_what_the_checkpoint_scores(trained_run, shapes_dataset):
  from model.evaluate import evaluate_run
  examples, images = _test_split(shapes_dataset)
  checkpoint = evaluate_run(trained_run, examples, images)
  lite = evaluate_run(trained_run, examples, images, 'float')
  assert checkpoint['map50'] > 0.5
  assert lite['map50'] == pytest.approx(checkpoint['map50'], abs=0.01)
  for label, scores in checkpoint['per_class'].items():
    assert lite['per_class'][label]['map50'] == pytest.approx(scores['map50'], abs=0.02)


def test_int8_tflite_takes_the_pixels_as_they_are_and_scores_near_the_float_one(
    trained_run, shapes_dataset):
  """uint8 pixels go in as a camera hands them over (requantizing p / 127.5 - 1 with
  the zero point 127 gives p - 0.5, rounded to even: odd pixels one level off)."""
  from ai_edge_litert.interpreter import Interpreter
  from model.evaluate import evaluate_run
  from model.images import resize_for_model
  path = run_folder.RunPaths(trained_run).tflite('int8')
  lite = TFLiteDetector(path, ['disc', 'square'])
  examples, images = _test_split(shapes_dataset)
  interpreter = Interpreter(model_path=str(path))
  interpreter.allocate_tensors()
  interpreter.set_tensor(interpreter.get_input_details()[0]['index'],
                         resize_for_model(images[0], 300)[None])
  interpreter.invoke()
  outputs = [interpreter.get_tensor(i) for i in lite.outputs]
  count = int(outputs[3][0])
  found = lite.raw(images[0])
  assert count > 0 and found['count'] == count
  np.testing.assert_array_equal(found['boxes'], outputs[0][0, :count])
  np.testing.assert_array_equal(found['scores'], outputs[2][0, :count])
  float_map = evaluate_run(trained_run, examples, images, 'float')['map50']
  assert evaluate_run(trained_run, examples, images, 'int8')['map50'] >= float_map - 0.03


def test_one_object_gets_one_label(trained_run, shapes_dataset):
  """NMS across classes (in the .tflite and the checkpoint's detector alike):
  an object the model is unsure about comes back once, with its likeliest label.

  Down to the backend's floor for what counts (0.05): below it, two boxes the
  op kept apart can overlap more once it clips them to the image (its NMS
  sees them unclipped)."""
  from itertools import combinations
  from backend.predictor import UNCERTAIN_FLOOR
  lite = TFLiteDetector(run_folder.RunPaths(trained_run).tflite('float'), ['disc', 'square'])
  found = [lite.detect(image, min_score=UNCERTAIN_FLOOR)
           for image in _test_split(shapes_dataset)[1]]
  assert {d.label for image in found for d in image} == {'disc', 'square'}
  for image in found:
    assert not [(a, b) for a, b in combinations(image, 2) if iou_xyxy(a.box, b.box) > 0.5]


def test_exported_files_have_the_standard_ssd_outputs(trained_run):
  from model.export import op_names
  for name, dtype in (('model.tflite', np.float32), ('model_int8.tflite', np.uint8)):
    data = (trained_run / name).read_bytes()
    assert 'TFLite_Detection_PostProcess' in op_names(data)
    detector = TFLiteDetector(trained_run / name, ['disc', 'square'])
    assert detector.input['dtype'] == dtype and detector.input_size == 300
    shapes = [tuple(detector.interpreter.get_tensor(i).shape) for i in detector.outputs]
    assert shapes == [(1, 100, 4), (1, 100), (1, 100), (1,)]
  assert (trained_run / 'model_int8.tflite').stat().st_size < 0.4 * (trained_run / 'model.tflite').stat().st_size


def test_serving_detector_never_imports_tensorflow(trained_run, shapes_dataset):
  image = sorted((shapes_dataset / 'images').glob('test-*.jpg'))[0]
  code = (
      'import sys\n'
      'from model.run_folder import read_labels_file\n'
      'from model.tflite_detector import TFLiteDetector\n'
      'from model.images import load_image\n'
      f'run = {str(trained_run)!r}\n'
      "d = TFLiteDetector(run + '/model_int8.tflite', read_labels_file(run + '/labels.txt'))\n"
      f'found = d.detect(load_image({str(image)!r}))\n'
      "assert found, 'nothing detected'\n"
      "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
      'print(found[0].label)\n')
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() in ('disc', 'square')


def test_training_into_an_existing_folder_is_refused(trained_run, shapes_dataset, base_paths):
  before = sorted(p.name for p in trained_run.iterdir())
  result = run_model_cli('train', '--tasks', shapes_dataset / 'tasks.json', '--out', trained_run,
                         model_dir=base_paths.model_dir)
  assert result.returncode == 2 and 'already exists' in result.stderr
  assert sorted(p.name for p in trained_run.iterdir()) == before


def test_malformed_task_file_is_a_clear_error_naming_the_task(tmp_path, base_paths):
  bad = tmp_path / 'tasks.json'
  bad.write_text(json.dumps([{'id': 41, 'data': {}, 'annotations': []}]))
  result = run_model_cli('train', '--tasks', bad, '--out', tmp_path / 'run',
                         model_dir=base_paths.model_dir)
  assert result.returncode == 2
  assert 'task 41' in result.stderr and 'data.image' in result.stderr
  assert not (tmp_path / 'run').exists()


def test_mediapipe_object_detector_loads_the_file_and_finds_the_shape(trained_run, shapes_dataset):
  from model.export import metadata_python
  python = metadata_python()
  if python is None:
    if os.environ.get('CI') == 'true':
      pytest.fail('.venv-mediapipe is missing: scripts/setup.sh must create it')
    pytest.skip('.venv-mediapipe is not set up on this machine')
  metrics = json.loads((trained_run / 'metrics.json').read_text())
  assert metrics['tflite_metadata'] is True
  tasks = json.loads((shapes_dataset / 'tasks.json').read_text())
  test_task = next(t for t in tasks if t['meta']['split'] == 'test')
  value = test_task['annotations'][0]['result'][0]['value']
  code = (
      'import json, sys\n'
      'import mediapipe as mp\n'
      'from mediapipe.tasks import python as tasks\n'
      'from mediapipe.tasks.python import vision\n'
      'out = []\n'
      'for path in sys.argv[2:]:\n'
      '  options = vision.ObjectDetectorOptions(\n'
      '      base_options=tasks.BaseOptions(model_asset_path=path), score_threshold=0.3)\n'
      '  with vision.ObjectDetector.create_from_options(options) as detector:\n'
      '    found = detector.detect(mp.Image.create_from_file(sys.argv[1])).detections\n'
      '  b = found[0].bounding_box\n'
      '  out.append([found[0].categories[0].category_name, b.origin_x, b.origin_y,\n'
      '              b.origin_x + b.width, b.origin_y + b.height])\n'
      'print(json.dumps(out))\n')
  result = subprocess.run(
      [str(python), '-c', code, str(shapes_dataset / test_task['data']['image']),
       str(trained_run / 'model.tflite'), str(trained_run / 'model_int8.tflite')],
      capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  truth = [value['x'] * 3.2, value['y'] * 2.4, (value['x'] + value['width']) * 3.2,
           (value['y'] + value['height']) * 2.4]
  for label, *box in json.loads(result.stdout.strip().splitlines()[-1]):
    assert label == value['rectanglelabels'][0]
    assert iou_xyxy(box, truth) >= 0.5


def test_enough_images_hold_some_out_and_record_their_map_per_iteration(base_paths, tmp_path):
  """From 20 training images on, a tenth is held out: its mAP goes into metrics.json and history."""
  from model.config import TrainConfig
  from tests.synthetic import make_task_set
  tasks = make_task_set(tmp_path, 20, ('disc',), 'train', seed=21)
  # Two views per image (no crops, no zoom-outs): this is about the split, and caching
  # 23 views of 18 images twice took three minutes.
  config = TrainConfig(trainable='heads').with_overrides({'budget.max': 60,
                                                         'input.size': SMALL_INPUT,
                                                         'views.max_per_image': 2})
  first = pipeline.train_iteration(tasks, tmp_path, tmp_path / 'v1', base_paths.model_dir,
                                    config=config, export_kinds=())
  second = pipeline.train_iteration(tasks, tmp_path, tmp_path / 'v2', base_paths.model_dir,
                                     previous=first.root, config=config, export_kinds=())
  metrics = json.loads(second.metrics.read_text())
  assert (metrics['images']['train'], metrics['images']['validation']) == (18, 2)
  # Same images, same boxes: the second iteration took every view the first kept,
  # and only the newest iteration keeps them.
  assert metrics['images']['reused_views'] == 18
  assert metrics['images']['reused_view_outputs'] == 36  # and their frozen outputs (2 each)
  assert metrics['images']['new_view_share'] == 0.0  # nothing new to draw more often
  assert second.views.is_file() and not first.views.exists()
  # The second knows every label and no image is new: a quarter of the budget, at
  # least the base (25).
  assert (json.loads(first.metrics.read_text())['planned_steps'], metrics['planned_steps']) == (60, 25)
  assert 'the previous iteration knows every label and 0% of the images are new' in (
      metrics['choices']['steps']['why'])
  held_out = metrics['evaluation']['validation']
  assert metrics['evaluation']['of'] == 'checkpoint'  # no .tflite exported here
  assert 0.5 <= held_out['map50'] <= 1.0 and set(held_out['per_class']) == {'disc'}
  first_map = json.loads(first.metrics.read_text())['evaluation']['validation']['map50']
  assert metrics['history'] == [{'iteration': 1, 'images': 18, 'map50': first_map},
                                {'iteration': 2, 'images': 18, 'map50': held_out['map50']}]
  # Pre-annotations show each label from the threshold its held-out boxes asked for
  # (the default where two images hold too few), which run.json hands the backend.
  (threshold,) = metrics['evaluation']['score_thresholds'].values()
  assert re.match(r'least work on \d+ held-out boxes|\d of its boxes held out', threshold['why'])
  assert 0.1 <= threshold['value'] <= 0.9
  assert json.loads((second.root / 'run.json').read_text())['score_thresholds'] == {
      'disc': threshold['value']}
