"""What one train step costs for each choice of what trains, and where it goes.

Builds the SSD (3 labels) at each `--sizes` input, cuts its extractor for
each `--modes` as training does (`train.ExtractorSplit`), and times the real
train step (`train.Trainer`: the trained part and the heads, forward and
backward, the losses and Adam) on random cached views, batch 8, after a
warm-up; then the trained part's forward alone. No data set needed: the
cost of a step does not depend on the pixels.

  .venv/bin/python benchmarks/step_cost.py --sizes 300 512 --modes top upper most

Results: benchmarks/results/step_cost.{json,md} (rewritten each run).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import tensorflow as tf  # noqa: E402

import result_files  # noqa: E402
from model import ssd as ssd_lib  # noqa: E402
from model.config import TrainConfig  # noqa: E402
from model.train import ExtractorSplit, Trainer  # noqa: E402

VIEWS = 64  # cached views the batches are drawn from


def random_cache(split: ExtractorSplit, anchors: int, rng: np.random.Generator) -> tuple:
  """Cached views as training holds them: the frozen part's outputs (float16) and targets."""
  features = [tf.constant(rng.standard_normal([VIEWS, *t.shape[1:]]).astype(np.float16))
              for t in split.frozen.outputs]
  classes = tf.constant(rng.integers(-1, 4, [VIEWS, anchors]).astype(np.int32))
  boxes = tf.constant(rng.standard_normal([VIEWS, anchors, 4]).astype(np.float32))
  return features, classes, boxes


def milliseconds(call, repeats: int) -> float:
  call()
  call()  # traced and warm
  started = time.perf_counter()
  for _ in range(repeats):
    call()
  return (time.perf_counter() - started) / repeats * 1000


def measure(size: int, mode: str, repeats: int) -> dict:
  config = TrainConfig(trainable=mode).with_overrides({'input.size': size})
  model = ssd_lib.build_ssd(config.input.ssd_config(3))
  split = ExtractorSplit.for_training(model.feature_extractor, mode)
  trainer = Trainer(model, split, config)
  trainer.rates.set(1000, {'class': 1e-3, 'box': 1e-4, 'extractor': 1e-4}, 0.1)
  features, classes, boxes = random_cache(split, model.config.num_anchors(),
                                          np.random.default_rng(0))
  index = tf.constant(np.arange(config.schedule.batch_size), tf.int32)
  step_ms = milliseconds(lambda: trainer.step(index, features, classes, boxes), repeats)
  batch = [tf.cast(tf.gather(f, index), tf.float32) for f in features]
  forward = tf.function(lambda b: split.feature_maps(b, training=True))
  forward_ms = milliseconds(lambda: forward(batch), repeats)
  return {'size': size, 'mode': mode, 'batch': config.schedule.batch_size,
          'step_ms': round(step_ms, 1), 'trained_part_forward_ms': round(forward_ms, 1),
          'trained_variables': len(trainer.variables)}


def write(rows: list[dict]) -> None:
  result_files.write_json('step_cost', rows)
  lines = ['# One train step by what trains', '',
           '2 cores; the real train step on random cached views; `benchmarks/step_cost.py` '
           'writes this.', '',
           '| input | trains | batch | step ms | x upper | trained part forward ms | variables |',
           '|---|---|---|---|---|---|---|']
  upper = {r['size']: r['step_ms'] for r in rows if r['mode'] == 'upper'}
  for r in rows:
    ratio = f"{r['step_ms'] / upper[r['size']]:.2f}" if r['size'] in upper else ''
    lines.append(f"| {r['size']} | {r['mode']} | {r['batch']} | {r['step_ms']} | {ratio} | "
                 f"{r['trained_part_forward_ms'] or ''} | {r['trained_variables']} |")
  result_files.write_markdown('step_cost', lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--sizes', type=int, nargs='+', default=[300])
  parser.add_argument('--modes', nargs='+', default=['top', 'upper', 'most'])
  parser.add_argument('--repeats', type=int, default=30)
  args = parser.parse_args()
  rows = []
  for size in args.sizes:
    for mode in args.modes:
      rows.append(measure(size, mode, args.repeats))
      print(rows[-1], flush=True)
  write(rows)
  print((result_files.RESULTS / 'step_cost.md').read_text())


if __name__ == '__main__':
  main()
