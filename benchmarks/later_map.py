"""How well an iteration's mAP on the images labeled after it tells its quality.

Under 20 images nothing is held out, so the history's only quality figure is
what the next iteration measures: the previous version's mAP@0.5 on the
images labeled since, which it never trained on (`metrics.json` history,
`later`; `pipeline.later_images`). Per subset: a version on the first K of N
training images, its mAP on the other N - K (as the next iteration would
score it), against its mAP on the test split.

  .venv/bin/python benchmarks/later_map.py --datasets raccoon bccd raccoon-shapes --seeds 3

Results: benchmarks/results/later_map.{json,md}.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import tempfile
from pathlib import Path

from generalization import add_dataset_arguments, load_dataset, set_up_logging
import result_files

from model import pipeline
from model.config import TrainConfig
from model.evaluate import evaluate_run

log = logging.getLogger('benchmark')


def one_subset(root: Path, tasks: list, test, first: int, total: int, seed: int,
               model_dir: Path, work: Path) -> dict:
  folder = Path(tempfile.mkdtemp(dir=work))
  try:
    config = TrainConfig(seed=seed)  # the same seed draws the first K among the first N
    run = pipeline.train_iteration(tasks, root, folder / 'run', model_dir, config=config,
                                   max_images=first, export_kinds=('float',))
    training = pipeline.load_examples(tasks, root, config, None, total)
    later = pipeline.later_images(training, run.root, config.score_thresholds.previous_images)
    row = {'seed': seed, 'later': later.score(),
           'test_map50': round(evaluate_run(run.root, *test, 'float')['map50'], 4)}
  finally:
    shutil.rmtree(folder)
  log.info('%d of %d images, seed %d: %s', first, total, seed, row)
  return row


def write(results: dict) -> None:
  result_files.write_json('later_map', results)
  lines = ['# A version\'s mAP@0.5 on the images labeled after it, against the test split', '',
           'Float .tflite of a version trained on the first K of N images; "later" is its mAP '
           'on the other N - K, as the next iteration records it. `benchmarks/later_map.py` '
           'writes this.', '',
           '| data set | K of N | subsets | later (per subset) | test split (per subset) | '
           'mean later - test | largest difference |', '|---|---|---|---|---|---|---|']
  for dataset, by_key in sorted(results['datasets'].items()):
    for key, rows in by_key.items():
      later = [r['later']['map50'] for r in rows]
      test = [r['test_map50'] for r in rows]
      gaps = [a - b for a, b in zip(later, test)]
      lines.append(f'| {dataset} | {key} | {len(rows)} | '
                   f'{statistics.mean(later):.3f} ({", ".join(f"{v:.2f}" for v in later)}) | '
                   f'{statistics.mean(test):.3f} ({", ".join(f"{v:.2f}" for v in test)}) | '
                   f'{statistics.mean(gaps):+.3f} | {max(gaps, key=abs):+.3f} |')
  result_files.write_markdown('later_map', lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  add_dataset_arguments(parser, ['10'])
  parser.add_argument('--first', type=int, default=5, metavar='K')
  args = parser.parse_args()
  set_up_logging()
  args.work.mkdir(parents=True, exist_ok=True)
  results = result_files.read_json('later_map', {'datasets': {}})
  for name in args.datasets:
    root, tasks, test = load_dataset(name, args.work)
    for total in map(int, args.shots):
      rows = [one_subset(root, tasks, test, args.first, total, seed, args.model_dir, args.work)
              for seed in range(args.seed_from, args.seed_from + args.seeds)]
      results['datasets'].setdefault(name, {})[f'{args.first} of {total}'] = rows
      write(results)
  print((result_files.RESULTS / 'later_map.md').read_text())


if __name__ == '__main__':
  main()
