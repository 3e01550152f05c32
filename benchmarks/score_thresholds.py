"""Pre-annotations an annotator fixes: the work each score-threshold policy leaves.

An edit is a box shown wrongly (to delete) or an object with no box (to
draw), matched as at mAP@0.5 (`model.score_thresholds`), on each data set's
test split, from the float .tflite of a run trained on N images. Policies:
fixed thresholds; each label's chosen on the run's held-out images, else the
default (what an iteration does: `run.json`'s `score_thresholds`); with
`--previous K` (the run warm-starts from one on the first K of its N images,
as the labeling loop does), else halfway or all the way to the choice on the
N - K images as the previous run detected them (`previous_weight`; dropped);
chosen the same way on up to 32 training images as they are (dropped: the
model has learned them); and the best per label on the test split itself (the
bound no choice beats). Work counts a missed box as `--missed-cost` wrong ones
(one table each); the rows keep every label's edits at every threshold, so other
costs and rules need no new runs.

  .venv/bin/python benchmarks/score_thresholds.py --datasets raccoon bccd raccoon-shapes \\
      --shots 10 50 --seeds 2 --missed-cost 1 2 3
  .venv/bin/python benchmarks/score_thresholds.py --datasets raccoon --shots 10 --previous 5

Results: benchmarks/results/score_thresholds.{json,md}; rows not re-run keep theirs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
from generalization import (ALL, add_dataset_arguments, load_dataset, seeds_for,
                            set_up_logging, subset_count)
import result_files

from model import pipeline, run_folder, score_thresholds
from model.config import ScoreThresholdConfig, TrainConfig
from model.evaluate import tflite_detect

log = logging.getLogger('benchmark')

FIXED = (0.25, 0.3, 0.35, 0.4, 0.5)
SINCE = 'halfway by the previous run (dropped)'
SINCE_ALL = 'all the way (dropped)'
CHOSEN = ('held-out, else the default', SINCE, SINCE_ALL, 'training images (dropped)',
          'best on test')
# Training images a run's thresholds were tried on (the first of those that trained).
TRAINING_IMAGES = 32


def curves(outcomes: dict, grid: list[float]) -> dict:
  """label -> its boxes and [wrong, missed] at each threshold of `grid`."""
  return {label: {'boxes': o.boxes, 'edits': [list(o.edits(t)) for t in grid]}
          for label, o in outcomes.items()}


def outcomes_from(curve: dict, grid: list[float]) -> score_thresholds.Outcomes:
  """Outcomes with `curve`'s edits at every threshold of `grid` (what `choose` reads)."""
  scores, right = [], []
  previous = (0, 0)  # shown wrongly / rightly above the grid's top
  for t, (wrong, missed) in reversed(list(zip(grid, curve['edits']))):
    found = curve['boxes'] - missed
    scores += [t] * (wrong - previous[0] + found - previous[1])
    right += [False] * (wrong - previous[0]) + [True] * (found - previous[1])
    previous = (wrong, found)
  return score_thresholds.Outcomes(np.array(scores), np.array(right, bool), curve['boxes'])


def one_run(root: Path, tasks: list, test, shots, seed: int, model_dir: Path,
            work: Path, previous_images: int | None = None) -> dict:
  config, max_images = TrainConfig(seed=seed), None if shots == ALL else shots
  folder = Path(tempfile.mkdtemp(dir=work))
  try:
    previous = None
    if previous_images:  # the same seed draws its first K images among the first N
      previous = pipeline.train_iteration(tasks, root, folder / 'previous', model_dir,
                                          config=config, max_images=previous_images,
                                          export_kinds=('float',)).root
    run = pipeline.train_iteration(tasks, root, folder / 'run', model_dir, previous=previous,
                                   config=config, max_images=max_images, export_kinds=('float',))
    labels = run_folder.read_run(run.root)[1]  # a warm start keeps the previous run's order
    training = pipeline.load_examples(tasks, root, config, labels, max_images)
    detect = tflite_detect(run.tflite('float'), labels)
    metrics = json.loads(run.metrics.read_text())
    later = pipeline.later_images(training, previous, config.score_thresholds.previous_images)
    since = score_thresholds.match(*later.truth, later.found, later.labels) if later else {}
  finally:
    shutil.rmtree(folder)
  grid = ScoreThresholdConfig(low=0.05, high=0.95).grid()
  parts = {'test': test, 'training images': training.part(training.fit[:TRAINING_IMAGES])}
  if training.validation:
    parts['held-out'] = training.part(training.validation)
  row = {'seed': seed, 'images': len(training.fit), 'held_out': len(training.validation),
         'recorded': metrics['evaluation'].get('score_thresholds'), 'grid': grid,
         'curves': {name: curves(score_thresholds.match(examples, images, detect(images),
                                                        training.labels), grid)
                    for name, (examples, images) in parts.items()}}
  if previous_images:
    row['curves']['since the previous run'] = curves(since, grid)
  log.info('%s images seed %d: at 0.25 %s', shots, seed,
           policy_edits(row, ScoreThresholdConfig())['fixed 0.25'])
  return row


def policy_edits(row: dict, config: ScoreThresholdConfig) -> dict[str, list[int]]:
  """policy -> [wrong, missed] on the test split, summed over labels."""
  grid, test = row['grid'], row['curves']['test']

  def at(thresholds: dict) -> list[int]:
    pairs = [test[label]['edits'][grid.index(t)] for label, t in thresholds.items()]
    return [sum(p[0] for p in pairs), sum(p[1] for p in pairs)]

  def outcomes(part: str) -> dict:
    """label -> Outcomes on `part` (none: no boxes, no detections)."""
    curves_of = row['curves'].get(part, {})
    return {label: outcomes_from(curves_of[label], grid) if label in curves_of
            else score_thresholds.Outcomes(np.zeros(0), np.zeros(0, bool), 0) for label in test}

  chosen_on = {'held-out, else the default': (outcomes('held-out'), config, None),
               'training images (dropped)': (outcomes('training images'), config, None),
               'best on test': (outcomes('test'), dataclasses.replace(config, min_boxes=0), None)}
  if 'since the previous run' in row['curves']:
    chosen_on[SINCE] = (outcomes('held-out'), dataclasses.replace(config, previous_weight=0.5),
                        outcomes('since the previous run'))
    chosen_on[SINCE_ALL] = (outcomes('held-out'), dataclasses.replace(config, previous_weight=1.0),
                            outcomes('since the previous run'))
  result = {f'fixed {t}': at(dict.fromkeys(test, t)) for t in FIXED}
  for name, (outcomes_of, rule, since) in chosen_on.items():
    chosen = score_thresholds.choose(outcomes_of, rule, since)
    result[name] = at({label: c['value'] for label, c in chosen.items()})
  return result


def write(results: dict, missed_costs: list[float]) -> None:
  result_files.write_json('score_thresholds', results)
  policies = [f'fixed {t}' for t in FIXED] + list(CHOSEN)
  lines = ['# Pre-annotation work by score-threshold policy', '',
           'Boxes shown wrongly + objects missed on the test split (IoU 0.5), summed over '
           'subsets, and the work they make with a missed box costing as many wrong ones '
           'as the table says (against the fixed 0.25 in brackets). Thresholds chosen '
           'per label as `ScoreThresholdConfig` says, at that cost. '
           '`benchmarks/score_thresholds.py` writes this.']
  for cost in missed_costs:
    config = ScoreThresholdConfig(missed_cost=cost)
    lines += ['', f'## A missed box costs {cost:g} wrong ones', '',
              '| data set | images | subsets | test boxes | ' + ' | '.join(policies) + ' |',
              '|---|---|---|---|' + '---|' * len(policies)]
    for dataset, by_shots in sorted(results['datasets'].items()):
      for shots, rows in by_shots.items():
        edits = [policy_edits(row, config) for row in rows]
        total = {p: [sum(e[p][i] for e in edits) for i in (0, 1)]
                 for p in policies if all(p in e for e in edits)}
        work = {p: w + cost * m for p, (w, m) in total.items()}
        cells = [f'{total[p][0]} + {total[p][1]} ({work[p] / work["fixed 0.25"]:.2f})'
                 if p in total else '–' for p in policies]
        boxes = sum(c['boxes'] for row in rows for c in row['curves']['test'].values())
        lines.append(f'| {dataset} | {shots} | {len(rows)} | {boxes} | ' + ' | '.join(cells) + ' |')
  result_files.write_markdown('score_thresholds', lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  add_dataset_arguments(parser, ['10', '50'])
  parser.add_argument('--missed-cost', type=float, nargs='+', default=[1.0, 2.0, 3.0])
  parser.add_argument('--previous', type=int, default=None, metavar='K',
                      help='warm-start each run from one on the first K of its images')
  args = parser.parse_args()
  set_up_logging()
  args.work.mkdir(parents=True, exist_ok=True)
  results = result_files.read_json('score_thresholds', {'datasets': {}})
  for name in args.datasets:
    root, tasks, test = load_dataset(name, args.work)
    for shots in map(subset_count, args.shots):
      rows = [one_run(root, tasks, test, shots, seed, args.model_dir, args.work, args.previous)
              for seed in seeds_for(shots, args.seeds, args.all_seeds, args.seed_from)]
      key = f'{shots} after {args.previous}' if args.previous else str(shots)
      results['datasets'].setdefault(name, {})[key] = rows
      write(results, args.missed_cost)
  print((result_files.RESULTS / 'score_thresholds.md').read_text())


if __name__ == '__main__':
  main()
