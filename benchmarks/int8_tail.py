"""What a quantization-aware tail (`model.int8_tune`) buys the int8 file, against controls.

Trains once per data set and subset, exports float and int8 as an iteration
does, then from the same trained weights (restored before each):
- each `--tail` (Int8TuneConfig fields): `int8_tune.tail_int8`'s int8 file;
- 'plain steps': as many more steps at the same rates without QAT, both files
  exported again (is it the extra steps?);
- 'converter calibrator': the trained model converted to int8 by TFLite's
  own calibrator, as the tail's QAT copy is (is it the calibrator?).
Each file is scored on the test split (mAP@0.5).

  .venv/bin/python benchmarks/int8_tail.py --datasets small --shots 10 --seeds 2 \\
      --test-images 200 --tail '0.2 at 0.3x:steps_fraction=0.2,learning_rate_scale=0.3'

Data sets as in generalization.py. Results: benchmarks/results/int8_tail.{json,md};
rows of other data sets and counts stay.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.generalization import (  # noqa: E402
    ALL, add_dataset_arguments, add_test_images_argument, load_dataset, parse_assignments,
    seeds_for, set_up_logging, subset_count)
import result_files  # noqa: E402
from benchmarks.int8_parts import score  # noqa: E402
from model import export, int8_tune, pipeline  # noqa: E402
from model.config import ExportConfig, Int8TuneConfig, TrainConfig  # noqa: E402

log = logging.getLogger('int8_tail')
CONTROLS = ('plain steps float', 'plain steps int8', 'converter calibrator int8')


def plain_steps(fitted) -> dict[str, bytes]:
  """Both files after the tail's steps at its rates (`fitted.config.int8_tune`), without QAT."""
  from model.train import Trainer
  tune = fitted.config.int8_tune
  Trainer(fitted.model, fitted.views.split, fitted.config).train(
      fitted.views.train, int8_tune.tail_steps(fitted),
      fitted.schedule.class_learning_rate * tune.learning_rate_scale,
      fitted.schedule.box_learning_rate_scale)
  return pipeline.export_model(fitted.model, fitted.views, fitted.training.labels, ExportConfig(),
                               (export.INT8,))


def one_subset(tasks, root: Path, args, shots, seed: int, tails, test) -> dict:
  fitted = pipeline.fit(tasks, root, args.model_dir, pipeline.Stopwatch(),
                        config=TrainConfig(seed=seed), max_images=None if shots == ALL else shots)
  labels = fitted.training.labels
  files = pipeline.export_model(fitted.model, fitted.views, labels, ExportConfig(),
                                (export.INT8,))
  row = {'seed': seed, 'steps': fitted.report.steps,
         'float': score(files['float'], labels, test), 'int8': score(files['int8'], labels, test)}
  if args.controls:
    inputs = pipeline.calibration_inputs(fitted.model, fitted.views, ExportConfig())
    row['converter calibrator int8'] = score(export.export_files(
        fitted.model, (export.INT8,), labels, ExportConfig(), inputs,
        int8_model=fitted.model)[export.INT8], labels, test)
  for name, fields in tails:
    fitted.config = dataclasses.replace(
        fitted.config, int8_tune=dataclasses.replace(Int8TuneConfig(), **fields))
    started = time.monotonic()
    row[name] = score(int8_tune.tail_int8(fitted, ExportConfig()), labels, test)
    row[f'{name} s'] = round(time.monotonic() - started, 1)
  if args.controls:
    fitted.config = dataclasses.replace(
        fitted.config, int8_tune=dataclasses.replace(Int8TuneConfig(), **tails[0][1]))
    with int8_tune.weights_kept(fitted.model):
      again = plain_steps(fitted)
    row['plain steps float'] = score(again['float'], labels, test)
    row['plain steps int8'] = score(again['int8'], labels, test)
  log.info('%s images, seed %d: %s', shots, seed,
           ', '.join(f'{k} {v}' for k, v in row.items() if k != 'seed'))
  return row


def write(results: dict, columns: list[str], test_images: int) -> None:
  result_files.write_json('int8_tail', results)
  lines = ['# int8 with a quantization-aware tail, against plain steps and the converter\'s '
           'calibrator', '',
           f'{os.cpu_count()} cores. mAP@0.5 on the test split ({test_images} images in the '
           'synthetic sets), mean over subsets (seeds); the same trained weights for every '
           'column. `benchmarks/int8_tail.py` writes this.', '',
           '| data set | images | subsets | ' + ' | '.join(columns) + ' |',
           '|---|---|---|' + '---|' * len(columns)]
  for dataset, by_shots in results.items():
    for shots, rows in by_shots.items():
      cells = [f'{statistics.mean(r[c] for r in rows):.3f}' if all(c in r for r in rows)
               else '' for c in columns]
      lines.append(f'| {dataset} | {shots} | {len(rows)} | ' + ' | '.join(cells) + ' |')
  result_files.write_markdown('int8_tail', lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  add_dataset_arguments(parser, shots=['10'])
  add_test_images_argument(parser)
  parser.add_argument('--tail', action='append', default=[],
                      help="'name:steps_fraction=...,learning_rate_scale=...' (Int8TuneConfig); "
                           'the first also sets the plain steps; default: the defaults')
  parser.add_argument('--no-controls', dest='controls', action='store_false',
                      help='the tails alone, without the plain steps and the converter\'s calibrator')
  args = parser.parse_args()
  set_up_logging()
  logging.getLogger('tensorflow').setLevel(logging.ERROR)
  tails = [parse_assignments(text) for text in args.tail] or [('tail (default)', {})]
  args.work.mkdir(parents=True, exist_ok=True)
  results = result_files.read_json('int8_tail', {})
  columns = ['float', 'int8', *(name for name, _ in tails), *CONTROLS]
  for name in args.datasets:
    root, tasks, test = load_dataset(name, args.work, args.test_images)
    for shots in args.shots:
      count = subset_count(shots)
      results.setdefault(name, {})[shots] = [
          one_subset(tasks, root, args, count, seed, tails, test)
          for seed in seeds_for(count, args.seeds, args.all_seeds, args.seed_from)]
      write(results, columns, args.test_images)
  print((result_files.RESULTS / 'int8_tail.md').read_text())


if __name__ == '__main__':
  main()
