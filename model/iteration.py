"""One trained iteration: from Label Studio tasks to a run folder on disk.

A run folder holds everything a user or the backend needs:

  model.tflite        float32 input in [-1, 1], post-processing inside
  model_int8.tflite   full-integer, uint8 input, float outputs
  labels.txt          real labels, one per line, in class-id order
  metrics.json        losses per step, wall time, images/s, evaluation, mAP history
  report.png          loss curve, mAP per iteration, a few detections
  run.json            labels, input size, where it started from, settings
  ckpt.index, ckpt.data-*   the three named parts, for the next iteration

It is written to a temporary folder beside the target and renamed into place,
so a crash or kill leaves no half iteration.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from model import tasks as tasks_lib
from model.config import ExportConfig, PostprocessConfig, SSDConfig, TrainConfig
from model.detector import read_labels_file
from model.images import ImageError, load_image
from model.report import write_report

log = logging.getLogger(__name__)

BACKGROUND = '__background__'


class RunError(RuntimeError):
  """An iteration that cannot be trained or a run folder that cannot be read."""


@dataclasses.dataclass(frozen=True)
class RunPaths:
  """The files of a run folder."""

  root: Path

  @property
  def checkpoint_prefix(self) -> Path:
    return self.root / 'ckpt'

  @property
  def labels(self) -> Path:
    return self.root / 'labels.txt'

  @property
  def metrics(self) -> Path:
    return self.root / 'metrics.json'

  @property
  def run_info(self) -> Path:
    return self.root / 'run.json'

  def tflite(self, kind: str) -> Path:
    return self.root / ('model_int8.tflite' if kind == 'int8' else 'model.tflite')


def read_run(run_dir: Path) -> tuple[RunPaths, list[str], dict]:
  """Paths, labels and run.json of a finished run folder.

  Raises:
    RunError: when the folder is not a complete run.
  """
  paths = RunPaths(Path(run_dir))
  if not paths.run_info.is_file() or not paths.labels.is_file():
    raise RunError(f'{run_dir} is not a finished run folder (no run.json / labels.txt)')
  return paths, read_labels_file(paths.labels), json.loads(paths.run_info.read_text())


def load_run_model(run_dir: Path):
  """The run's tf_keras SSD with all three parts restored, and its labels."""
  from model import ssd as ssd_lib
  paths, labels, info = read_run(run_dir)
  model = ssd_lib.build_ssd(SSDConfig(num_classes=len(labels), input_size=info['input_size']))
  try:
    ssd_lib.checkpoint_for(model).read(str(paths.checkpoint_prefix)).assert_consumed()
  except Exception as error:  # TF raises several types for a bad checkpoint
    raise RunError(f'{run_dir}: checkpoint unreadable ({type(error).__name__}: '
                   f'{str(error)[:200]})') from error
  return model, labels


def _load_images(examples, images_root):
  """Decodes each example's image; unreadable ones are logged and left out."""
  kept, images = [], []
  for example in examples:
    try:
      images.append(load_image(tasks_lib.resolve_image(example, images_root)))
      kept.append(example)
    except ImageError as error:
      log.warning('Task %s skipped: %s', example.task_id, error)
  return kept, images


def _ordered_labels(examples, previous_labels):
  """Labels of this iteration: kept ones in their previous order, then new ones."""
  present = tasks_lib.label_set(examples)
  kept = [label for label in previous_labels or [] if label in present]
  return kept + [label for label in present if label not in kept]


def train_iteration(tasks: list, images_root: Path, out_dir: Path, model_dir: Path, *,
                    previous: Path | None = None, config: TrainConfig = TrainConfig(),
                    export_config: ExportConfig = ExportConfig(), max_images: int | None = None,
                    progress=None, export_kinds: tuple[str, ...] = ('float', 'int8')) -> RunPaths:
  """Trains one iteration on the tasks' training split and publishes it at `out_dir`.

  Raises:
    RunError: out_dir exists, no usable training images or boxes, bad previous run.
    tasks_lib.TaskError: malformed tasks.
  """
  import tensorflow as tf
  from model import anchors as anchors_lib
  from model import augment, base_weights, export, optimize, restore, ssd as ssd_lib
  from model.evaluate import coco_map
  from model.targets import TargetAssigner
  from model.tf_detector import TFDetector
  from model.train import CachedViews, ExtractorSplit, Trainer, cache_features

  out_dir = Path(out_dir)
  if out_dir.exists():
    raise RunError(f'{out_dir} already exists: each iteration gets a new folder')
  started = time.monotonic()
  timings = {}
  tf.random.set_seed(config.seed)
  rng = np.random.default_rng(config.seed)

  examples, stats = tasks_lib.parse_tasks(tasks)
  log.info('Tasks: %s', stats.summary())
  train_examples = tasks_lib.training_examples(examples)
  if max_images is not None and max_images < len(train_examples):
    order = rng.permutation(len(train_examples))[:max_images]
    train_examples = [train_examples[i] for i in sorted(order)]
  train_examples, train_images = _load_images(train_examples, images_root)
  if not train_examples:
    raise RunError('no readable labeled training images (split "train" or none)')

  previous_labels, previous_model = None, None
  if previous is not None:
    previous_model, previous_labels = load_run_model(previous)
  labels = _ordered_labels(train_examples, previous_labels)
  if not labels:
    raise RunError('the training tasks hold no boxes: label some objects first')
  label_ids = {label: i + 1 for i, label in enumerate(labels)}

  validation = []
  if len(train_examples) >= config.min_images_for_validation:
    count = max(2, round(config.validation_fraction * len(train_examples)))
    validation = sorted(rng.permutation(len(train_examples))[:count].tolist())
  fit = [i for i in range(len(train_examples)) if i not in set(validation)]
  log.info('Training on %d images (%d held out for early stopping), labels %s',
           len(fit), len(validation), labels)
  timings['load_s'] = time.monotonic() - started

  # Model: extractor + box head restored, class head initialized below.
  base_paths = base_weights.ensure_base(model_dir)
  base_model, base_labels = base_weights.load_base_ssd(model_dir, config.input_size)
  source = (RunPaths(Path(previous)).checkpoint_prefix if previous is not None
            else base_paths.checkpoint_prefix)
  model = restore.build_project_model(labels, config.input_size, parts_from=source,
                                      parts=config.restored_parts())

  # Views, targets, cached feature maps.
  t0 = time.monotonic()
  anchors_yxyx = anchors_lib.cycxhw_to_yxyx(anchors_lib.generate_anchors_cycxhw(model.config))
  assigner = TargetAssigner(anchors_yxyx, model.config.box_scale_factors,
                            config.positive_iou, config.negative_iou)

  split = ExtractorSplit.for_training(model.feature_extractor, config.trainable)

  def build_views(indices, views_each, zoom_outs):
    inputs, class_targets, box_targets = [], [], []
    for i in indices:
      example = train_examples[i]
      ids = np.array([label_ids[label] for label in example.labels], np.int32)
      for x, boxes, view_ids in augment.make_views(train_images[i], example.boxes, ids,
                                                   views_each, config.input_size, zoom_outs):
        cls, box = assigner.assign(boxes, view_ids)
        inputs.append(x)
        class_targets.append(cls)
        box_targets.append(box)
    inputs = np.stack(inputs)
    return inputs, CachedViews(cache_features(split.frozen, inputs),
                               np.stack(class_targets), np.stack(box_targets))

  views_each = config.views_per_image(len(fit))
  zoom_outs = config.zoom_outs_per_image(len(fit))
  train_inputs, train_views = build_views(fit, views_each, zoom_outs)
  validation_views = build_views(validation, 1, 0)[1] if validation else None
  timings['features_s'] = time.monotonic() - t0
  log.info('Cached %s of %d views (%d per image, %d of them zoomed out) in %.1f s',
           'feature maps' if split.trainable is None else 'frozen-part outputs', len(train_views),
           views_each + zoom_outs, zoom_outs, timings['features_s'])
  # View 0 of each image's views is the image as it is.
  originals = slice(0, None, views_each + zoom_outs)

  # Class head: background and kept labels from the previous iteration, new
  # labels from the base class that fits them best.
  new_labels = [l for l in labels if not previous_labels or l not in previous_labels]
  fits = {}
  if config.class_init == 'fresh':
    base_labels_for_init = []  # nothing is named, nothing fits: every column starts fresh
  else:
    base_labels_for_init = base_labels
  if base_labels_for_init and any(restore.base_class_by_name(l, base_labels) is None for l in new_labels):
    cached = [tf.constant(f[originals], tf.float32) for f in train_views.features]
    base_logits = base_model.class_head(split.feature_maps(cached)).numpy()
    fits = restore.class_fit(base_logits, train_views.class_targets[originals], labels)
  base_sources = restore.choose_base_sources(new_labels, base_model.class_head,
                                             base_labels_for_init, fits, config.class_init_blend)
  columns = restore.columns_for_labels(
      labels, previous_labels, previous_model.class_head if previous_model else None, base_sources)
  if previous_model:
    background = restore.ColumnSource(previous_model.class_head, 0, 'background')
  elif config.class_init == 'fresh':
    background = restore.ColumnSource(None, 0, 'background, fresh')
  else:
    background = restore.ColumnSource(base_model.class_head, 0, 'background')
  restore.init_class_head(model.class_head, background, columns, config.seed)
  restore.log_sources(labels, columns)

  # Train the heads.
  steps = config.step_budget(len(fit))
  learning_rate = config.class_learning_rate(len(fit), any(c.head is None for c in columns))
  box_scale = config.box_learning_rate_scale_for(len(fit))
  split.apply_optimization(config, steps, train_views)
  log.info('Training %s for up to %d steps (batch %d, learning rate %.1e, box head x%g%s)',
           {'heads': 'the heads', 'top': 'the heads and the top of the extractor',
            'all': 'everything'}[config.trainable], steps, config.batch_size, learning_rate,
           box_scale, '' if config.trainable == 'heads'
           else f', extractor x{config.extractor_learning_rate_scale:g}')
  if split.optimized:
    log.info('%s', 'Quantization-aware training' if split.optimized.kind == 'qat' else
             f'Pruning the extractor\'s trained part to {config.prune_sparsity:.0%} zeros')
  report = Trainer(model, split, config, learning_rate, box_scale).train(
      train_views, steps, validation_views, progress)
  log.info('Trained %d steps in %.1f s (%.0f views/s)%s', report.steps, report.seconds,
           report.views_per_s, ', stopped early' if report.stopped_early else '')

  evaluation = {}
  detector = TFDetector(model, [BACKGROUND, *labels], PostprocessConfig(min_score=0.01))
  if validation:
    held_out = [train_examples[i] for i in validation]
    held_images = [train_images[i] for i in validation]
    evaluation['validation'] = coco_map(held_out, held_images, detector.detect(held_images), labels)
    log.info('Validation mAP@0.5 %.3f', evaluation['validation']['map50'])
  history = []
  if previous is not None:
    history = json.loads(RunPaths(Path(previous)).metrics.read_text()).get('history', [])
  history.append({'iteration': len(history) + 1, 'images': len(fit),
                  'map50': evaluation.get('validation', {}).get('map50')})
  # A few images for the report: held-out ones when there are, else training ones.
  shown = [train_images[i] for i in (validation or fit)[:3]]
  samples = list(zip(shown, [[d for d in found if d.score >= 0.3]
                             for found in detector.detect(shown)]))

  # Publish: everything into a staging folder, then one rename.
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  staging = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.', dir=out_dir.parent))
  try:
    staged = RunPaths(staging)
    ssd_lib.checkpoint_for(model).write(str(staged.checkpoint_prefix))
    staged.labels.write_text(''.join(f'{label}\n' for label in labels))
    t0 = time.monotonic()
    original_views = train_inputs[originals][:export_config.calibration_images]
    sizes, gzipped = {}, {}
    metadata_python = export.metadata_python()
    if export_kinds and metadata_python is None:
      log.warning('No .venv-mediapipe: the .tflite files get no TFLite metadata, which '
                  "MediaPipe's ObjectDetector needs (bash scripts/setup.sh creates it)")
    # With QAT, the int8 file comes from the quantization-aware copy of what trained.
    qat_extractor = split.quantization_aware_extractor()
    int8_model = model if qat_extractor is None else ssd_lib.build_ssd(
        model.config, feature_extractor=qat_extractor, box_head=model.box_head,
        class_head=model.class_head)
    for kind in export_kinds:  # benchmarks may skip conversion; the CLI always exports both
      data = export.convert(int8_model if kind == export.INT8 else model, kind, export_config,
                            calibration=original_views)
      if metadata_python is not None:
        data = export.add_metadata(data, labels, metadata_python)
      staged.tflite(kind).write_bytes(data)
      sizes[staged.tflite(kind).name] = len(data)
      gzipped[staged.tflite(kind).name] = optimize.gzipped_size(data)
    timings['export_s'] = time.monotonic() - t0
    timings['total_s'] = time.monotonic() - started
    timings['train_s'] = report.seconds
    metrics = {
        'labels': labels,
        'images': {'train': len(fit), 'validation': len(validation), 'views': len(train_views),
                   'zoom_outs': zoom_outs * len(fit)},
        'steps': report.steps, 'planned_steps': report.planned_steps,
        'best_step': report.best_step, 'stopped_early': report.stopped_early,
        'loss_per_step': [round(v, 5) for v in report.losses],
        'validation_loss': [[s, round(v, 5)] for s, v in report.validation],
        'wall_time_s': {k: round(v, 2) for k, v in timings.items()},
        'images_per_s': round(report.views_per_s, 1),
        'learning_rate': {'class_head': learning_rate, 'box_head': learning_rate * box_scale},
        'class_head_init': {l: c.reason for l, c in zip(labels, columns)},
        'file_bytes': sizes,
        'file_bytes_gzip': gzipped,
        'optimization': {
            'quantization_aware': config.quantization_aware,
            'prune_sparsity': config.prune_sparsity,
            # zeros over the extractor's (depthwise) conv kernels, all of them
            'extractor_sparsity': round(optimize.kernel_sparsity(model.feature_extractor), 4)},
        'tflite_metadata': bool(export_kinds and metadata_python),
        'evaluation': evaluation,
        'history': history,
        'task_stats': dataclasses.asdict(stats),
    }
    staged.metrics.write_text(json.dumps(metrics, indent=1) + '\n')
    write_report(staged.root / 'report.png', report.losses, report.validation, history, samples)
    staged.run_info.write_text(json.dumps({
        'labels': labels, 'input_size': config.input_size,
        'started_from': str(previous) if previous is not None else 'base',
        'base': base_weights.PACKAGE.spec, 'seed': config.seed,
        'train_config': dataclasses.asdict(config),
        'export_config': dataclasses.asdict(export_config),
    }, indent=1) + '\n')
    staging.rename(out_dir)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  log.info('Iteration published at %s (%.1f s in all)', out_dir, time.monotonic() - started)
  return RunPaths(out_dir)
