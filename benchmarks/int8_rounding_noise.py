"""How much of an int8 file's mAP is rounding luck?

Trains once per data set and subset, exports the float file, calibrates it
once (`export.calibrate`), then quantizes it as it is and with every recorded
range scaled by 1 + u, u uniform in +-`--jitter` (1e-5: far below anything
calibration could tell apart), several times. The spread of those int8 mAPs
is the noise any comparison of int8 settings on that data set has to beat.

  .venv/bin/python benchmarks/int8_rounding_noise.py --datasets small crowd --shots 10 --seeds 2

Results: benchmarks/results/int8_rounding_noise.{json,md}.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.generalization import (  # noqa: E402
    ALL, add_dataset_arguments, load_dataset, seeds_for, set_up_logging, subset_count)
import result_files  # noqa: E402
from model import export, pipeline  # noqa: E402
from model.config import ExportConfig, TrainConfig  # noqa: E402
from model.evaluate import coco_map  # noqa: E402

log = logging.getLogger('int8_rounding_noise')


def jittered(calibrated: bytes, jitter: float, seed: int) -> bytes:
  """The calibrated float file with each recorded range scaled by 1 + U(-jitter, jitter)."""
  from tensorflow.lite.tools import flatbuffer_utils
  model = flatbuffer_utils.convert_bytearray_to_object(bytearray(calibrated))
  rng = np.random.default_rng(seed)
  for tensor in model.subgraphs[0].tensors:
    if tensor.quantization is not None and tensor.quantization.min is not None:
      scale = 1 + jitter * rng.uniform(-1, 1)
      tensor.quantization.min = [float(tensor.quantization.min[0]) * scale]
      tensor.quantization.max = [float(tensor.quantization.max[0]) * scale]
  return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def int8_map(calibrated: bytes, labels: list[str], test, work: Path) -> float:
  import tensorflow as tf
  from tensorflow.lite.python.convert import mlir_quantize
  from model.tflite_detector import TFLiteDetector
  path = Path(tempfile.mkdtemp(dir=work)) / 'int8.tflite'
  path.write_bytes(mlir_quantize(calibrated, input_data_type=tf.uint8, output_data_type=tf.float32))
  detector = TFLiteDetector(path, labels)
  return coco_map(*test, [detector.detect(image, 0.01) for image in test[1]], labels)['map50']


def one_subset(tasks, root: Path, args, shots, seed: int, test) -> dict:
  from model.tflite_detector import TFLiteDetector
  fitted = pipeline.fit(tasks, root, args.model_dir, pipeline.Stopwatch(),
                        config=TrainConfig(seed=seed), max_images=None if shots == ALL else shots)
  labels = fitted.training.labels
  float_file = pipeline.export_model(fitted.model, fitted.views, labels, ExportConfig(),
                                     (export.FLOAT,))[export.FLOAT]
  path = Path(tempfile.mkdtemp(dir=args.work)) / 'float.tflite'
  path.write_bytes(float_file)
  detector = TFLiteDetector(path, labels)
  float_map = coco_map(*test, [detector.detect(image, 0.01) for image in test[1]], labels)['map50']
  inputs = pipeline.calibration_inputs(fitted.model, fitted.views, ExportConfig())
  samples = export.calibration_samples(inputs, fitted.model.config.input_size)
  calibrated = export.calibrate(float_file, samples)
  as_is = int8_map(calibrated, labels, test, args.work)
  maps = [int8_map(jittered(calibrated, args.jitter, k), labels, test, args.work)
          for k in range(args.repeats)]
  log.info('%s images, seed %d: float %.3f, int8 %.3f, jittered %s', shots, seed, float_map,
           as_is, ' '.join(f'{m:.3f}' for m in maps))
  return {'seed': seed, 'float': float_map, 'int8': as_is, 'jittered': maps}


def write(results: dict, jitter: float) -> None:
  result_files.write_json('int8_rounding_noise', results)
  lines = ['# int8 rounding noise: the same calibrated model, ranges scaled by 1 +- ' f'{jitter:g}',
           '', f'{os.cpu_count()} cores. mAP@0.5 on the test split per subset: float, int8 as '
           'calibrated, and int8 from the jittered ranges (min-max over the repeats). '
           '`benchmarks/int8_rounding_noise.py` writes this.', '',
           '| data set | images | seed | float | int8 | jittered int8 (min - max) '
           '| jittered mean |',
           '|---|---|---|---|---|---|---|']
  for dataset, by_shots in results.items():
    for shots, rows in by_shots.items():
      for r in rows:
        lines.append(f'| {dataset} | {shots} | {r["seed"]} | {r["float"]:.3f} | {r["int8"]:.3f} | '
                     f'{min(r["jittered"]):.3f} - {max(r["jittered"]):.3f} | '
                     f'{statistics.mean(r["jittered"]):.3f} |')
  result_files.write_markdown('int8_rounding_noise', lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  add_dataset_arguments(parser, shots=['10'])
  parser.add_argument('--jitter', type=float, default=1e-5)
  parser.add_argument('--repeats', type=int, default=4)
  args = parser.parse_args()
  set_up_logging()
  args.work.mkdir(parents=True, exist_ok=True)
  results = {}
  for name in args.datasets:
    root, tasks, test = load_dataset(name, args.work)
    for shots in args.shots:
      count = subset_count(shots)
      seeds = seeds_for(count, args.seeds, args.all_seeds, args.seed_from)
      results.setdefault(name, {})[shots] = [one_subset(tasks, root, args, count, seed, test)
                                              for seed in seeds]
      write(results, args.jitter)
  print((result_files.RESULTS / 'int8_rounding_noise.md').read_text())


if __name__ == '__main__':
  main()
