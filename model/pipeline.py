"""One training iteration, as a short pipeline of named stages.

  load_examples      Label Studio tasks -> training images, labels, held-out split;
                     the previous version's detections on the images labeled since
                     (`later_images`), the labels a base class finds
                     (`choices.labels_the_base_finds`), and the choices the data
                     makes (`choices.choose_settings`)
  build_model        the SSD with extractor + box head restored from the base or
                     the previous iteration (`warm_start`), into the last
                     iteration's model where it fits (`model_pool`)
  make_views         augmented views, anchor targets, cached frozen part (`views`)
  start_class_head   each label's column from the previous run, a fitting base
                     class, or fresh (`warm_start`)
  train_model        the heads and the top of the extractor on the cache (`train`)
  export_model       float32 and int8 .tflite with post-processing (`export`)
  evaluate_model     mAP on the held-out images, detections for the report (of
                     the float .tflite when it was exported; the int8 file's too)
  tune_int8          a quantization-aware tail for the int8 file where it loses
                     to the float one on the held-out images (`int8_tune`)
  publish            what serves the version and starts the next one into a run
                     folder, renamed into place (`run_folder`); the views, the
                     report and a .tflite made later follow it (`add_followers`)

`train_iteration` calls them in that order: `fit` the first five (a trained
model, for benchmarks that export it several ways), then the last four. An
int8 file made after publishing (`export_later`) gets no tail.
Each stage's wall time goes to metrics.json (`wall_time_s`) and to the log.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from model import choices as choices_lib
from model import run_folder
from model import tasks as tasks_lib
from model.config import (AnchorConfig, BudgetConfig, ExportConfig, ScoreThresholdConfig,
                          TrainConfig)
from model.run_folder import RunError, RunPaths

log = logging.getLogger(__name__)


class Stopwatch:
  """Wall time per stage, logged as each stage ends; `on_stage(name)` as each begins."""

  def __init__(self, on_stage=None):
    self.started = time.monotonic()
    self.seconds: dict[str, float] = {}
    self.on_stage = on_stage

  @contextlib.contextmanager
  def stage(self, name: str):
    log.info('Stage %s ...', name)
    if self.on_stage is not None:
      self.on_stage(name)
    t0 = time.monotonic()
    yield
    self.seconds[name] = time.monotonic() - t0
    log.info('Stage %s done in %.1f s', name, self.seconds[name])

  def total(self) -> float:
    return time.monotonic() - self.started


@dataclasses.dataclass
class TrainingSet:
  """The images an iteration learns from.

  Attributes:
    examples, images: aligned; every readable labeled training image.
    labels: this iteration's labels in class-id order (id = index + 1).
    fit, validation: indices into `examples`: the images that train and the
      held-out ones (early stopping, validation mAP; empty under
      `EarlyStoppingConfig.min_images` images, or when that is None).
  """

  examples: list[tasks_lib.Example]
  images: list[Image.Image]
  labels: list[str]
  fit: list[int]
  validation: list[int]
  stats: tasks_lib.ParseStats

  @property
  def label_ids(self) -> dict[str, int]:
    return {label: i + 1 for i, label in enumerate(self.labels)}

  def part(self, indices: list[int]):
    """(examples, images) at `indices`."""
    return [self.examples[i] for i in indices], [self.images[i] for i in indices]


def ordered_labels(examples, previous_labels: list[str] | None) -> list[str]:
  """Labels of this iteration: kept ones in their previous order, then new ones."""
  present = tasks_lib.label_set(examples)
  kept = [label for label in previous_labels or [] if label in present]
  return kept + [label for label in present if label not in kept]


def load_examples(tasks: list, images_root: Path, config: TrainConfig,
                  previous_labels: list[str] | None = None,
                  max_images: int | None = None, subset_seed: int | None = None
                  ) -> TrainingSet:
  """Parses the tasks, decodes the training images (`max_images` of them, a
  subset drawn by `subset_seed`, None: by `config.seed`) and holds some out.

  Raises:
    RunError: no readable labeled training image, or no boxes.
    tasks_lib.TaskError: malformed tasks.
  """
  rng = np.random.default_rng(config.seed)
  examples, stats = tasks_lib.parse_tasks(tasks)
  log.info('Tasks: %s', stats.summary())
  train_examples = tasks_lib.training_examples(examples)
  if max_images is not None and max_images < len(train_examples):
    draw = rng if subset_seed is None else np.random.default_rng(subset_seed)
    order = draw.permutation(len(train_examples))[:max_images]
    train_examples = [train_examples[i] for i in sorted(order)]
  train_examples, images = tasks_lib.load_example_images(
      train_examples, images_root, max_side=config.max_image_side())
  if not train_examples:
    raise RunError('no readable labeled training images (split "train" or none)')
  labels = ordered_labels(train_examples, previous_labels)
  if not labels:
    raise RunError('the training tasks hold no boxes: label some objects first')
  validation = []
  stopping = config.early_stopping
  if stopping.min_images is not None and len(train_examples) >= stopping.min_images:
    count = round(stopping.validation_fraction * len(train_examples))
    if stopping.max_validation_images is not None:
      count = min(count, stopping.max_validation_images)
    count = max(2, count)
    validation = sorted(rng.permutation(len(train_examples))[:count].tolist())
  fit = [i for i in range(len(train_examples)) if i not in set(validation)]
  log.info('Training on %d images (%d held out for early stopping), labels %s',
           len(fit), len(validation), labels)
  return TrainingSet(train_examples, images, labels, fit, validation, stats)


@dataclasses.dataclass
class Sources:
  """What a new model starts from: the base, and the previous iteration if any."""

  base_class_head: object
  base_labels: list[str]
  checkpoint: Path  # the extractor and box head come from here
  anchors: AnchorConfig  # those the checkpoint's box head was trained with
  previous_class_head: object = None
  previous_labels: list[str] | None = None

  def head_sources(self):
    from model import warm_start
    return warm_start.HeadSources(self.base_class_head, self.base_labels,
                                  self.previous_class_head, self.previous_labels)


def load_sources(model_dir: Path, previous: Path | None) -> Sources:
  """The base's class head (the base converted once per model directory), the
  previous run's, and the checkpoint the rest of the model comes from.

  Raises:
    RunError: a previous run folder that cannot be read.
  """
  from model import base_weights
  base_paths = base_weights.ensure_base(model_dir)
  base_head, base_labels = base_weights.load_base_class_head(model_dir)
  if previous is None:
    return Sources(base_head, base_labels, base_paths.checkpoint_prefix, AnchorConfig())
  previous_head, previous_labels, previous_config = run_folder.load_run_class_head(previous)
  return Sources(base_head, base_labels, RunPaths(Path(previous)).checkpoint_prefix,
                 previous_config.anchors, previous_head, previous_labels)


def build_model(labels: list[str], sources: Sources, config: TrainConfig):
  """The project's SSD (extractor + box head restored, class head left for
  `start_class_head`), its extractor split and trainer, as a `model_pool.Built`:
  the last iteration's of the same shape with the weights restored into it, else new."""
  from model import model_pool, warm_start
  from model.train import ExtractorSplit, Trainer
  ssd_config = config.input.ssd_config(len(labels))
  restore = dict(parts_from=sources.checkpoint, parts=config.warm_start.restored_parts(),
                 source_anchors=sources.anchors)
  key = model_pool.key(ssd_config, config)
  built = model_pool.take(key)
  if built is not None:
    warm_start.restore_project_model(built.model, **restore)
    built.trainer.reset(config)
    log.info('Reusing the model built for the last iteration (built and traced already)')
    return built
  model = warm_start.build_project_model(ssd_config, **restore)
  split = ExtractorSplit.for_training(model.feature_extractor, config.trainable)
  # Quantization-aware or pruned training wraps what trains once the views are there.
  trainer = None if config.compression.active else Trainer(model, split, config)
  return model_pool.Built(key, model, split, trainer)


@dataclasses.dataclass
class Views:
  """The training data as training sees it.

  Attributes:
    split: how the extractor is cut into a cached frozen part and what trains.
    train_pixels: uint8 pixels of the training views (int8 calibration, the next iteration).
    train, validation: the cached views (validation: originals only, or None).
    signature, fingerprints: the settings the views were made under and each
      training image's name (`views.StoredViews`, for the next iteration).
  """

  split: object
  train_pixels: np.ndarray
  train: object
  validation: object | None
  zoom_outs_per_image: int = 0
  signature: str = ''
  fingerprints: list[str] = dataclasses.field(default_factory=list)

  def cached_peaks(self, indices: np.ndarray) -> np.ndarray | None:
    """Peaks of the extractor's unbounded activations on these training views, where
    caching measured every one of them (none trains), else None."""
    from model.export import unbounded_outputs
    if self.train.peaks is None or (self.split.trainable is not None
                                    and unbounded_outputs(self.split.trainable)):
      return None
    return self.train.peaks[indices]

  def stored(self, labels: list[str], max_views: int):
    """The training views and the frozen part's outputs as a run folder keeps them,
    or None when there are more than `max_views`."""
    from model.views import StoredViews, frozen_signature
    if len(self.train) > max_views:
      return None
    zoom_outs = self.zoom_outs_per_image
    return StoredViews(self.signature, labels, self.train.per_image - zoom_outs, zoom_outs,
                       self.fingerprints, self.train_pixels,
                       self.train.class_targets, self.train.box_targets,
                       frozen_signature(self.split.frozen), self.train.features, self.train.peaks)


def make_views(model, split, training: TrainingSet, config: TrainConfig,
               previous: Path | None = None) -> Views:
  """Augments each training image, assigns anchor targets, caches the frozen part.

  Images whose views the previous iteration kept (`ViewsConfig.carry_over`)
  take them from there.
  """
  from model import anchors as anchors_lib, views as views_lib
  from model.targets import shared_assigner
  matching = config.matching
  assigner = shared_assigner(anchors_lib.anchors_yxyx(model.config),
                             model.config.box_scale_factors, matching.positive_iou,
                             matching.negative_iou,
                             0 if matching.adaptive_views == 'none' else matching.adaptive_top_k,
                             matching.adaptive_views)
  label_ids = training.label_ids
  images = len(training.fit)
  views_each = config.views.per_image(images)
  zoom_outs = config.views.zoom_outs_per_image(images)
  crop_scale = config.views.crop_scale(images)
  signature = views_lib.signature(assigner, config.input.size, config.views, crop_scale)
  fingerprints, reuse = [], None  # hashing every image is for carrying views over only
  if config.views.carry_over:
    fingerprints = [views_lib.fingerprint(*pair) for pair in zip(*training.part(training.fit))]
  if config.views.carry_over and previous is not None:
    reuse = views_lib.StoredViews.load(RunPaths(previous).views)
    reuse = reuse if reuse is not None and reuse.signature == signature else None

  def cached(indices, each, zoom, **stored):
    return views_lib.make_cached_views(
        *training.part(indices), label_ids, assigner, split.frozen, views_each=each,
        zoom_outs=zoom, input_size=config.input.size, crop_min_scale=crop_scale,
        shrink=config.views, **stored)

  train_pixels, train = cached(training.fit, views_each, zoom_outs, reuse=reuse,
                               fingerprints=fingerprints)
  validation = cached(training.validation, 1, 0)[1] if training.validation else None
  log.info('Cached %s of %d views (%d per image, %d of them shrunk: %.0f%% mosaics where no box '
           'spans over %g of its image, else zoom-outs)',
           'feature maps' if split.trainable is None else 'frozen-part outputs', len(train),
           views_each + zoom_outs, zoom_outs, 100 * config.views.mosaic,
           config.views.mosaic_max_side)
  return Views(split, train_pixels, train, validation, zoom_outs, signature, fingerprints)


def start_class_head(model, labels: list[str], sources: Sources, views: Views,
                     config: TrainConfig) -> list:
  """Each label's class column from the previous run, a fitting base class, or fresh."""
  import tensorflow as tf
  from model import warm_start

  def fit_data():  # the base head's logits on each training image as it is
    originals = views.train.originals
    cached = [tf.constant(f[originals], tf.float32) for f in views.train.features]
    logits = sources.base_class_head(views.split.feature_maps(cached)).numpy()
    return logits, views.train.class_targets[originals]

  return warm_start.start_class_head(model.class_head, labels, sources.head_sources(),
                                     config=config.warm_start, seed=config.seed,
                                     fit_data=fit_data)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """How long and how fast an iteration trains, as chosen from the data."""

  steps: int
  class_learning_rate: float
  box_learning_rate_scale: float
  steps_why: str = 'step budget for the images'
  heads_only_steps: int = 0  # the last steps, which train the heads alone
  heads_only_why: str = ''
  heads_first_steps: int = 0  # the first steps, which train the heads alone
  heads_first_why: str = ''


def plan_schedule(num_images: int, columns: list, config: TrainConfig, views: Views,
                  previous: Path | None = None) -> Schedule:
  """Steps and learning rates; a warm start that knows every label already trains
  less, the less of its images are new, unless more of the extractor trains now
  than in the `previous` iteration."""
  from model.config import TRAINABLE
  from model.train import heads_first_steps, heads_only_steps
  fresh = any(c.head is None for c in columns)
  before = run_folder.read_trainable(previous) if previous is not None else None
  grown = (f'{before} -> {config.trainable}' if before in TRAINABLE
           and TRAINABLE.index(config.trainable) > TRAINABLE.index(before) else None)
  steps, why = plan_steps(num_images, columns, fresh, config.budget, views.train.new_share(),
                          grown)
  return Schedule(steps,
                  config.class_learning_rate(num_images, fresh),
                  config.box_learning_rate_scale(num_images), why,
                  *heads_only_steps(views.split, len(views.train), steps, config),
                  *heads_first_steps(views.split, len(views.train), steps, config, fresh))


def plan_steps(num_images: int, columns: list, fresh: bool, budget: BudgetConfig,
               new_share: float, grown: str | None = None) -> tuple[int, str]:
  """The run's steps and why: a warm start's share of the budget (the whole of it
  where what trains `grown` since its previous iteration), more where a class
  column starts `fresh`, less where every one starts from a good fit."""
  from model.warm_start import KEPT
  plain, why = budget.steps(num_images), 'step budget for the images'
  if all(c.reason == KEPT for c in columns) and grown:
    return plain, (f'{why}: the previous iteration knows every label, but more of the '
                   f'extractor trains now ({grown})')
  if all(c.reason == KEPT for c in columns):
    return budget.steps(num_images, True, new_share), (
        f'{why}, x{budget.warm_share(new_share):g}: the previous iteration knows every '
        f'label and {new_share:.0%} of the images are new')
  if fresh:
    steps = budget.steps(num_images, fresh_column=True)
    return steps, why if steps == plain else (
        f'{why}, at least x{budget.fresh_factor:g} the first images\' budget: a class '
        'column starts fresh')
  if any(c.score is not None and c.score < budget.fitted_min_score for c in columns):
    return plain, (f'{why}: a class column\'s base class scores under '
                   f'{budget.fitted_min_score:g} on its boxes, a weak start')
  steps = budget.steps(num_images, fitted_columns=True)
  return steps, why if steps == plain else (
      f'{why}, x{budget.fitted_factor:g} the first images\' budget: every class column '
      'starts from a fitted one, which finds the boxes already')


def train_model(model, views: Views, schedule: Schedule, config: TrainConfig, progress=None,
                trainer=None):
  """Trains what `views.split` leaves trainable; returns the `train.TrainReport`.

  `trainer`: a `train.Trainer` made (and maybe traced) beforehand, else one is made here.
  """
  from model.train import Trainer
  if trainer is None:
    views.split.apply_optimization(config, schedule.steps, views.train)
    trainer = Trainer(model, views.split, config)
  log.info('Training %s for up to %d steps (batch %d, learning rate %.1e, box head x%g%s)',
           {'heads': 'the heads', 'top': 'the heads and the top of the extractor',
            'upper': 'the heads and the extractor from its stride-16 blocks up',
            'most': 'the heads and the extractor above its stride-8 stem',
            'all': 'everything'}[config.trainable], schedule.steps, config.schedule.batch_size,
           schedule.class_learning_rate, schedule.box_learning_rate_scale,
           '' if config.trainable == 'heads'
           else f', extractor x{config.schedule.extractor_scale:g}')
  if views.split.optimized:
    log.info('%s', 'Quantization-aware training' if views.split.optimized.kind == 'qat' else
             f'Pruning the extractor\'s trained part to {config.compression.prune_sparsity:.0%} zeros')
  if schedule.heads_first_steps:
    log.info('The first %d steps train the heads alone: %s', schedule.heads_first_steps,
             schedule.heads_first_why)
  if schedule.heads_only_steps:
    log.info('The last %d steps train the heads alone: %s', schedule.heads_only_steps,
             schedule.heads_only_why)
  report = trainer.train(views.train, schedule.steps, schedule.class_learning_rate,
                         schedule.box_learning_rate_scale, views.validation, progress,
                         schedule.heads_only_steps, schedule.heads_first_steps)
  log.info('Trained %d steps in %.1f s (%.0f views/s)%s', report.steps, report.seconds,
           report.views_per_s, ', stopped early' if report.stopped_early else '')
  return report


@contextlib.contextmanager
def traced_meanwhile(trainer):
  """Traces `trainer`'s train step in another thread while the body runs: it
  needs the model but no views, and tracing is mostly Python, which runs
  while the views' TensorFlow kernels let go of the interpreter lock."""
  if trainer is None:
    yield
    return
  with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='trace') as pool:
    traced = pool.submit(trainer.trace)
    yield
    traced.result()


def evaluate_model(model, training: TrainingSet, previous: Path | None, files: dict[str, bytes],
                   thresholds: ScoreThresholdConfig, later: 'LaterImages | None' = None):
  """Validation mAP (when images are held out), each label's score threshold, the
  history with this iteration, report samples, of the float .tflite when there is one
  (what serves; the checkpoint's detector would be traced first, about a second), else
  of the checkpoint; the int8 file's held-out mAP too. Thresholds, and the previous
  iteration's entry in the history, also draw on the `previous` run's detections of
  the images it did not train on (`later`: `later_images`).

  Returns:
    (evaluation dict, history, [(image, detections)] for report.png).
  """
  from model import score_thresholds
  from model.evaluate import checkpoint_detect, coco_map, tflite_detect
  float_file = files.get('float')
  detect = (tflite_detect(float_file, training.labels) if float_file is not None
            else checkpoint_detect(model, training.labels))
  evaluation = {'of': 'float .tflite' if float_file is not None else 'checkpoint'}
  held_out = training.part(training.validation)
  found = detect(held_out[1]) if training.validation else []
  if training.validation:
    evaluation['validation'] = coco_map(*held_out, found, training.labels)
    log.info('Validation mAP@0.5 %.3f', evaluation['validation']['map50'])
    if 'int8' in files:
      evaluation['validation_int8'] = held_out_map(training, files['int8'])
      log.info('Validation mAP@0.5 of the int8 file %.3f', evaluation['validation_int8']['map50'])
  evaluation['score_thresholds'] = choose_thresholds(
      score_thresholds.match(*held_out, found, training.labels), later, thresholds)
  history = earlier_history(previous, later)
  history.append({'iteration': len(history) + 1, 'images': len(training.fit),
                  'map50': evaluation.get('validation', {}).get('map50')})
  # A few images for the report, with the boxes a pre-annotation would show:
  # held-out ones when there are, else training ones.
  shown = [training.images[i] for i in (training.validation or training.fit)[:3]]
  shown_found = found[:3] if training.validation else detect(shown)  # held out: detected above
  chosen = evaluation['score_thresholds']
  samples = [(image, [d for d in image_found if d.score >= chosen[d.label]['value']])
             for image, image_found in zip(shown, shown_found)]
  return evaluation, history, samples


@dataclasses.dataclass(frozen=True)
class LaterImages:
  """This iteration's images the previous run did not train on (labeled or changed
  since), as it detects them: held-out images where nothing is held out."""

  truth: tuple[list, list]  # (examples, images)
  found: list
  labels: list[str]  # the previous run's

  def score(self) -> dict:
    """{'images', 'map50'}: the previous run's mAP@0.5 on them (None: none of its labels)."""
    from model.evaluate import coco_map
    try:
      map50 = round(coco_map(*self.truth, self.found, self.labels)['map50'], 4)
    except ValueError:  # none of its labels among their boxes
      map50 = None
    return {'images': len(self.found), 'map50': map50}

  def other_labels(self, min_score: float) -> tuple[int, int]:
    """(boxes it found under another label, boxes it found): `evaluate.found_under_other_labels`."""
    from model.evaluate import found_under_other_labels
    return found_under_other_labels(*self.truth, self.found, self.labels, min_score)


def later_images(training: TrainingSet, previous: Path | None, at_most: int) -> LaterImages | None:
  """The first `at_most` of this iteration's images the `previous` run did not train
  on; None where there are none, or the run does not say what it trained on (an older
  run) or has no readable .tflite (this is not worth failing an iteration for)."""
  from model.evaluate import tflite_detect
  if previous is None:
    return None
  trained_on, paths = run_folder.read_trained_on(previous), RunPaths(previous)
  new = [i for i, example in enumerate(training.examples)
         if tasks_lib.example_key(example) not in trained_on][:at_most]
  files = [paths.tflite(kind) for kind in run_folder.TFLITE_FILES if paths.tflite(kind).is_file()]
  if not trained_on or not new or not files:
    return None
  examples, images = training.part(new)
  try:
    labels = run_folder.read_labels_file(paths.labels)
    found = tflite_detect(files[0], labels)(images)
  except (OSError, ValueError, RuntimeError) as error:
    log.warning('The previous run %s detects nothing on the new images: %s', previous, error)
    return None
  return LaterImages((examples, images), found, labels)


def choose_thresholds(held_out: dict, later: LaterImages | None,
                      thresholds: ScoreThresholdConfig) -> dict[str, dict]:
  """Each label's score threshold (`score_thresholds.choose`): where too few of its boxes
  are held out, the images labeled since the previous version decide, if
  `thresholds.previous_weight` says so."""
  from model import score_thresholds
  since = {}
  if (later and thresholds.previous_weight
      and any(o.boxes < thresholds.min_boxes for o in held_out.values())):
    since = score_thresholds.match(*later.truth, later.found, later.labels)
  chosen = score_thresholds.choose(held_out, thresholds, since)
  log.info('Score thresholds for pre-annotations: %s', ', '.join(
      f'{label} {c["value"]:g}' for label, c in chosen.items()))
  return chosen


def earlier_history(previous: Path | None, later: LaterImages | None) -> list[dict]:
  """The previous run's history, its own entry with how it did on the images labeled
  after it (`later`: {'images', 'map50'}), where there are such."""
  history = run_folder.read_history(previous)
  if later and history:
    history[-1] = {**history[-1], 'later': later.score()}
    log.info('The previous version scores mAP@0.5 %s on the %d images labeled since',
             history[-1]['later']['map50'], len(later.found))
  return history


def held_out_map(training: TrainingSet, tflite: bytes) -> dict:
  """`evaluate.coco_map` of a .tflite file on the held-out images."""
  from model.evaluate import coco_map, tflite_detect
  held_out, images = training.part(training.validation)
  return coco_map(held_out, images, tflite_detect(tflite, training.labels)(images),
                  training.labels)


def tune_int8(fitted: 'Fitted', int8_file: bytes, evaluation: dict,
              export_config: ExportConfig, progress=None) -> tuple[bytes, dict]:
  """The int8 file to ship (`int8_tune`: a quantization-aware tail where plain
  int8 loses on the held-out images, its steps reported to `progress`), and
  what was done, for metrics.json."""
  from model import int8_tune
  held_out = None
  if 'validation_int8' in evaluation and evaluation['of'] == 'float .tflite':
    held_out = {'float': evaluation['validation']['map50'],
                'int8': evaluation['validation_int8']['map50']}
  data, outcome = int8_tune.tune(
      fitted, int8_file, held_out, export_config,
      lambda tflite: held_out_map(fitted.training, tflite)['map50'], progress)
  return data, outcome.as_dict()


def export_model(model, views: Views, labels: list[str], export_config: ExportConfig,
                 kinds: tuple[str, ...]) -> dict[str, bytes]:
  """The .tflite files (kind -> bytes), with TFLite metadata where MediaPipe's writer is set up.

  int8 comes with the float file it is quantized from (`export.export_files`).
  """
  from model import export, ssd as ssd_lib
  metadata_python = export.metadata_python()
  if kinds and metadata_python is None:
    log.warning('No .venv-mediapipe: the .tflite files get no TFLite metadata, which '
                "MediaPipe's ObjectDetector needs (bash scripts/setup.sh creates it)")
  # With QAT, the int8 file comes from the quantization-aware copy of what trained.
  qat_extractor = views.split.quantization_aware_extractor()
  int8_model = None if qat_extractor is None else ssd_lib.build_ssd(
      model.config, feature_extractor=qat_extractor, box_head=model.box_head,
      class_head=model.class_head)
  calibration = calibration_inputs(model, views, export_config) if export.INT8 in kinds else ()
  return export.export_files(model, kinds, labels, export_config, calibration, metadata_python,
                             int8_model)


def calibration_inputs(model, views: Views, export_config: ExportConfig) -> np.ndarray:
  """The model inputs that calibrate the int8 file: training views, originals first."""
  from model import export
  from model.images import pixels_to_input
  count = export_config.calibration_images
  order = (views.train.originals_first() if export_config.calibration_views == 'all'
           else np.arange(len(views.train))[views.train.originals])
  candidates = order[:2 * count]
  return export.calibration_inputs(
      model, pixels_to_input(views.train_pixels[candidates]), count,
      export_config.calibration_outlier_ratio, export_config.calibration_outlier_share,
      views.cached_peaks(candidates))


@dataclasses.dataclass
class Fitted:
  """A trained model and what made it: the stages up to `train_model`."""

  model: object
  training: TrainingSet
  views: Views
  config: TrainConfig  # with every choice made
  choices: dict
  columns: list
  schedule: Schedule
  report: object
  built: object = None  # the `model_pool.Built` the model came in
  later: 'LaterImages | None' = None  # the images labeled since the previous version

  def all_choices(self) -> dict:
    """Every choice made from the data, with its value (and why, where it is not a formula)."""
    images = len(self.training.fit)
    return {**self.choices,
            'steps': {'value': self.schedule.steps, 'why': self.schedule.steps_why},
            'heads_only_steps': {'value': self.schedule.heads_only_steps,
                                 'why': self.schedule.heads_only_why},
            'heads_first_steps': {'value': self.schedule.heads_first_steps,
                                  'why': self.schedule.heads_first_why},
            'class_learning_rate': {'value': self.schedule.class_learning_rate},
            'box_learning_rate_scale': {'value': self.schedule.box_learning_rate_scale},
            'views_per_image': {'value': self.views.train.per_image,
                                'zoom_outs': self.views.zoom_outs_per_image,
                                'mosaic_share': self.config.views.mosaic,
                                'crop_min_scale': self.config.views.crop_scale(images),
                                'why': self.config.views.why(images)}}


def fit(tasks: list, images_root: Path, model_dir: Path, clock: Stopwatch, *,
        previous: Path | None = None, config: TrainConfig = TrainConfig(),
        max_images: int | None = None, subset_seed: int | None = None,
        progress=None) -> Fitted:
  """load_examples -> build_model -> make_views -> start_class_head -> train_model."""
  import tensorflow as tf
  tf.random.set_seed(config.seed)
  with clock.stage('load_examples'):
    previous_labels = run_folder.read_run(previous)[1] if previous is not None else None
    training = load_examples(tasks, images_root, config, previous_labels, max_images,
                             subset_seed)
    later = later_images(training, previous, config.score_thresholds.previous_images)
    base_finds = (choices_lib.labels_the_base_finds(training, model_dir, config)
                  if config.trainable in (None, 'most')
                  and config.most_for_new_labels(len(training.fit)) else None)
    config, choices = choices_lib.choose_settings(config, training, later, base_finds,
                                                  from_base=previous is None)
  with clock.stage('build_model'):
    sources = load_sources(model_dir, previous)
    built = build_model(training.labels, sources, config)
  # Seeded again after the build, which draws random numbers only when it builds:
  # the views are the same whether the model was built or reused.
  tf.random.set_seed(config.seed)
  model, trainer = built.model, built.trainer
  with clock.stage('make_views'), traced_meanwhile(None if built.reused else trainer):
    views = make_views(model, built.split, training, config, previous)
  with clock.stage('start_class_head'):
    columns = start_class_head(model, training.labels, sources, views, config)
  schedule = plan_schedule(len(training.fit), columns, config, views, previous)
  with clock.stage('train'):
    report = train_model(model, views, schedule, config, progress, trainer)
  return Fitted(model, training, views, config, choices, columns, schedule, report, built,
                later)


_warmed_up = False
_warm_up_lock = threading.Lock()


def warm_up() -> None:
  """Imports what an iteration uses and lets AutoGraph convert the augmentation's
  code, once per process (callers in other threads wait for it): an RQ training
  worker and the in-process training thread do it before their first job
  (about 6 s of imports and 3 s of conversion, which AutoGraph caches per
  process). Random state is untouched: every iteration sets its seed first."""
  with _warm_up_lock:
    _warm_up_once()


def _warm_up_once() -> None:
  global _warmed_up  # pylint: disable=global-statement
  if _warmed_up:
    return
  started = time.monotonic()
  import importlib
  import tensorflow as tf
  from model import augment
  for name in ('model.export', 'model.train', 'model.views', 'model.warm_start'):
    importlib.import_module(name)
  augmenter = augment.shared_augmenter()
  pixels, boxes = tf.zeros([32, 32, 3], tf.uint8), tf.constant([[0.2, 0.2, 0.8, 0.8]])
  augmenter.crop(pixels, boxes, tf.constant([1]))
  augmenter.jitter(pixels, boxes, tf.constant([1]))
  _warmed_up = True
  log.info('Warmed up for training in %.1f s', time.monotonic() - started)


def train_iteration(tasks: list, images_root: Path, out_dir: Path, model_dir: Path, *,
                    previous: Path | None = None, config: TrainConfig = TrainConfig(),
                    export_config: ExportConfig = ExportConfig(), max_images: int | None = None,
                    subset_seed: int | None = None, progress=None, on_stage=None,
                    export_kinds: tuple[str, ...] = ('float', 'int8'),
                    export_later: tuple[str, ...] = (), on_published=None) -> RunPaths:
  """Trains one iteration on the tasks' training split and publishes it at `out_dir`.

  Args:
    previous: the run folder this iteration continues from (None: the base).
    max_images, subset_seed: train on a subset of this many images, drawn by
      this seed (None: `config.seed`; a benchmark trains one subset under
      several seeds).
    progress: called with each `train.Progress` while training.
    on_stage: called with each stage's name as it begins.
    export_kinds: the .tflite files to write before publishing (benchmarks may
      skip some); int8 brings the float file it is quantized from.
    export_later: .tflite files converted after publishing, unless made on the
      way already, each added to the published run as it is ready (listed as
      pending until then), so a backend serves the new version as soon as its
      own file is there.
    on_published: called with the run folder once it is published.

  Raises:
    RunError: out_dir exists, no usable training images or boxes, bad previous run.
    tasks_lib.TaskError: malformed tasks.
  """
  out_dir = Path(out_dir)
  if out_dir.exists():
    raise RunError(f'{out_dir} already exists: each iteration gets a new folder')
  clock = Stopwatch(on_stage)
  fitted = fit(tasks, images_root, model_dir, clock, previous=previous, config=config,
               max_images=max_images, subset_seed=subset_seed, progress=progress)
  model, training, views = fitted.model, fitted.training, fitted.views
  with clock.stage('export'):
    files = export_model(model, views, training.labels, export_config, export_kinds)
  with clock.stage('evaluate'):
    evaluation, history, samples = evaluate_model(model, training, previous, files,
                                                  fitted.config.score_thresholds, fitted.later)
  if 'int8' in files:
    with clock.stage('tune_int8'):
      files['int8'], evaluation['int8_tune'] = tune_int8(fitted, files['int8'], evaluation,
                                                         export_config, progress)
  record = Record(fitted, evaluation, history, samples, files)
  later = tuple(kind for kind in export_later if kind not in files)  # by-products are there
  with clock.stage('publish'):
    publish(out_dir, record, clock, previous=previous, export_config=export_config,
            pending=(*(RunPaths(out_dir).tflite(kind).name for kind in later),
                     run_folder.REPORT_FILE))
  log.info('Iteration published at %s (%.1f s in all)', out_dir, clock.total())
  if on_published is not None:
    on_published(RunPaths(out_dir))
  with clock.stage('after_publishing'):
    add_followers(out_dir, record, previous, later, export_config)
  from model import model_pool
  model_pool.give_back(fitted.built)  # done with it: the next iteration may restore into it
  return RunPaths(out_dir)


@dataclasses.dataclass
class Record:
  """What the stages chose and produced, for the run folder."""

  fitted: Fitted
  evaluation: dict
  history: list[dict]
  samples: list
  files: dict[str, bytes]


def publish(out_dir: Path, record: Record, clock: Stopwatch, *, previous: Path | None,
            export_config: ExportConfig, pending: tuple[str, ...] = ()) -> None:
  """Writes what serves the version and starts the next iteration into a staging
  folder and renames it into place; `pending` names the files to follow."""
  from model import compression, ssd as ssd_lib
  fitted, files = record.fitted, record.files
  names = {run_folder.TFLITE_FILES[kind]: data for kind, data in files.items()}
  with run_folder.published_folder(out_dir) as staging, \
      concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix='publish') as pool:
    staged = RunPaths(staging)
    # zlib lets go of the interpreter lock: the files compress while the rest is written.
    gzipped = {name: pool.submit(compression.gzipped_size, data) for name, data in names.items()}
    ssd_lib.checkpoint_for(fitted.model).write(str(staged.checkpoint_prefix))
    run_folder.write_labels_file(staged.labels, fitted.training.labels)
    for kind, data in files.items():
      staged.tflite(kind).write_bytes(data)
    sizes = {name: size.result() for name, size in gzipped.items()}
    run_folder.write_json(staged.metrics, _metrics(record, clock, sizes))
    if pending:
      run_folder.mark_pending(staging, list(pending))
    run_folder.write_json(staged.run_info, _run_info(record, previous, export_config))


def add_followers(out_dir: Path, record: Record, previous: Path | None, later: tuple[str, ...],
                  export_config: ExportConfig) -> None:
  """What a published run gets next: the views the next iteration reuses (then
  the chain's older copy goes), report.png, and the .tflite files of `later`."""
  from model.report import write_report
  fitted = record.fitted
  views, training, report = fitted.views, fitted.training, fitted.report
  with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='views') as pool:
    # File writes let go of the interpreter lock: the views are written while the report is drawn.
    stored = fitted.config.views.carry_over and views.stored(training.labels,
                                                             fitted.config.views.max_cached)
    saved = pool.submit(run_folder.add_written, out_dir, run_folder.VIEWS_FILE,
                        stored.save) if stored else None
    run_folder.add_written(out_dir, run_folder.REPORT_FILE, lambda path: write_report(
        path, report.losses, report.validation, record.history, record.samples))
    if saved is not None:
      saved.result()
  if previous is not None:  # its views moved on to this iteration: keep one copy per chain
    RunPaths(previous).views.unlink(missing_ok=True)
  if later:
    for kind, data in export_model(fitted.model, views, training.labels, export_config,
                                   later).items():
      run_folder.add_file(out_dir, RunPaths(out_dir).tflite(kind).name, data)
    log.info('Added %s to %s', ', '.join(later), out_dir)


def _metrics(record: Record, clock: Stopwatch, gzipped_sizes: dict) -> dict:
  """metrics.json: what the run trained on, chose and measured."""
  from model import compression
  fitted, files = record.fitted, record.files
  model, training, views, config = fitted.model, fitted.training, fitted.views, fitted.config
  columns, schedule, report = fitted.columns, fitted.schedule, fitted.report
  return {
      'labels': training.labels,
      'images': {'train': len(training.fit), 'validation': len(training.validation),
                 'views': len(views.train), 'zoom_outs': views.zoom_outs_per_image * len(training.fit),
                 'reused_views': views.train.reused,
                 'reused_view_outputs': views.train.reused_outputs,
                 'new_view_share': round(report.new_view_share, 3)},
      'steps': report.steps, 'planned_steps': report.planned_steps,
      'best_step': report.best_step, 'stopped_early': report.stopped_early,
      'loss_per_step': [round(v, 5) for v in report.losses],
      'validation_loss': [[s, round(v, 5)] for s, v in report.validation],
      'wall_time_s': {**{f'{k}_s': round(v, 2) for k, v in clock.seconds.items()},
                      'train_loop_s': round(report.seconds, 2),
                      'total_s': round(clock.total(), 2)},
      'images_per_s': round(report.views_per_s, 1),
      'learning_rate': {'class_head': schedule.class_learning_rate,
                        'box_head': schedule.class_learning_rate * schedule.box_learning_rate_scale},
      'class_head_init': {label: c.reason for label, c in zip(training.labels, columns)},
      'file_bytes': {run_folder.TFLITE_FILES[kind]: len(data) for kind, data in files.items()},
      'file_bytes_gzip': gzipped_sizes,
      'optimization': {
          'quantization_aware': config.compression.quantization_aware,
          'prune_sparsity': config.compression.prune_sparsity,
          # zeros over the extractor's (depthwise) conv kernels, all of them
          'extractor_sparsity': round(compression.kernel_sparsity(model.feature_extractor), 4)},
      'tflite_metadata': bool(files) and _has_metadata(),
      'choices': fitted.all_choices(),
      'evaluation': record.evaluation,
      'history': record.history,
      'task_stats': dataclasses.asdict(training.stats),
  }


def _run_info(record: Record, previous: Path | None, export_config: ExportConfig) -> dict:
  """run.json: what the next iteration and the backend need to know of this one."""
  from model import base_weights
  fitted = record.fitted
  model, training, config = fitted.model, fitted.training, fitted.config
  return {
      'labels': training.labels, 'input_size': config.input.size,
      'anchors': dataclasses.asdict(model.config.anchors), 'colour': model.config.colour,
      'colour_kernel': model.config.colour_kernel,
      'started_from': str(previous) if previous is not None else 'base',
      'base': base_weights.PACKAGE.spec, 'seed': config.seed,
      # What a pre-annotation shows: each label's boxes from its threshold on.
      run_folder.SCORE_THRESHOLDS_KEY: {label: chosen['value'] for label, chosen
                                        in record.evaluation['score_thresholds'].items()},
      run_folder.TRAINED_ON_KEY: [tasks_lib.example_key(training.examples[i])
                                  for i in training.fit],
      'train_config': dataclasses.asdict(config),
      'export_config': dataclasses.asdict(export_config),
  }


def _has_metadata() -> bool:
  from model import export
  return export.metadata_python() is not None
