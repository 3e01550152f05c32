"""Label Studio tasks -> examples: which annotation, which boxes, which split."""

import dataclasses
import json

import numpy as np
import pytest

from model import tasks as tasks_lib
from model.tasks import TaskError


def rect(x, y, w, h, label='duck', rotation=0, **extra):
  return {'type': 'rectanglelabels', 'from_name': 'label', 'to_name': 'image',
          'original_width': 200, 'original_height': 100,
          'value': {'x': x, 'y': y, 'width': w, 'height': h, 'rotation': rotation,
                    'rectanglelabels': [label]}, **extra}


def task(*results, split=None, task_id=1, **annotation):
  t = {'id': task_id, 'data': {'image': 'a.jpg'},
       'annotations': [{'id': 1, 'result': list(results), **annotation}]}
  if split:
    t['meta'] = {'split': split}
  return t


def parse_one(t):
  examples, stats = tasks_lib.parse_tasks([t])
  return examples[0], stats


def test_percent_boxes_become_normalized_yxyx():
  example, _ = parse_one(task(rect(10, 20, 30, 40)))
  np.testing.assert_allclose(example.boxes, [[0.2, 0.1, 0.6, 0.4]], atol=1e-6)
  assert example.labels == ('duck',) and example.labeled


def test_latest_non_cancelled_annotation_wins():
  t = {'id': 7, 'data': {'image': 'a.jpg'}, 'annotations': [
      {'id': 1, 'created_at': '2024-01-01', 'result': [rect(0, 0, 10, 10, 'old')]},
      {'id': 2, 'created_at': '2024-03-01', 'result': [rect(0, 0, 10, 10, 'new')]},
      {'id': 3, 'created_at': '2024-05-01', 'was_cancelled': True,
       'result': [rect(0, 0, 10, 10, 'cancelled')]},
  ]}
  example, stats = parse_one(t)
  assert example.labels == ('new',)
  assert stats.cancelled_annotations == 1


def test_non_rectangles_are_ignored_and_counted():
  example, stats = parse_one(task(rect(0, 0, 10, 10),
                                  {'type': 'choices', 'value': {'choices': ['x']}}))
  assert len(example.boxes) == 1 and stats.ignored_results == 1


def test_out_of_range_boxes_are_clipped_and_degenerate_ones_dropped():
  example, stats = parse_one(task(rect(90, 50, 30, 80), rect(10, 10, 0, 20), rect(150, 10, 5, 5)))
  np.testing.assert_allclose(example.boxes, [[0.5, 0.9, 1.0, 1.0]], atol=1e-6)
  assert (stats.boxes, stats.clipped, stats.dropped_degenerate) == (3, 2, 2)


def test_rotated_box_becomes_its_axis_aligned_hull():
  # 90° clockwise about the top-left corner (20, 10) px: a 40x20 px box turns to 20x40 px to its left.
  example, _ = parse_one(task(rect(10, 10, 20, 20, rotation=90)))
  np.testing.assert_allclose(example.boxes, [[0.1, 0.0, 0.5, 0.1]], atol=1e-5)


def test_empty_annotation_is_a_labeled_negative_and_no_annotation_is_unlabeled():
  negative, _ = parse_one(task())
  assert negative.labeled and negative.boxes.shape == (0, 4)
  unlabeled, _ = parse_one({'id': 2, 'data': {'image': 'b.jpg'}, 'annotations': []})
  assert not unlabeled.labeled


def test_splits_choose_training_and_evaluation_tasks():
  examples, _ = tasks_lib.parse_tasks([
      task(rect(0, 0, 10, 10), split='train', task_id=1),
      task(rect(0, 0, 10, 10), task_id=2),
      task(rect(0, 0, 10, 10), split='test', task_id=3),
      task(rect(0, 0, 10, 10), split='unlabeled', task_id=4),
  ])
  assert [e.task_id for e in tasks_lib.training_examples(examples)] == [1, 2]
  assert [e.task_id for e in tasks_lib.evaluation_examples(examples)] == [3]
  no_splits, _ = tasks_lib.parse_tasks([task(rect(0, 0, 1, 1), task_id=i) for i in (5, 6)])
  assert [e.task_id for e in tasks_lib.evaluation_examples(no_splits)] == [5, 6]


@pytest.mark.parametrize('bad, message', [
    ({'id': 9, 'annotations': []}, 'task 9: missing data.image'),
    ({'id': 9, 'data': {'image': 'a.jpg'}, 'annotations': 'x'}, 'task 9: "annotations" must be a list'),
    (task({'type': 'rectanglelabels', 'value': {'x': 1, 'y': 2, 'rectanglelabels': ['a']}}, task_id=9),
     'task 9: rectangle needs numeric'),
    (task({'type': 'rectanglelabels', 'value': {'x': 1, 'y': 2, 'width': 3, 'height': 4}}, task_id=9),
     'task 9: rectanglelabels result without a label'),
    ('not a task', 'task #0'),
])
def test_malformed_tasks_name_the_task(bad, message):
  with pytest.raises(TaskError, match=message):
    tasks_lib.parse_tasks([bad])


def test_tasks_file_errors(tmp_path):
  (tmp_path / 'bad.json').write_text('{"id": 1,')
  with pytest.raises(TaskError, match='not valid JSON'):
    tasks_lib.load_tasks_file(tmp_path / 'bad.json')
  with pytest.raises(TaskError, match='cannot read'):
    tasks_lib.load_tasks_file(tmp_path / 'missing.json')
  (tmp_path / 'num.json').write_text(json.dumps(3))
  with pytest.raises(TaskError, match='expected a list'):
    tasks_lib.load_tasks_file(tmp_path / 'num.json')


def test_image_paths_resolve_against_the_root(tmp_path):
  example, _ = parse_one(task())
  assert tasks_lib.resolve_image(example, tmp_path) == tmp_path / 'a.jpg'
  local = tasks_lib.Example(1, '/data/local-files/?d=/srv/x.png', '', np.zeros((0, 4)), (), True)
  assert str(tasks_lib.resolve_image(local, tmp_path)) == '/srv/x.png'


def test_labels_keep_first_appearance_order():
  examples, _ = tasks_lib.parse_tasks([task(rect(0, 0, 5, 5, 'b'), rect(5, 5, 5, 5, 'a')),
                                       task(rect(0, 0, 5, 5, 'c'), rect(1, 1, 5, 5, 'b'))])
  assert tasks_lib.label_set(examples) == ['b', 'a', 'c']


def test_training_images_larger_than_the_config_allows_are_shrunk(tmp_path):
  from PIL import Image
  from model import pipeline
  from model.config import TrainConfig
  config = TrainConfig()
  side = config.max_image_side()
  Image.new('RGB', (side + 500, 600), 'white').save(tmp_path / 'a.jpg')
  training = pipeline.load_examples([task(rect(10, 10, 20, 20), split='train')], tmp_path, config)
  assert training.images[0].size == (side, round(600 * side / (side + 500)))
  np.testing.assert_allclose(training.examples[0].boxes, [[0.1, 0.1, 0.3, 0.3]], atol=1e-6)


def test_example_key_names_the_task_its_image_and_its_boxes():
  from model.tasks import Example, example_key
  example = Example(7, '/data/upload/1/cat.jpg', 'train',
                    np.array([[0.1, 0.2, 0.5, 0.6]], np.float32), ('cat',), True)
  assert example_key(example) == example_key(dataclasses.replace(example))
  others = [dataclasses.replace(example, task_id=8),
            dataclasses.replace(example, image='/data/upload/1/dog.jpg'),
            dataclasses.replace(example, labels=('dog',)),
            dataclasses.replace(example, boxes=np.array([[0.1, 0.2, 0.5, 0.7]], np.float32))]
  assert len({example_key(e) for e in [example, *others]}) == 5
