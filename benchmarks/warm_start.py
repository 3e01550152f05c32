"""What a warm start buys: the next iteration from the last one vs from the base.

For each subset of 10 training images: iteration A trains on its first 5
(`--first`) from the base; then, on all 10, a fresh iteration (from the base) runs side
by side with warm starts from A (which knows every label already) under
each `--variant` (TrainConfig overrides), each from its own copy of A.
Whole iterations (both .tflite files exported), timed, with their stage
times; mAP@0.5 of the float .tflite on the test split. A's own row
("start") shows what a warm start adds to it.

  .venv/bin/python benchmarks/warm_start.py --datasets raccoon bccd --seeds 2 \\
      --variant 'warm, views made afresh:views.carry_over=false' --variant 'warm:'

`--datasets` takes the shared data sets and `generalization.py`'s synthetic
ones (crowd, small, ...); `--seed-from 6 --seeds 6` adds subsets 6-11 to
those the last results hold.

Results: benchmarks/results/warm_start.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from active_learning import MODEL_DIR, Dataset
import result_files
from generalization import dataset_folder, last_results, parse_variant, set_up_logging

from model import pipeline
from model.config import TrainConfig
from model.evaluate import evaluate_run

log = logging.getLogger('warm_start')


def iteration(dataset: Dataset, labeled: set, previous, overrides: dict, seed: int, work: Path):
  out = Path(tempfile.mkdtemp(dir=work)) / 'run'
  started, published = time.monotonic(), []
  run = pipeline.train_iteration(dataset.tasks_for(labeled), dataset.root, out, MODEL_DIR,
                                 previous=previous,
                                 config=TrainConfig(seed=seed).with_overrides(overrides),
                                 on_published=lambda _: published.append(time.monotonic()))
  seconds = time.monotonic() - started
  metrics = json.loads(run.metrics.read_text())
  return run, {'map50': round(evaluate_run(run.root, *dataset.test, 'float')['map50'], 4),
               'seconds': round(seconds, 1), 'steps': metrics['steps'],
               'published_s': round(published[0] - started, 1),
               'stages': {k.removesuffix('_s'): v for k, v in metrics['wall_time_s'].items()
                          if k in STAGES}}


STAGES = ('make_views_s', 'train_s', 'export_s')


def one_subset(dataset: Dataset, variants, seed: int, work: Path, first_images: int = 5) -> dict:
  """The rows of one subset; its run folders go when it is done (each holds a views.npz)."""
  with tempfile.TemporaryDirectory(dir=work) as folder:
    return _subset_rows(dataset, variants, seed, Path(folder), first_images)


def _subset_rows(dataset: Dataset, variants, seed: int, work: Path, first_images: int) -> dict:
  ten = random.Random(seed).sample(dataset.pool, 10)
  first, start = iteration(dataset, set(ten[:first_images]), None, {}, seed, work)
  # The start's own score tells what a warm start adds to it, not only how it compares.
  rows = {f'start ({first_images} images)': start,
          'fresh': iteration(dataset, set(ten), None, {}, seed, work)[1]}
  for name, overrides in variants:  # each from its own copy: the next run takes A's views
    previous = Path(tempfile.mkdtemp(dir=work)) / 'previous'
    shutil.copytree(first.root, previous)
    rows[name] = iteration(dataset, set(ten), previous, overrides, seed, work)[1]
  log.info('seed %d: %s', seed, rows)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--datasets', nargs='+', default=['raccoon', 'bccd'])
  parser.add_argument('--seeds', type=int, default=2)
  parser.add_argument('--seed-from', type=int, default=0,
                      help='the first subset; from 1 on, the subsets join those of the last results')
  parser.add_argument('--first', type=int, default=5,
                      help='images of the first iteration, of the 10 (rows "<data set>, <first> first")')
  parser.add_argument('--variant', action='append', default=[],
                      help='name:key=value,... (TrainConfig overrides for the warm starts)')
  parser.add_argument('--work', type=Path, default=Path(tempfile.gettempdir()) / 'warm_start')
  args = parser.parse_args()
  set_up_logging()
  variants = [parse_variant(v) for v in args.variant] or [('warm', {})]
  args.work.mkdir(parents=True, exist_ok=True)
  results = last_results('warm_start')
  for name in args.datasets:
    dataset = Dataset(dataset_folder(name, args.work))
    key = name if args.first == 5 else f'{name}, {args.first} first'
    earlier = results['datasets'].get(key, [])[:args.seed_from]
    results['datasets'][key] = earlier + [
        one_subset(dataset, variants, seed, args.work, args.first)
        for seed in range(args.seed_from, args.seed_from + args.seeds)]
    write(results)
  print((result_files.RESULTS / 'warm_start.md').read_text())


def write(results: dict) -> None:
  lines = ['# Warm starts: 10 images from the base vs from an iteration on 5 (or --first) of them', '',
           f'{os.cpu_count()} cores; whole iterations, both .tflite files. Mean over subsets; '
           'mAP@0.5 of the float .tflite on the test split. "published": until the version '
           'serves (the report and the views follow). `benchmarks/warm_start.py` writes this.',
           '', '| data set | start | subsets | steps | mAP@0.5 | seconds | time vs fresh | '
           'published s | published vs fresh | views s | train s | export s |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|']
  for name, subsets in results['datasets'].items():
    fresh = {k: _mean(subsets, 'fresh', k) for k in ('seconds', 'published_s')}
    for start in subsets[0]:
      mean = {k: _mean(subsets, start, k) for k in ('map50', 'seconds', 'steps', 'published_s')}
      stages = [statistics.mean(s[start].get('stages', {}).get(k.removesuffix('_s'), 0)
                                for s in subsets) for k in STAGES]
      published = (f'{mean["published_s"]:.1f} | {mean["published_s"] / fresh["published_s"]:.2f}'
                   if mean['published_s'] and fresh['published_s'] else ' | ')
      lines.append(f'| {name} | {start} | {len(subsets)} | {mean["steps"]:.0f} | '
                   f'{mean["map50"]:.3f} | {mean["seconds"]:.0f} | '
                   f'{mean["seconds"] / fresh["seconds"]:.2f} | {published} | '
                   + ' | '.join(f'{v:.1f}' for v in stages) + ' |')
  result_files.write_json('warm_start', results)
  result_files.write_markdown('warm_start', lines)

def _mean(subsets: list[dict], start: str, key: str) -> float | None:
  """The mean of a row's `key` over the subsets; None where one lacks it (an older result)."""
  values = [s[start].get(key) for s in subsets]
  return statistics.mean(values) if None not in values else None


if __name__ == '__main__':
  main()
