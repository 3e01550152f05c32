"""Where an int8 file loses: the same calibrated model with one part of the network in int8.

Trains once per data set and subset, exports the float file, calibrates it
once (`export.calibrate`), then quantizes it whole and once per part with
every op outside that part left in float (`mlir_quantize(denylisted_nodes=...)`),
and scores each on the test split. A part whose row keeps the float file's
mAP costs int8 nothing; the rows need not add up to the whole.

  .venv/bin/python benchmarks/int8_parts.py --datasets small --shots 10 --seeds 2 --test-images 200

Data sets as in generalization.py; `--test-images` sizes the synthetic sets'
test split (20 images swing int8 mAP@0.5 by several points).
Results: benchmarks/results/int8_parts.{json,md}; rows not run again keep theirs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import re
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.generalization import (  # noqa: E402
    ALL, add_dataset_arguments, add_test_images_argument, load_dataset, seeds_for,
    set_up_logging, subset_count)
import result_files  # noqa: E402
from model import export, pipeline  # noqa: E402
from model.config import ExportConfig, TrainConfig  # noqa: E402
from model.evaluate import coco_map  # noqa: E402

log = logging.getLogger('int8_parts')
# Parts by the names of the ops' outputs in the float file (Keras layer names).
PARTS = {
    'the heads': r'^(?!feature_extractor/)',
    'MobileNetV2 to block 12 (frozen unless trainable=all)':
        r'^feature_extractor/(Conv_relu|expanded_conv(_([0-9]|1[0-2]))?_(?!\d))',
    'blocks 13-16, Conv_1, the extra layers': r'^feature_extractor/(expanded_conv_1[3-6]_|Conv_1|layer_19)',
}


def op_outputs(data: bytes) -> list[str]:
  """The name of each op's first output, in execution order."""
  from tensorflow.lite.tools import flatbuffer_utils
  graph = flatbuffer_utils.convert_bytearray_to_object(bytearray(data)).subgraphs[0]
  return [graph.tensors[op.outputs[0]].name.decode() for op in graph.operators]


def score(data: bytes, labels: list[str], test) -> float:
  from model.tflite_detector import TFLiteDetector
  detector = TFLiteDetector(data, labels)
  detections = [detector.detect(image, 0.01) for image in test[1]]
  with contextlib.redirect_stdout(io.StringIO()):  # pycocotools' tables
    return coco_map(*test, detections, labels)['map50']


def one_subset(tasks, root: Path, args, shots, seed: int, test) -> dict:
  import tensorflow as tf
  from tensorflow.lite.python.convert import mlir_quantize
  fitted = pipeline.fit(tasks, root, args.model_dir, pipeline.Stopwatch(),
                        config=TrainConfig(seed=seed), max_images=None if shots == ALL else shots)
  labels = fitted.training.labels
  float_file = export.export_files(fitted.model, (export.FLOAT,), labels)[export.FLOAT]
  inputs = pipeline.calibration_inputs(fitted.model, fitted.views, ExportConfig())
  calibrated = export.calibrate(float_file, export.calibration_samples(
      inputs, fitted.model.config.input_size))
  names = op_outputs(float_file)

  def int8(denied: list[str]) -> float:
    return score(mlir_quantize(calibrated, input_data_type=tf.uint8, output_data_type=tf.float32,
                               denylisted_nodes=denied), labels, test)

  row = {'seed': seed, 'float': score(float_file, labels, test), 'int8': int8([])}
  for part, pattern in PARTS.items():
    row[part] = int8([name for name in names if not re.search(pattern, name)])
  log.info('%s images, seed %d: %s', shots, seed,
           ', '.join(f'{k} {v:.3f}' for k, v in row.items() if k != 'seed'))
  return row


def write(results: dict, test_images: int) -> None:
  result_files.write_json('int8_parts', results)
  columns = ['float', 'int8', *(f'{part} in int8' for part in PARTS)]
  lines = ['# Where int8 loses: one part of the network in int8, the rest in float', '',
           f'{os.cpu_count()} cores. mAP@0.5 on the test split ({test_images} images in the '
           'synthetic sets), mean over subsets (seeds). `benchmarks/int8_parts.py` writes this.',
           '', '| data set | images | subsets | ' + ' | '.join(columns) + ' |',
           '|---|---|---|' + '---|' * len(columns)]
  for dataset, by_shots in results.items():
    for shots, rows in by_shots.items():
      means = [statistics.mean(r[k] for r in rows) for k in ['float', 'int8', *PARTS]]
      lines.append(f'| {dataset} | {shots} | {len(rows)} | '
                   + ' | '.join(f'{m:.3f}' for m in means) + ' |')
  result_files.write_markdown('int8_parts', lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  add_dataset_arguments(parser, shots=['10'])
  add_test_images_argument(parser)
  args = parser.parse_args()
  set_up_logging()
  logging.getLogger('tensorflow').setLevel(logging.ERROR)
  args.work.mkdir(parents=True, exist_ok=True)
  results = result_files.read_json('int8_parts', {})  # rows of other data sets and counts stay
  for name in args.datasets:
    root, tasks, test = load_dataset(name, args.work, args.test_images)
    for shots in args.shots:
      count = subset_count(shots)
      results.setdefault(name, {})[shots] = [
          one_subset(tasks, root, args, count, seed, test)
          for seed in seeds_for(count, args.seeds, args.all_seeds, args.seed_from)]
      write(results, args.test_images)
  print((result_files.RESULTS / 'int8_parts.md').read_text())


if __name__ == '__main__':
  main()
