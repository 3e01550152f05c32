"""Small objects vs model input size: what a larger input costs in time and gains in mAP.

At 300x300 an object under ~30 px matches almost no anchor. The SSD is fully
convolutional, so `train --input-size N` builds the same network on a larger
input (anchors follow the feature-map sizes, restored weights stay valid).
This benchmark makes a synthetic task set of small shapes (discs and squares,
14-30 px on 640x480 textured images, so 7-14 px at 300) and, for each input
size, trains on the same images, evaluates the TF model and the int8
.tflite on the same test images, and times the int8 interpreter (2 threads,
post-processing included).

  .venv/bin/python benchmarks/small_objects.py [--sizes 300 448 640] [--train-images 20]

Writes benchmarks/results/small_objects.{json,md}. Needs no ../shared data.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

from benchmarks.generalization import set_up_logging  # noqa: E402
import result_files  # noqa: E402
from model import pipeline, run_folder, tasks as tasks_lib  # noqa: E402
from model.config import TrainConfig  # noqa: E402
from model.tflite_detector import TFLiteDetector  # noqa: E402
from model.evaluate import coco_map, evaluate_run  # noqa: E402
from tests.synthetic import make_task_set  # noqa: E402

log = logging.getLogger('benchmark')
SHAPES = ('disc', 'square')


def make_dataset(folder: Path, train_images: int, test_images: int) -> list[dict]:
  small = dict(width=640, height=480, sides=(14, 31), per_image=4)
  tasks = (make_task_set(folder, train_images, SHAPES, 'train', seed=11, **small)
           + make_task_set(folder, test_images, SHAPES, 'test', seed=12, start_id=1000, **small))
  (folder / 'tasks.json').write_text(json.dumps(tasks))
  return tasks


def interpreter_ms(detector: TFLiteDetector, image, repeats: int = 30) -> float:
  tensor = detector._input_tensor(image)  # pylint: disable=protected-access
  interpreter = detector.interpreter
  times = []
  for i in range(repeats + 1):
    started = time.perf_counter()
    interpreter.set_tensor(detector.input['index'], tensor)
    interpreter.invoke()
    if i:  # the first call warms up
      times.append((time.perf_counter() - started) * 1000)
  return round(statistics.median(times), 2)


def measure(size: int, tasks, root: Path, model_dir: Path, work: Path) -> dict:
  out = work / f'run-{size}'
  started = time.monotonic()
  run = pipeline.train_iteration(tasks, root, out, model_dir, config=TrainConfig().with_overrides({'input.size': size}),
                                  export_kinds=('int8',))
  wall_s = time.monotonic() - started
  metrics = json.loads(run.metrics.read_text())
  examples, _ = tasks_lib.parse_tasks(tasks)
  test = tasks_lib.evaluation_examples(examples, tasks_lib.TEST)
  test, images = tasks_lib.load_example_images(test, root)
  labels = run_folder.read_labels_file(run.labels)
  tf_eval = evaluate_run(run.root, test, images)
  tflite = TFLiteDetector(run.tflite('int8'), labels, num_threads=2)
  int8_eval = coco_map(test, images, [tflite.detect(i, min_score=0.01) for i in images], labels)
  row = {'input_size': size, 'map50': tf_eval['map50'], 'map': tf_eval['map'],
         'int8_map50': int8_eval['map50'], 'iteration_s': round(wall_s, 1),
         'train_s': metrics['wall_time_s']['train_s'], 'features_s': metrics['wall_time_s']['make_views_s'],
         'int8_ms': interpreter_ms(tflite, images[0]),
         'int8_mb': round(run.tflite('int8').stat().st_size / 1e6, 1)}
  log.info('input %d: %s', size, row)
  return row


def write(results: dict) -> None:
  result_files.write_json('small_objects', results)
  base = results['rows'][0]
  lines = ['# Small objects vs input size', '',
           f'{results["train_images"]} training / {results["test_images"]} test synthetic 640×480 '
           f'images, {results["objects_per_image"]} shapes each of 14–30 px (7–14 px at 300); '
           f'default training (`TrainConfig`), {os.cpu_count()} cores. Ratios against '
           f'{base["input_size"]}.', '',
           '| input | mAP@0.5 (TF) | mAP@[.5:.95] | int8 mAP@0.5 | iteration s | train s | '
           'int8 ms/image | int8 MB |', '|---|---|---|---|---|---|---|---|']
  for row in results['rows']:
    lines.append(
        f'| {row["input_size"]} | {row["map50"]:.3f} | {row["map"]:.3f} | {row["int8_map50"]:.3f} | '
        f'{row["iteration_s"]} ({row["iteration_s"] / base["iteration_s"]:.1f}×) | {row["train_s"]} | '
        f'{row["int8_ms"]} ({row["int8_ms"] / base["int8_ms"]:.1f}×) | {row["int8_mb"]} |')
  result_files.write_markdown('small_objects', lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--sizes', type=int, nargs='+', default=[300, 448, 640])
  parser.add_argument('--train-images', type=int, default=20)
  parser.add_argument('--test-images', type=int, default=20)
  parser.add_argument('--model-dir', type=Path, default=Path(os.environ.get('MODEL_DIR', REPO / 'models')))
  args = parser.parse_args()
  set_up_logging()
  with tempfile.TemporaryDirectory() as work:
    work = Path(work)
    tasks = make_dataset(work / 'data', args.train_images, args.test_images)
    results = {'train_images': args.train_images, 'test_images': args.test_images,
               'objects_per_image': 4, 'rows': []}
    for size in args.sizes:
      results['rows'].append(measure(size, tasks, work / 'data', args.model_dir, work))
      write(results)
  print((result_files.RESULTS / 'small_objects.md').read_text())


if __name__ == '__main__':
  main()
