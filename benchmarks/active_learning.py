"""Does labeling the least certain images first beat labeling at random?

The labeling loop as the backend runs it: start from `--start` labeled
training images (the same random ones for both strategies), train an
iteration, then label `--step` more per round, each round warm-started from
the last, up to `--until`. The two strategies differ only in which images a
round adds:
  uncertainty  the lowest prediction `score` (backend.predictor.task_certainty,
               what the Data Manager's "Prediction score" column sorts by),
               from the last iteration's float .tflite on the unlabeled ones
  random       any, at random
Every round is scored by COCO mAP@0.5 of its float .tflite on the test split.

  .venv/bin/python benchmarks/active_learning.py --datasets raccoon bccd --seeds 2
  .venv/bin/python benchmarks/active_learning.py --datasets bccd --first-seed 1 --seeds 1

Results: benchmarks/results/active_learning.{json,md,png}.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from backend.predictor import UNCERTAIN_FLOOR, task_certainty  # noqa: E402
from benchmarks.generalization import last_results, set_up_logging  # noqa: E402
import result_files  # noqa: E402
from model import pipeline, run_folder, tasks as tasks_lib  # noqa: E402
from model.config import TrainConfig  # noqa: E402
from model.evaluate import evaluate_run  # noqa: E402
from model.tflite_detector import TFLiteDetector  # noqa: E402

log = logging.getLogger('active_learning')
SHARED = REPO.parent / 'shared' / 'datasets'
MODEL_DIR = Path(os.environ.get('MODEL_DIR', REPO / 'models'))
STRATEGIES = ('uncertainty', 'random')


class Dataset:
  """A task set's training pool (task ids, images) and its test split."""

  def __init__(self, root: Path):
    self.root = root
    self.tasks = tasks_lib.load_tasks_file(root / 'tasks.json')
    examples, _ = tasks_lib.parse_tasks(self.tasks)
    self.pool = sorted(e.task_id for e in tasks_lib.training_examples(examples))
    self.test = tasks_lib.load_example_images(tasks_lib.evaluation_examples(examples), root)
    self._examples = {e.task_id: e for e in examples}
    self._images = {}

  def tasks_for(self, labeled: set) -> list:
    """The labeled training tasks plus the test split (which training never uses)."""
    return [t for t in self.tasks if t['id'] in labeled
            or (t.get('meta') or {}).get('split') == tasks_lib.TEST]

  def example(self, task_id) -> tasks_lib.Example:
    return self._examples[task_id]

  def image(self, task_id):
    if task_id not in self._images:
      (image,) = tasks_lib.load_example_images([self._examples[task_id]], self.root)[1]
      self._images[task_id] = image
    return self._images[task_id]


def train_round(dataset: Dataset, labeled: set, previous, work: Path, seed: int):
  out = Path(tempfile.mkdtemp(dir=work)) / 'run'
  started = time.monotonic()
  run = pipeline.train_iteration(dataset.tasks_for(labeled), dataset.root, out, MODEL_DIR,
                                 previous=previous, config=TrainConfig(seed=seed),
                                 export_kinds=('float',))
  map50 = evaluate_run(run.root, *dataset.test, 'float')['map50']
  log.info('%d labeled: mAP@0.5 %.3f (%.0f s)', len(labeled), map50, time.monotonic() - started)
  return run, map50


def least_certain(dataset: Dataset, run, unlabeled: list, count: int, rng) -> list:
  """The `count` unlabeled images the run is least sure of (ties broken at random)."""
  _, labels, _ = run_folder.read_run(run.root)
  detector = TFLiteDetector(run.tflite('float'), labels)
  scored = [(task_certainty([d.score for d in detector.detect(dataset.image(t), UNCERTAIN_FLOOR)]),
             rng.random(), t) for t in unlabeled]
  return [t for _, _, t in sorted(scored)[:count]]


def one_seed(dataset: Dataset, args, seed: int, work: Path) -> dict:
  """mAP per round for each strategy, from the same first images; the run folders
  (each with a views.npz) go when the seed is done."""
  with tempfile.TemporaryDirectory(dir=work) as folder:
    return _seed_curves(dataset, args, seed, Path(folder))


def _seed_curves(dataset: Dataset, args, seed: int, work: Path) -> dict:
  rng = random.Random(seed)
  start = set(rng.sample(dataset.pool, args.start))
  first, first_map = train_round(dataset, start, None, work, seed)
  curves = {}
  for strategy in STRATEGIES:
    rng = random.Random(f'{seed}-{strategy}')
    labeled, run, curve = set(start), first, [first_map]
    while len(labeled) < args.until:
      unlabeled = [t for t in dataset.pool if t not in labeled]
      count = min(args.step, args.until - len(labeled))
      chosen = (least_certain(dataset, run, unlabeled, count, rng) if strategy == 'uncertainty'
                else rng.sample(unlabeled, count))
      labeled |= set(chosen)
      run, map50 = train_round(dataset, labeled, run.root, work, seed)
      curve.append(map50)
    curves[strategy] = curve
    log.info('seed %d, %s: %s', seed, strategy, ' '.join(f'{m:.3f}' for m in curve))
  return curves


def write(results: dict, args) -> None:
  result_files.write_json('active_learning', results)
  lines = ['# Active learning: uncertainty-first vs random labeling', '',
           f'{os.cpu_count()} cores. mAP@0.5 of the float .tflite on the test split after each '
           f'round (mean over seeds; each round warm-started from the last). '
           '`benchmarks/active_learning.py` writes this.']
  for name, result in results['datasets'].items():
    sizes = result['labeled']
    lines += ['', f'## {name} ({len(result["seeds"])} seeds)', '',
              '| strategy | ' + ' | '.join(f'{n} images' for n in sizes) + ' |',
              '|---|' + '---|' * len(sizes)]
    for strategy in STRATEGIES:
      means = result['mean'][strategy]
      lines.append(f'| {strategy} | ' + ' | '.join(f'{m:.3f}' for m in means) + ' |')
  result_files.write_markdown('active_learning', lines)
  _plot(results)


def _plot(results: dict) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  names = list(results['datasets'])
  figure, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
  for axis, name in zip(axes[0], names):
    result = results['datasets'][name]
    for strategy in STRATEGIES:
      axis.plot(result['labeled'], result['mean'][strategy], marker='o', label=strategy)
    axis.set(title=name, xlabel='labeled images', ylabel='mAP@0.5 (float .tflite)')
    axis.grid(alpha=0.3)
    axis.legend()
  figure.tight_layout()
  figure.savefig(result_files.RESULTS / 'active_learning.png', dpi=100)
  plt.close(figure)



def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--datasets', nargs='+', default=['raccoon', 'bccd'])
  parser.add_argument('--seeds', type=int, default=2)
  parser.add_argument('--first-seed', type=int, default=0,
                      help='above 0: adds seeds from this one to those a data set has')
  parser.add_argument('--start', type=int, default=5)
  parser.add_argument('--step', type=int, default=5)
  parser.add_argument('--until', type=int, default=25)
  parser.add_argument('--work', type=Path, default=Path(tempfile.gettempdir()) / 'active_learning')
  args = parser.parse_args()
  set_up_logging()
  args.work.mkdir(parents=True, exist_ok=True)
  results = last_results('active_learning')
  for name in args.datasets:
    dataset = Dataset(SHARED / name)
    seeds = [one_seed(dataset, args, seed, args.work)
             for seed in range(args.first_seed, args.first_seed + args.seeds)]
    if args.first_seed:
      seeds = results['datasets'][name]['seeds'][:args.first_seed] + seeds
    sizes = list(range(args.start, args.until + 1, args.step))
    if sizes[-1] != args.until:
      sizes.append(args.until)
    results['datasets'][name] = {
        'labeled': sizes, 'seeds': seeds,
        'mean': {s: [round(statistics.mean(c[s][i] for c in seeds), 4) for i in range(len(sizes))]
                 for s in STRATEGIES}}
    write(results, args)
  print((result_files.RESULTS / 'active_learning.md').read_text())


if __name__ == '__main__':
  main()
