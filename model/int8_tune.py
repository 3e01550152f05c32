"""A quantization-aware tail for the int8 file, where plain int8 loses on held-out images.

int8 rounding costs small objects a few points of mAP@0.5, spread over the
whole network (benchmarks/results/choices.md, "Where int8 still loses on small
objects"). Where an iteration holds images out and its int8 file scores more
than `Int8TuneConfig.tolerance` under the float file on them, what trained
goes on for a short quantization-aware tail (`model.compression`'s QAT of the
extractor's trained part; the heads learn on its rounded maps), an int8 file
is converted from that copy, and whichever int8 file does better on the
held-out images ships. The float file, the checkpoint and the next iteration
keep the float-trained weights: the tail's reach the int8 file only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time

from model.config import TrainConfig

log = logging.getLogger(__name__)


def needs_tail(config: TrainConfig, held_out: dict[str, float] | None) -> tuple[bool, str]:
  """Whether the int8 file gets a quantization-aware tail, and why.

  Args:
    config: the iteration's settings, every choice made (`trainable` set).
    held_out: mAP@0.5 of the 'float' and 'int8' files on the held-out images,
      or None where none are held out.
  """
  tolerance = config.int8_tune.tolerance
  if tolerance is None:
    return False, 'off (int8_tune.tolerance is None)'
  if config.trainable == 'heads':
    return False, 'only the heads train; QAT needs a part of the extractor that trains'
  if config.compression.active:
    return False, ('QAT or pruning trained the extractor already (a tail would undo '
                   "pruning's zeros)")
  if held_out is None:
    return False, 'no held-out images to compare the int8 file with the float one on'
  gap = held_out['float'] - held_out['int8']
  where = f"on the held-out images (float {held_out['float']:.3f}, int8 {held_out['int8']:.3f})"
  if gap <= tolerance:
    return False, f'int8 within {tolerance:g} of float {where}'
  return True, f'int8 {gap:.3f} under float {where}, more than {tolerance:g}'


@contextlib.contextmanager
def weights_kept(model):
  """Puts the SSD's weights (extractor, box head, class head) back as they were
  when the block ends."""
  weights = [*model.feature_extractor.weights, *model.box_head.weights,
             *model.class_head.weights]
  values = [weight.numpy() for weight in weights]
  try:
    yield
  finally:
    for weight, value in zip(weights, values):
      weight.assign(value)


def tail_steps(fitted) -> int:
  """The tail's steps: `Int8TuneConfig.steps_fraction` of those the run trained."""
  return max(1, round(fitted.report.steps * fitted.config.int8_tune.steps_fraction))


def tail_int8(fitted, export_config, progress=None) -> bytes:
  """The int8 file of a quantization-aware tail from `fitted`'s trained weights.

  Trains `Int8TuneConfig.steps_fraction` of the run's steps (`progress` gets
  each `train.Progress`, as training's does); the model's weights are the
  trained ones again afterwards.
  """
  from model.pipeline import export_model
  from model.train import Trainer
  model, views, schedule = fitted.model, fitted.views, fitted.schedule
  tune = fitted.config.int8_tune
  config = fitted.config.with_overrides({'compression.quantization_aware': True})
  steps = tail_steps(fitted)
  started = time.monotonic()
  with weights_kept(model):
    try:
      views.split.apply_optimization(config, steps, views.train)
      Trainer(model, views.split, config).train(
          views.train, steps, schedule.class_learning_rate * tune.learning_rate_scale,
          schedule.box_learning_rate_scale, progress=progress)
      log.info('Quantization-aware tail: %d steps in %.1f s', steps, time.monotonic() - started)
      return export_model(model, views, fitted.training.labels, export_config, ('int8',))['int8']
    finally:
      views.split.optimized = None


@dataclasses.dataclass
class Outcome:
  """What became of the int8 file: for metrics.json's evaluation."""

  ran: bool
  why: str
  held_out_map50: dict[str, float] | None = None  # 'int8', and 'tuned int8' where it ran
  kept: str = 'int8'  # the file that ships: 'int8' or 'tuned int8'

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def tune(fitted, int8_file: bytes, held_out: dict[str, float] | None, export_config,
         score_held_out, progress=None) -> tuple[bytes, Outcome]:
  """The int8 file to ship, and what was done for it.

  Args:
    held_out: as `needs_tail`'s.
    score_held_out: .tflite bytes -> their mAP@0.5 on the held-out images.
    progress: as `tail_int8`'s.
  """
  ran, why = needs_tail(fitted.config, held_out)
  log.info('int8 tail: %s', why)
  if not ran:
    return int8_file, Outcome(False, why, {'int8': held_out['int8']} if held_out else None)
  try:
    tuned = tail_int8(fitted, export_config, progress)
  except Exception as error:  # pylint: disable=broad-except
    # A bonus on a trained iteration: a failure here ships the plain int8 file.
    log.warning('The int8 tail failed, the plain int8 file ships: %s', error)
    return int8_file, Outcome(False, f'{why}; the tail failed: {type(error).__name__}: {error}',
                              {'int8': held_out['int8']})
  maps = {'int8': held_out['int8'], 'tuned int8': score_held_out(tuned)}
  kept = 'tuned int8' if maps['tuned int8'] > maps['int8'] else 'int8'
  log.info('Held-out mAP@0.5: int8 %.3f, after the tail %.3f: %s ships', maps['int8'],
           maps['tuned int8'], 'the tail\'s' if kept == 'tuned int8' else 'the plain one')
  return tuned if kept == 'tuned int8' else int8_file, Outcome(True, why, maps, kept)
