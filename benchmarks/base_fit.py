"""Which base class fits each label, and whether it finds it, per data set and subset.

For every subset a training run would draw (`--shots`, `--seeds`), the base
.tflite runs on its first training images as `choices.labels_the_base_finds`
runs it; each label's best-fitting base class (`warm_start.class_fit`: the AP of
ranking the label's anchors by the class's score) is listed with that AP, its
score on the boxes, and whether it counts as found (`warm_start.base_class_finds`
with `BudgetConfig.fitted_min_score`). A label that names a
base class is listed as named. Seconds per data set, no training.

  .venv/bin/python benchmarks/base_fit.py --datasets raccoon fruit mixed --shots 5 10 50

Results: benchmarks/results/base_fit.{json,md} (rewritten each run).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.generalization import (ALL, add_dataset_arguments,  # noqa: E402
                                       load_dataset, seeds_for, set_up_logging, subset_count)
import result_files  # noqa: E402
from model import base_weights, choices, pipeline, warm_start  # noqa: E402
from model.config import TrainConfig  # noqa: E402


def label_fits(training, model_dir: Path, config: TrainConfig) -> dict[str, dict]:
  """label -> its best base class, anchor AP, score on the boxes and whether it is found."""
  base_labels = base_weights.read_labels(base_weights.ensure_base(model_dir))
  budget = config.budget
  rows = {}
  for label in training.labels:
    if warm_start.base_class_by_name(label, base_labels) is not None:
      rows[label] = {'base_class': label, 'named': True, 'found': True}
  for label, (fit, on_boxes) in choices.base_fits(training, model_dir).items():
    if label in rows:
      continue
    best = warm_start.best_base_class(fit)
    rows[label] = {'base_class': base_labels[best], 'anchor_ap': round(float(fit[best]), 3),
                   'score': round(float(on_boxes[best]), 3),
                   'found': warm_start.base_class_finds(fit, on_boxes, budget.fitted_min_score)}
  return rows


def write(results: dict, config: TrainConfig) -> None:
  result_files.write_json('base_fit', results)
  lines = ['# Which base class fits each label', '',
           f'Found: scores {config.budget.fitted_min_score:g} or more on the boxes. '
           '`benchmarks/base_fit.py` writes this.', '',
           '| data set | images | seed | label | base class | anchor AP | score | found |',
           '|---|---|---|---|---|---|---|---|']
  for dataset, subsets in results.items():
    for subset in subsets:
      for label, row in subset['labels'].items():
        ap = 'named' if row.get('named') else f"{row['anchor_ap']:.3f}"
        score = '' if row.get('named') else f"{row['score']:.2f}"
        lines.append(f"| {dataset} | {subset['images']} | {subset['seed']} | {label} | "
                     f"{row['base_class']} | {ap} | {score} | {'yes' if row['found'] else 'no'} |")
  result_files.write_markdown('base_fit', lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  add_dataset_arguments(parser, shots=['5', '10', '50'])
  args = parser.parse_args()
  set_up_logging()
  config = TrainConfig()
  results = {}
  for name in args.datasets:
    root, tasks, _ = load_dataset(name, args.work)
    for shots in args.shots:
      count = subset_count(shots)
      for seed in seeds_for(count, args.seeds, first=args.seed_from):
        training = pipeline.load_examples(tasks, root, TrainConfig(seed=seed), None,
                                          None if count == ALL else count)
        results.setdefault(name, []).append(
            {'images': len(training.fit), 'seed': seed,
             'labels': label_fits(training, args.model_dir, config)})
  write(results, config)
  print((result_files.RESULTS / 'base_fit.md').read_text())


if __name__ == '__main__':
  main()
