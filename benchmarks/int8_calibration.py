"""Do the .tflite files score what the TF checkpoint does, and which export settings keep them so?

Trains once per data set and subset, then exports the same trained model as
float32 and int8 once per variant (`ExportConfig` fields: calibration, the
box-encoding bound), and scores each on the test split (mAP@0.5), so columns
differ only in the export.

  .venv/bin/python benchmarks/int8_calibration.py --datasets raccoon partial \\
      --shots 1 5 --variant 'originals:calibration_views=originals' --variant 'views:'

Data sets as in generalization.py (../shared/datasets plus synthetic scenes).
Results: benchmarks/results/int8_calibration.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.generalization import (  # noqa: E402
    ALL, add_dataset_arguments, add_test_images_argument, load_dataset, parse_assignments,
    seeds_for, set_up_logging, subset_count)
import result_files  # noqa: E402
from model import export, pipeline  # noqa: E402
from model.config import ExportConfig, PostprocessConfig, TrainConfig  # noqa: E402
from model.evaluate import coco_map  # noqa: E402

log = logging.getLogger('int8_calibration')


def export_variant(text: str) -> tuple[str, dict]:
  """'name:field=value,...' -> (name, ExportConfig fields)."""
  name, fields = parse_assignments(text)
  try:
    dataclasses.replace(ExportConfig(), **fields)
  except (TypeError, ValueError) as error:
    raise SystemExit(f'--variant {text!r}: {error}') from None
  return name, fields


def one_subset(tasks, root: Path, model_dir: Path, work: Path, shots, seed: int,
               variants: list[tuple[str, dict]], kinds: tuple[str, ...], test) -> dict:
  from model.checkpoint_detector import CheckpointDetector
  from model.tflite_detector import TFLiteDetector
  clock = pipeline.Stopwatch()
  fitted = pipeline.fit(tasks, root, model_dir, clock, config=TrainConfig(seed=seed),
                        max_images=None if shots == ALL else shots)
  labels = fitted.training.labels
  checkpoint = CheckpointDetector(fitted.model, labels, PostprocessConfig(min_score=0.01))
  scores = {'checkpoint': coco_map(*test, checkpoint.detect(test[1]), labels)['map50']}
  files = {f'{name} {kind}': (dataclasses.replace(ExportConfig(), **fields), kind)
           for name, fields in variants for kind in kinds}
  for name, (config, kind) in files.items():
    path = Path(tempfile.mkdtemp(dir=work)) / f'{kind}.tflite'
    path.write_bytes(pipeline.export_model(fitted.model, fitted.views, labels, config,
                                           (kind,))[kind])
    detector = TFLiteDetector(path, labels)
    scores[name] = coco_map(*test, [detector.detect(image, 0.01) for image in test[1]],
                            labels)['map50']
  log.info('%s images, seed %d: %s', shots, seed,
           ', '.join(f'{k} {v:.3f}' for k, v in scores.items()))
  return {'seed': seed, 'images': len(fitted.training.fit),
          'views': len(fitted.views.train), **scores}


def write(results: dict, variants: list[str], test_images: int) -> None:
  result_files.write_json('int8_calibration', results)
  columns = ['checkpoint', *variants]
  lines = ['# Export fidelity: the same trained model exported with each setting', '',
           f'{os.cpu_count()} cores. mAP@0.5 on the test split ({test_images} images in the '
           'synthetic sets), mean over subsets (seeds); '
           'columns differ only in the export settings. '
           '`benchmarks/int8_calibration.py` writes this.', '',
           '| data set | images | subsets | ' + ' | '.join(columns) + ' |',
           '|---|---|---|' + '---|' * len(columns)]
  for dataset, by_shots in results.items():
    for shots, rows in by_shots.items():
      means = [statistics.mean(r[c] for r in rows) if all(c in r for r in rows) else None
               for c in columns]
      lines.append(f'| {dataset} | {shots} | {len(rows)} | ' + ' | '.join(
          '–' if m is None else f'{m:.3f}' for m in means) + ' |')
  result_files.write_markdown('int8_calibration', lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  add_dataset_arguments(parser, shots=['1', '5', '10'])
  parser.add_argument('--variant', action='append', default=[],
                      help='name:field=value,... (ExportConfig fields); default: the default')
  parser.add_argument('--kinds', nargs='+', default=[export.FLOAT, export.INT8])
  add_test_images_argument(parser)
  args = parser.parse_args()
  set_up_logging()
  variants = [export_variant(v) for v in args.variant] or [('default', {})]
  args.work.mkdir(parents=True, exist_ok=True)
  results = {}
  for name in args.datasets:
    root, tasks, test = load_dataset(name, args.work, args.test_images)
    for shots in args.shots:
      count = subset_count(shots)
      results.setdefault(name, {})[shots] = [
          one_subset(tasks, root, args.model_dir, args.work, count, seed, variants,
                     tuple(args.kinds), test)
          for seed in seeds_for(count, args.seeds, args.all_seeds, args.seed_from)]
      write(results, [f'{v} {k}' for v, _ in variants for k in args.kinds], args.test_images)
  print((result_files.RESULTS / 'int8_calibration.md').read_text())


if __name__ == '__main__':
  main()
