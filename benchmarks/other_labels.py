"""How often a version names the boxes it finds by another label, on images it did
not train on: what `TrainConfig.most_from_other_label_share` reads.

For each data set and subset: a run on `--images` training images, then its
float .tflite on `--later` other training images (the images labeled next):
the boxes it finds there (a detection at the default pre-annotation threshold
over the box at IoU 0.5) and how many of them its best such detection names
by another label. From the threshold on, the next iteration trains 'most'.

  .venv/bin/python benchmarks/other_labels.py --datasets bccd crowd classes --seeds 2

`--datasets` takes the shared data sets and `generalization.py`'s synthetic ones.
Results: benchmarks/results/other_labels.{json,md}.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import tempfile
from pathlib import Path

from active_learning import MODEL_DIR, Dataset
import result_files
from generalization import dataset_folder, last_results, set_up_logging

from model import pipeline, run_folder
from model.config import TrainConfig
from model.evaluate import found_under_other_labels, tflite_detect

log = logging.getLogger('other_labels')


def one_subset(dataset: Dataset, images: int, later: int, seed: int, work: Path) -> dict:
  """The run's found and other-label counts on the later images; its folder goes after."""
  chosen = random.Random(seed).sample(dataset.pool, min(len(dataset.pool), images + later))
  config = TrainConfig(seed=seed)
  with tempfile.TemporaryDirectory(dir=work) as folder:
    run = pipeline.train_iteration(dataset.tasks_for(set(chosen[:images])), dataset.root,
                                   Path(folder) / 'run', MODEL_DIR, config=config,
                                   export_kinds=('float',))
    examples = [dataset.example(t) for t in chosen[images:]]
    pictures = [dataset.image(t) for t in chosen[images:]]
    labels = run_folder.read_labels_file(run.labels)
    other, found = found_under_other_labels(
        examples, pictures, tflite_detect(run.tflite('float'), labels)(pictures), labels,
        config.score_thresholds.default)
  boxes = sum(len(e.labels) for e in examples)
  log.info('seed %d: %d of %d found boxes under another label (%d boxes)', seed, other, found,
           boxes)
  return {'seed': seed, 'boxes': boxes, 'found': found, 'other_label': other}


def write(results: dict) -> None:
  threshold = TrainConfig().most_from_other_label_share
  lines = ['# Boxes found under another label on the images labeled next', '',
           f'{os.cpu_count()} cores. A run on the first images, its float .tflite on the next '
           'ones; "share": found boxes named by another label. `most` trains from '
           f'{threshold:.0%} on (at least {TrainConfig().most_from_found_boxes} found). '
           '`benchmarks/other_labels.py` writes this.', '',
           '| data set | images, then | subsets | boxes | found | under another label '
           '| share (per subset) | trains most |', '|---|---|---|---|---|---|---|---|']
  config = TrainConfig()
  for name, runs in results['datasets'].items():
    for setting, rows in runs.items():
      found, other = sum(r['found'] for r in rows), sum(r['other_label'] for r in rows)
      shares = ', '.join(f'{r["other_label"] / r["found"]:.2f}' if r['found'] else '-'
                         for r in rows)
      most = sum(config.choose_trainable(10, 0.0, (r['other_label'], r['found']))[0] == 'most'
                 for r in rows)
      lines.append(f'| {name} | {setting} | {len(rows)} | {sum(r["boxes"] for r in rows)} | '
                   f'{found} | {other} | {other / max(found, 1):.2f} ({shares}) | '
                   f'{most} of {len(rows)} |')
  result_files.write_json('other_labels', results)
  result_files.write_markdown('other_labels', lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--datasets', nargs='+', default=['raccoon', 'bccd', 'crowd', 'classes'])
  parser.add_argument('--seeds', type=int, default=2)
  parser.add_argument('--images', type=int, default=8, help='training images of the run')
  parser.add_argument('--later', type=int, default=16, help='images labeled next, detected')
  parser.add_argument('--work', type=Path, default=Path(tempfile.gettempdir()) / 'other_labels')
  args = parser.parse_args()
  set_up_logging()
  args.work.mkdir(parents=True, exist_ok=True)
  results = last_results('other_labels')
  for name in args.datasets:
    dataset = Dataset(dataset_folder(name, args.work))
    results['datasets'].setdefault(name, {})[f'{args.images}, {args.later}'] = [
        one_subset(dataset, args.images, args.later, seed, args.work)
        for seed in range(args.seeds)]
    write(results)
  print((result_files.RESULTS / 'other_labels.md').read_text())


if __name__ == '__main__':
  main()
