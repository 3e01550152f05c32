"""The int8 file's quantization-aware tail: when it runs, and that it reaches the int8 file only."""

import json
import types

import pytest

from model import int8_tune, pipeline
from model.config import TrainConfig
from tests.conftest import SMALL_INPUT

SETTLED = TrainConfig(trainable='top')  # as `choose_settings` leaves it


@pytest.mark.parametrize('config, held_out, why', [
    (SETTLED.with_overrides({'int8_tune.tolerance': None}), {'float': 0.9, 'int8': 0.5}, 'off'),
    (TrainConfig(trainable='heads'), {'float': 0.9, 'int8': 0.5}, 'only the heads train'),
    (SETTLED.with_overrides({'compression.quantization_aware': True}),
     {'float': 0.9, 'int8': 0.5}, 'QAT or pruning trained the extractor already'),
    (SETTLED.with_overrides({'compression.prune_sparsity': 0.5}),
     {'float': 0.9, 'int8': 0.5}, 'QAT or pruning trained the extractor already'),
    (SETTLED, None, 'no held-out images'),
    (SETTLED, {'float': 0.80, 'int8': 0.795}, 'int8 within 0.01 of float'),
    (SETTLED, {'float': 0.80, 'int8': 0.85}, 'int8 within 0.01 of float'),  # int8 above: fine
])
def test_no_tail_where_int8_holds_or_nothing_tells(config, held_out, why):
  ran, reason = int8_tune.needs_tail(config, held_out)
  assert not ran and why in reason


def test_a_tail_where_int8_loses_more_than_the_tolerance_on_held_out_images():
  ran, reason = int8_tune.needs_tail(SETTLED, {'float': 0.80, 'int8': 0.78})
  assert ran
  assert reason == ('int8 0.020 under float on the held-out images (float 0.800, int8 0.780), '
                    'more than 0.01')


def test_a_failed_tail_ships_the_plain_int8_file_and_says_why(monkeypatch):
  def fails(*_):
    raise RuntimeError('no quantizer for this layer')
  monkeypatch.setattr(int8_tune, 'tail_int8', fails)
  fitted = types.SimpleNamespace(config=SETTLED)
  data, outcome = int8_tune.tune(fitted, b'plain', {'float': 0.8, 'int8': 0.7}, None,
                                 score_held_out=None)
  assert data == b'plain' and not outcome.ran and outcome.kept == 'int8'
  assert outcome.why.endswith('; the tail failed: RuntimeError: no quantizer for this layer')


def graph(path) -> bytes:
  """A .tflite file without the zip of labels.txt its metadata appends, which
  carries the time it was written."""
  return path.read_bytes().split(b'PK\x03\x04')[0]


def test_the_tail_reaches_the_int8_file_only(base_paths, tmp_path):
  """Forced (tolerance below any gap), the tail trains a quantization-aware copy, and the
  float file and checkpoint are those of the same iteration without it."""
  from tests.synthetic import make_task_set
  tasks = make_task_set(tmp_path, 20, ('disc',), 'train', seed=21)
  config = TrainConfig(trainable='top').with_overrides({
      'budget.max': 30, 'input.size': SMALL_INPUT, 'views.max_per_image': 2})

  def iteration(name, tolerance, stages):
    return pipeline.train_iteration(
        tasks, tmp_path, tmp_path / name, base_paths.model_dir,
        config=config.with_overrides({'int8_tune.tolerance': tolerance}),
        on_stage=lambda stage: stages.append([stage]),
        progress=lambda p: stages[-1].append(p.total_steps))
  plain_stages, tuned_stages = [], []
  plain = iteration('plain', None, plain_stages)
  tuned = iteration('tuned', -1.0, tuned_stages)
  # The tail's steps are reported under its own stage: a fifth of the run's.
  trained, tail = (next(s for s in tuned_stages if s[0] == name) for name in ('train', 'tune_int8'))
  assert len(tail) > 1 and set(tail[1:]) == {round(trained[-1] * 0.2)}
  assert next(s for s in plain_stages if s[0] == 'tune_int8') == ['tune_int8']
  outcome = json.loads(tuned.metrics.read_text())['evaluation']['int8_tune']
  assert outcome['ran'] and 'more than -1' in outcome['why']
  assert set(outcome['held_out_map50']) == {'int8', 'tuned int8'}
  assert outcome['kept'] == max(outcome['held_out_map50'], key=outcome['held_out_map50'].get)
  checkpoint = 'ckpt.data-00000-of-00001'
  assert (tuned.root / checkpoint).read_bytes() == (plain.root / checkpoint).read_bytes()
  assert graph(tuned.tflite('float')) == graph(plain.tflite('float'))
  int8_same = graph(tuned.tflite('int8')) == graph(plain.tflite('int8'))
  assert int8_same == (outcome['kept'] == 'int8')
  metrics = json.loads(plain.metrics.read_text())
  assert metrics['evaluation']['int8_tune'] == {
      'ran': False, 'why': 'off (int8_tune.tolerance is None)',
      'held_out_map50': {'int8': metrics['evaluation']['validation_int8']['map50']},
      'kept': 'int8'}
  assert 'tune_int8_s' in metrics['wall_time_s']
