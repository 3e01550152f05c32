"""Score thresholds for pre-annotations: matching detections to boxes, counting an
annotator's edits, choosing each label's threshold, and reading it back from a run."""

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from model import run_folder
from model.boxes import Detection
from model.config import ScoreThresholdConfig
from model.score_thresholds import Outcomes, choose, match
from model.tasks import Example


def _example(boxes, labels):
  """Boxes (x1, y1, x2, y2) in pixels of a 200 x 100 image."""
  normalized = [(y1 / 100, x1 / 200, y2 / 100, x2 / 200) for x1, y1, x2, y2 in boxes]
  return Example(1, 'x.jpg', 'train', np.array(normalized, np.float32).reshape(-1, 4),
                 tuple(labels), True)


def test_match_counts_a_detection_right_once_per_box_of_its_label():
  """Highest scores first, each box matched once (IoU over 0.5, same label): a second box
  on the same object, a box of the wrong label and one on the background are wrong."""
  example = _example([(10, 10, 50, 50), (100, 10, 150, 60), (160, 60, 190, 90)], ['a', 'a', 'b'])
  found = [Detection('a', 0.9, (11, 10, 50, 51)),     # right
           Detection('a', 0.6, (12, 12, 49, 50)),     # the same object again: wrong
           Detection('a', 0.3, (60, 60, 90, 90)),     # background: wrong
           Detection('a', 0.8, (160, 60, 190, 90)),   # b's box, labeled a: wrong
           Detection('b', 0.2, (161, 61, 190, 90)),   # right
           Detection('c', 0.99, (10, 10, 50, 50))]    # not the model's label: ignored
  outcomes = match([example], [Image.new('RGB', (200, 100))], [found], ['a', 'b'])
  a, b = outcomes['a'], outcomes['b']
  assert sorted(zip((round(float(s), 2) for s in a.scores), a.right.tolist())) == [
      (0.3, False), (0.6, False), (0.8, False), (0.9, True)]
  assert (a.boxes, b.boxes, b.right.tolist()) == (2, 1, [True])
  # Shown from 0.5: three a-boxes, one right; the second a-object and b's are missed.
  assert a.edits(0.5) == (2, 1) and b.edits(0.5) == (0, 1)
  assert a.edits(0.1) == (3, 1) and b.edits(0.1) == (0, 0)


def test_match_handles_images_without_boxes_or_detections():
  empty = _example([], [])
  one = _example([(10, 10, 50, 50)], ['a'])
  images = [Image.new('RGB', (200, 100))] * 3
  outcomes = match([empty, one, one], images,
                   [[Detection('a', 0.7, (10, 10, 50, 50))], [], []], ['a'])
  assert outcomes['a'].right.tolist() == [False] and outcomes['a'].boxes == 2
  assert outcomes['a'].edits(0.5) == (1, 2)


def test_choose_takes_the_least_work_on_held_out_images_and_the_default_on_too_few_boxes():
  """A missed box costs two wrong ones; ties go to the threshold nearest the default."""
  config = ScoreThresholdConfig(default=0.3, missed_cost=2.0, low=0.1, high=0.9, step=0.05,
                                min_boxes=3)
  # Right boxes score 0.6-0.9, wrong ones 0.2-0.45: 0.5 to 0.6 show only the right
  # ones (one object missed: work 2), and 0.5 is the nearest to the default.
  cells = Outcomes(np.array([0.9, 0.8, 0.6, 0.45, 0.3, 0.2]),
                   np.array([True, True, True, False, False, False]), boxes=4)
  # A missed box costing two wrong ones, showing a right box at 0.15 with a wrong one
  # at 0.2 is worth it: the least work lies under the default.
  faint = Outcomes(np.array([0.8, 0.2, 0.15]), np.array([True, False, True]), boxes=3)
  rare = Outcomes(np.array([0.95]), np.array([True]), boxes=2)
  chosen = choose({'rare': rare, 'faint': faint, 'cell': cells}, config)
  assert list(chosen) == ['cell', 'faint', 'rare']
  assert chosen['cell'] == {'value': 0.5, 'why': (
      'least work on 4 held-out boxes: 0 wrong + 1 missed (at 0.3: 2 + 1; a missed box '
      'costs 2 wrong ones)')}
  assert chosen['faint']['value'] == 0.15
  assert chosen['rare'] == {'value': 0.3, 'why': '2 of its boxes held out (under 3): the default'}
  # With a missed box worth one wrong one, the faint box is not worth its wrong neighbour.
  assert choose({'faint': faint}, dataclasses.replace(config, missed_cost=1.0))['faint']['value'] == 0.3


def test_choose_can_fall_back_on_the_previous_versions_detections_of_the_images_new_to_it():
  """Where too few boxes are held out and `previous_weight` says so, the boxes labeled
  since the previous version move the threshold, as that version detected them;
  held-out boxes come first where there are enough."""
  config = ScoreThresholdConfig(default=0.3, missed_cost=2.0, low=0.1, high=0.9, step=0.05,
                                min_boxes=3, previous_weight=0.5)
  few = Outcomes(np.array([0.9]), np.array([True]), boxes=1)
  enough = Outcomes(np.array([0.9, 0.8, 0.7, 0.35]), np.array([True, True, True, False]), boxes=3)
  since = {'a': enough, 'b': enough, 'c': few}
  chosen = choose({'a': few, 'b': enough, 'c': few, 'd': few}, config, since)
  # Half the way from the default to their least work (0.4): that model scored them.
  assert chosen['a'] == {'value': 0.35, 'why': (
      'least work on 3 boxes labeled since the previous version, as it detected them (0.5 of '
      'the way from the default to 0.4): 0 wrong + 0 missed (at 0.3: 1 + 0; a missed box '
      'costs 2 wrong ones)')}
  all_the_way = dataclasses.replace(config, previous_weight=1.0)
  assert choose({'a': few}, all_the_way, since)['a']['value'] == 0.4
  # Off (the default): the images labeled since change nothing.
  assert choose({'a': few}, dataclasses.replace(config, previous_weight=0.0), since)['a'] == {
      'value': 0.3, 'why': '1 of its boxes held out (under 3): the default'}
  assert chosen['b']['why'].startswith('least work on 3 held-out boxes')
  assert chosen['c'] == {'value': 0.3, 'why': (
      '1 of its boxes held out, 1 labeled since the previous version (under 3): the default')}
  # A label the previous version did not know.
  assert chosen['d'] == {'value': 0.3, 'why': '1 of its boxes held out (under 3): the default'}


def test_score_threshold_config_refuses_a_default_off_its_grid_and_makes_the_grid():
  assert ScoreThresholdConfig(low=0.2, high=0.4, step=0.1, default=0.3).grid() == [0.2, 0.3, 0.4]
  assert ScoreThresholdConfig().grid()[:3] == [0.1, 0.15, 0.2]
  with pytest.raises(ValueError, match='low <= default <= high'):
    ScoreThresholdConfig(default=0.05)
  with pytest.raises(ValueError, match='previous_weight'):
    ScoreThresholdConfig(previous_weight=1.5)


def test_read_score_thresholds_keeps_what_is_valid_and_is_empty_for_older_runs(tmp_path):
  assert run_folder.read_score_thresholds(tmp_path) == {}  # no run.json
  (tmp_path / run_folder.RUN_INFO_FILE).write_text(json.dumps({'labels': ['a']}))
  assert run_folder.read_score_thresholds(tmp_path) == {}  # a run from before thresholds
  (tmp_path / run_folder.RUN_INFO_FILE).write_text(json.dumps(
      {run_folder.SCORE_THRESHOLDS_KEY: {'a': 0.4, 'b': 'high', 'c': 7, 'd': 0}}))
  assert run_folder.read_score_thresholds(tmp_path) == {'a': 0.4, 'd': 0.0}
  (tmp_path / run_folder.RUN_INFO_FILE).write_text('[1, 2')
  assert run_folder.read_score_thresholds(tmp_path) == {}


def test_read_trained_on_is_empty_for_older_or_damaged_runs(tmp_path):
  assert run_folder.read_trained_on(tmp_path) == set()
  (tmp_path / run_folder.RUN_INFO_FILE).write_text(json.dumps({'labels': ['a']}))
  assert run_folder.read_trained_on(tmp_path) == set()
  (tmp_path / run_folder.RUN_INFO_FILE).write_text(json.dumps(
      {run_folder.TRAINED_ON_KEY: ['f1', 2, None, 'f2']}))
  assert run_folder.read_trained_on(tmp_path) == {'f1', 'f2'}
  (tmp_path / run_folder.RUN_INFO_FILE).write_text(json.dumps({run_folder.TRAINED_ON_KEY: 'f1'}))
  assert run_folder.read_trained_on(tmp_path) == set()
