"""Few-shot training of the SSD on cached views.

What is frozen goes through once per augmented view and is cached; only what
trains runs each step (`ExtractorSplit`). With `trainable='heads'` the whole
extractor is frozen and the box and class heads (six 1x1 convs each) train on
the cached feature maps in milliseconds per step; 'top' also trains Conv_1
and the extra layers on the cached output of the last MobileNetV2 block;
'upper' also the stride-16 blocks (13..16), whose first expansion is map 0;
'all' caches the images and trains everything. The image's colour maps
(`ssd.colour_maps`) are cached with the frozen part's outputs and pass
through to the class head. Loss: sigmoid focal loss on the
class logits (every column, background included, as the base was trained)
plus Huber loss on the encoded boxes of positive anchors, both normalized by
the positive count.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Callable

import numpy as np
import tensorflow as tf
import tf_keras
from official.vision.losses import focal_loss

from model import compression
from model import ssd as ssd_lib
from model.config import COMPRESSION_NEEDS_EXTRACTOR, EarlyStoppingConfig, TrainConfig
from model.views import CachedViews

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Progress:
  """Where a training run is: what the CLI's progress bar and the backend show."""

  step: int
  total_steps: int
  loss: float
  images_per_s: float
  eta_s: float


ProgressCallback = Callable[[Progress], None]


@dataclasses.dataclass
class ExtractorSplit:
  """The feature extractor cut into a frozen part, whose outputs are cached, and the rest.

  Attributes:
    frozen: a model: images -> the tensors to cache.
    trainable: the part that trains, cached tensors -> feature maps: the top
      (the last block's output -> maps 1..5, map 0 passes through from the
      cache) or the whole extractor; None when only the heads train.
    optimized: a quantization-aware or pruned copy of `trainable` that trains
      in its place (`model.compression`); its weights go back when training ends.
  """

  frozen: tf_keras.Model
  trainable: tf_keras.Model | None
  passes_first_map: bool = False
  optimized: compression.Optimized | None = None

  @classmethod
  def for_training(cls, feature_extractor: tf_keras.Model, trainable: str) -> 'ExtractorSplit':
    if trainable == 'heads':
      return cls(feature_extractor, None)
    if trainable in ssd_lib.FIRST_TRAINED_BLOCK:
      first_block = ssd_lib.FIRST_TRAINED_BLOCK[trainable]
      trunk, tail = ssd_lib.split_extractor(feature_extractor, first_block)
      return cls(trunk, tail, passes_first_map=first_block > ssd_lib.FIRST_MAP_BLOCK)
    images = feature_extractor.input
    identity = tf_keras.Model(images, [tf_keras.layers.Activation('linear')(images)])
    return cls(identity, feature_extractor)

  def apply_optimization(self, config: TrainConfig, steps: int, views: CachedViews) -> None:
    """Trains a QAT or pruned copy of the trainable part, if `config` asks for one.

    `views` calibrate QAT's starting activation ranges.
    """
    if config.compression.active:
      if self.trainable is None:
        raise ValueError(COMPRESSION_NEEDS_EXTRACTOR)
      self.optimized = compression.wrap(self.trainable, config, steps)
      self.optimized.calibrate(self.trainable,
                               views.features[1 if self.passes_first_map else 0][:64])

  @property
  def _training_part(self):
    return self.optimized.model if self.optimized else self.trainable

  @property
  def variables(self) -> list:
    """The extractor's variables that train."""
    return [] if self.trainable is None else self._training_part.trainable_variables

  @property
  def cut(self) -> int:
    """The index, among the cached tensors, of the one `trainable` takes."""
    return 1 if self.passes_first_map else 0

  def around_cut(self, cached: list, maps: list) -> list:
    """The feature maps: `maps` made from the cut, with what passes it by: map 0
    (cached below the cut) and the colour maps (after it)."""
    return [*cached[:self.cut], *maps, *cached[self.cut + 1:]]

  def feature_maps(self, cached: list, training: bool = False) -> list:
    if self.trainable is None:
      return cached
    return self.around_cut(
        cached, tf.nest.flatten(self._training_part(cached[self.cut], training=training)))

  def quantization_aware_extractor(self) -> tf_keras.Model | None:
    """images -> feature maps through the quantization-aware copy (for the int8 export), or None."""
    if not self.optimized or self.optimized.kind != 'qat':
      return None
    images = self.frozen.input
    maps = self.feature_maps(tf.nest.flatten(self.frozen(images)))
    return tf_keras.Model(images, maps, name='feature_extractor_qat')


class EarlyStopping:
  """Stops a run whose held-out loss has not improved for `every * patience` steps.

  The held-out split is small (10% of the images): it is trusted only from
  half the budget on, to stop a run and keep its best weights since then,
  never to roll back to an early step.
  """

  def __init__(self, steps: int, config: EarlyStoppingConfig):
    self.from_step = steps // 2
    self.patience_steps = config.every * config.patience
    self.best_value, self.best_step = math.inf, 0

  def observe(self, step: int, value: float) -> tuple[bool, bool]:
    """(whether this is the best so far, whether to stop now)."""
    if step < self.from_step:
      return False, False
    if value < self.best_value:
      self.best_value, self.best_step = value, step
      return True, False
    return False, step - self.best_step >= self.patience_steps


@dataclasses.dataclass
class TrainReport:
  """What happened: losses per step, validation, timing."""

  steps: int
  planned_steps: int
  losses: list[float]
  validation: list[tuple[int, float]]
  best_step: int
  stopped_early: bool
  seconds: float
  views_per_s: float
  new_view_share: float = 1.0  # of the views drawn, those of new or changed images


def batch_odds(carried: np.ndarray | None, new_share: float) -> tuple[np.ndarray | None, float]:
  """Each view's odds of being drawn, and the share of draws that go to new views.

  A warm start's images fall into those the previous iteration trained on
  (`carried`: their views came over) and new or changed ones; the new fill at
  least `new_share` of the draws, so a few new images are learned in a
  shortened run without the old being forgotten. None: uniform.
  """
  if carried is None or not carried.any():
    return None, 1.0
  natural = 1.0 - float(carried.mean())
  if carried.all() or natural >= new_share:
    return None, natural
  odds = np.where(carried, (1 - new_share) / carried.sum(), new_share / (~carried).sum())
  return odds / odds.sum(), new_share


class LearningRates:
  """A linear warm-up to each part's peak, then cosine decay to zero, one Adam per part.

  The numbers live in variables, set per run (`set`), so that the train step
  can be traced before they are known (`Trainer.trace`). Two optimizers at
  least: Adam is blind to gradient scale, so a restored box head that should
  move gently needs its own, smaller learning rate.
  """

  PARTS = ('class', 'box', 'extractor')

  def __init__(self):
    def number(value):
      return tf.Variable(value, trainable=False, dtype=tf.float32)
    self.warmup_steps, self.decay_steps = number(1.0), number(1.0)
    self.starts = {part: number(0.0) for part in self.PARTS}
    self.peaks = {part: number(0.0) for part in self.PARTS}
    # Not (yet) Keras' legacy Adam: its fused updates trace and run faster and
    # fresh runs score the same, but warm starts were 0.009 lower over six
    # subsets, one of them 0.065 (benchmarks/results/choices.md).
    self.optimizers = {part: tf_keras.optimizers.Adam(
        learning_rate=tf_keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=self.starts[part], decay_steps=self.decay_steps,
            warmup_target=self.peaks[part], warmup_steps=self.warmup_steps))
        for part in self.PARTS}

  def set(self, steps: int, peaks: dict[str, float], warmup_fraction: float) -> None:
    """Warm up over `warmup_fraction` of `steps` from 1% of each part's peak, then decay."""
    warmup = max(1, int(steps * warmup_fraction))
    self.warmup_steps.assign(warmup)
    self.decay_steps.assign(max(1, steps - warmup))
    for part, peak in peaks.items():
      self.starts[part].assign(peak * 0.01)
      self.peaks[part].assign(peak)


def heads_alone_ruled_out(split: ExtractorSplit, config: TrainConfig) -> str | None:
  """Why no run of this split and config ends training the heads alone, or None."""
  if not config.schedule.heads_only_tail:
    return 'off (schedule.heads_only_tail is 0)'
  return _extractor_trains_throughout(split, config)


def _extractor_trains_throughout(split: ExtractorSplit, config: TrainConfig) -> str | None:
  """Why the extractor's trained part trains in every step (or never), or None."""
  if split.trainable is None:
    return 'only the heads train'
  if config.trainable != 'top':
    return (f'"{config.trainable}" trains the lowest feature map, which finds the smallest '
            'objects: frozen for some steps, it cost the small shapes mAP')
  if config.compression.active:
    return 'quantization-aware or pruned training wraps the extractor to the end'
  return None


def heads_only_steps(split: ExtractorSplit, views: int, steps: int, config: TrainConfig
                     ) -> tuple[int, str]:
  """How many of a run's last steps train the heads alone, on feature maps
  computed once (`ScheduleConfig.heads_only_tail`), and why."""
  ruled_out = heads_alone_ruled_out(split, config) or _maps_too_large(split, views, config)
  if ruled_out:
    return 0, ruled_out
  share = config.schedule.heads_only_tail
  return int(steps * share), (f'the last {share:.0%} of the steps, on the extractor\'s feature '
                              f'maps of {views} views computed once '
                              f'({_maps_megabytes(split, views):.0f} MB)')


def heads_first_steps(split: ExtractorSplit, views: int, steps: int, config: TrainConfig,
                      fresh_column: bool) -> tuple[int, str]:
  """How many of a run's first steps train the heads alone, on the restored
  extractor's feature maps computed once (`ScheduleConfig.heads_first`), and why."""
  ruled_out = (_heads_first_ruled_out(config, fresh_column)
               or _extractor_trains_throughout(split, config)
               or _maps_too_large(split, views, config))
  if ruled_out:
    return 0, ruled_out
  share = config.schedule.heads_first
  return int(steps * share), (f'the first {share:.0%} of the steps, before the extractor '
                              'trains: a fresh class column learns on features it cannot '
                              'yet disturb')


def _heads_first_ruled_out(config: TrainConfig, fresh_column: bool) -> str | None:
  if not config.schedule.heads_first:
    return 'off (schedule.heads_first is 0)'
  if not fresh_column:
    return 'every class column starts from a fitted one'
  return None


def _maps_megabytes(split: ExtractorSplit, views: int) -> float:
  """What the extractor's feature maps of `views` views take as float16."""
  return views * sum(math.prod(o.shape[1:]) for o in split.trainable.outputs) * 2 / 1e6


def _maps_too_large(split: ExtractorSplit, views: int, config: TrainConfig) -> str | None:
  """Why the extractor's feature maps of every view cannot be held, or None."""
  limit_mb = config.schedule.heads_only_max_mb
  megabytes = _maps_megabytes(split, views)
  if megabytes > limit_mb:
    return f'the feature maps of {views} views would take {megabytes:.0f} MB (over {limit_mb:g})'
  return None


class Trainer:
  """Trains the heads (and what `split` leaves trainable of the extractor) on cached views.

  Args:
    model: the project's SSD; it is updated in place.
    split: how its extractor is cut; the views are cached with `split.frozen`.
    config: training settings.
  """

  def __init__(self, model: ssd_lib.SSD, split: ExtractorSplit, config: TrainConfig):
    self.model = model
    self.split = split
    self.config = config
    self.num_columns = model.config.num_classes + 1
    self.focal = focal_loss.FocalLoss(config.loss.focal_alpha, config.loss.focal_gamma,
                                      reduction=tf_keras.losses.Reduction.NONE)
    self.huber = tf_keras.losses.Huber(delta=1.0, reduction=tf_keras.losses.Reduction.NONE)
    self.class_variables = model.class_head.trainable_variables
    self.box_variables = model.box_head.trainable_variables
    self.extractor_variables = split.variables
    self.variables = self.box_variables + self.class_variables + self.extractor_variables
    self.rates = LearningRates()
    # Adam's moments made now, not by the traced step: a tf.function whose
    # first trace creates variables is traced twice (0.8-1.5 s a trainer).
    for part, variables in (('class', self.class_variables), ('box', self.box_variables),
                            ('extractor', self.extractor_variables)):
      self.rates.optimizers[part].build(variables)
    self.step = self._step_fn()
    # Heads-only steps on feature maps computed once (`frozen_maps`), for the
    # end of a run that trains the top (`heads_only_steps`); made here to be
    # traced ahead where the config will use them, else when a run asks.
    self.heads_step = (None if heads_alone_ruled_out(split, config)
                       else self._step_fn(heads_only=True))

  def reset(self, config: TrainConfig) -> None:
    """Readies a trainer (and its traced step) for another run of the same model
    under `config`, whose loss settings must be the ones traced: optimizers as
    new (step count and moments zero); the weights are the caller's to restore."""
    self.config = config
    for optimizer in self.rates.optimizers.values():
      for variable in optimizer.variables:
        variable.assign(tf.zeros_like(variable))

  def trace(self) -> None:
    """Traces the train steps (a second or two; they need no views, so callers
    overlap it with making them). Else each one's first step traces it."""
    started = time.monotonic()
    self.step.get_concrete_function()
    if self.heads_step is not None:
      self.heads_step.get_concrete_function()
    log.info('Traced the train step in %.1f s', time.monotonic() - started)

  def losses(self, cached, class_targets, box_targets, training=False):
    """Mean per-positive (class loss, box loss) of a batch of cached views."""
    return self.head_losses(self.split.feature_maps(cached, training=training), class_targets,
                            box_targets)

  def head_losses(self, features, class_targets, box_targets):
    """Mean per-positive (class loss, box loss) of a batch of feature maps."""
    class_logits = self.model.class_head(features)
    box_encodings = self.model.box_head(features)
    valid = tf.cast(class_targets >= 0, tf.float32)
    positive = tf.cast(class_targets > 0, tf.float32)
    normalizer = tf.maximum(1.0, tf.reduce_sum(positive))
    one_hot = tf.one_hot(tf.maximum(class_targets, 0), self.num_columns)
    class_loss = tf.reduce_sum(
        tf.reduce_sum(self.focal(one_hot, class_logits), axis=-1) * valid) / normalizer
    box_loss = tf.reduce_sum(
        self.huber(box_targets[..., None], box_encodings[..., None]) * positive[..., None]
    ) / normalizer
    return class_loss, box_loss

  def _step_fn(self, heads_only: bool = False):
    # The cache is handed over whole each step (no copy); the batch is gathered
    # inside the graph. `heads_only`: the cache holds the feature maps, and the
    # extractor does not train.
    inputs = self.model.feature_extractor.outputs if heads_only else self.split.frozen.outputs
    anchors = self.model.config.num_anchors()
    signature = [tf.TensorSpec([None], tf.int32),
                 [tf.TensorSpec([None, *tensor.shape[1:]], tf.float16) for tensor in inputs],
                 tf.TensorSpec([None, anchors], tf.int32),
                 tf.TensorSpec([None, anchors, 4], tf.float32)]
    optimizers = self.rates.optimizers
    extractor_variables = [] if heads_only else self.extractor_variables

    @tf.function(input_signature=signature)
    def step(index, features, class_targets, box_targets):
      batch = [tf.cast(tf.gather(f, index), tf.float32) for f in features]
      with tf.GradientTape() as tape:
        maps = batch if heads_only else self.split.feature_maps(batch, training=True)
        class_loss, box_loss = self.head_losses(maps, tf.gather(class_targets, index),
                                                tf.gather(box_targets, index))
        loss = class_loss + self.config.loss.box_weight * box_loss
      class_grads, box_grads, extractor_grads = tape.gradient(
          loss, [self.class_variables, self.box_variables, extractor_variables])
      optimizers['class'].apply_gradients(zip(class_grads, self.class_variables))
      optimizers['box'].apply_gradients(zip(box_grads, self.box_variables))
      if extractor_variables:
        optimizers['extractor'].apply_gradients(zip(extractor_grads, extractor_variables))
      return loss
    return step

  def frozen_maps(self, features: list[tf.Tensor]) -> list[tf.Tensor]:
    """The feature maps of every cached view, float16, through the extractor as it is now."""
    split = self.split
    source = features[split.cut]
    parts = [tf.nest.flatten(split.trainable(tf.cast(source[start:start + 32], tf.float32)))
             for start in range(0, source.shape[0], 32)]
    maps = [tf.cast(tf.concat(column, 0), tf.float16) for column in zip(*parts)]
    return split.around_cut(features, maps)

  def validation_loss(self, views: CachedViews) -> float:
    """Mean loss per view (class + weighted box) of `views`, in batches of 32."""
    total, count = 0.0, 0
    for start in range(0, len(views), 32):
      part = slice(start, start + 32)
      class_loss, box_loss = self.losses([tf.constant(f[part], tf.float32) for f in views.features],
                                         tf.constant(views.class_targets[part]),
                                         tf.constant(views.box_targets[part]))
      size = len(views.class_targets[part])
      total += float(class_loss + self.config.loss.box_weight * box_loss) * size
      count += size
    return total / max(1, count)

  def train(self, train_views: CachedViews, steps: int, learning_rate: float,
            box_learning_rate_scale: float, validation: CachedViews | None = None,
            progress: ProgressCallback | None = None, heads_only: int = 0,
            heads_first: int = 0) -> TrainReport:
    """Trains `steps` steps (fewer when early stopping ends the run).

    Args:
      learning_rate: the class head's peak learning rate.
      box_learning_rate_scale: the box head's, relative to it (0 freezes it).
      heads_only: the last this many steps train the heads alone on the
        extractor's maps of the views, computed once when they begin
        (`heads_only_steps`).
      heads_first: the first this many steps do, on the maps of the extractor
        as restored (`heads_first_steps`).
    """
    config = self.config
    self._set_rates(steps, learning_rate, box_learning_rate_scale)
    cache = ([tf.constant(f) for f in train_views.features],
             tf.constant(train_views.class_targets), tf.constant(train_views.box_targets))
    if self.split.optimized:
      self.split.optimized.begin()
    rng = np.random.default_rng(config.seed)
    batch = min(config.schedule.batch_size, max(1, len(train_views)))
    losses = []
    watch = _HeldOut(self, validation, EarlyStopping(steps, config.early_stopping))
    started = time.monotonic()
    odds, new_share = batch_odds(train_views.carried, config.schedule.new_image_share)
    if odds is not None:
      log.info('Views of new or changed images: %d of %d, drawn as %.0f%% of each batch',
               np.sum(~train_views.carried), len(train_views), new_share * 100)
    phases = self._phases(cache, steps, heads_only, heads_first)
    for step in range(1, steps + 1):
      step_fn, inputs = phases(step)
      index = rng.choice(len(train_views), size=batch, replace=len(train_views) < batch, p=odds)
      losses.append(float(step_fn(tf.constant(index, tf.int32), *inputs)))
      watch.check(step, steps)
      if progress and (step % 10 == 0 or step == steps or watch.stopped_early):
        progress(_progress(step, steps, losses, time.monotonic() - started, batch))
      if watch.stopped_early:
        break
    watch.restore_best()
    if self.split.optimized:
      self.split.optimized.end(self.split.trainable)
    seconds = time.monotonic() - started
    return TrainReport(steps=len(losses), planned_steps=steps, losses=losses,
                       validation=watch.losses, best_step=watch.best_step(len(losses)),
                       stopped_early=watch.stopped_early, seconds=seconds,
                       new_view_share=new_share,
                       views_per_s=len(losses) * batch / seconds if seconds else 0.0)

  def _set_rates(self, steps: int, learning_rate: float, box_learning_rate_scale: float) -> None:
    extractor_scale = self.config.schedule.extractor_scale
    if extractor_scale is None:  # not chosen from the data (`choose_extractor_scale`)
      extractor_scale = self.config.schedule.usual_extractor_scale
    self.rates.set(steps, {'class': learning_rate,
                           'box': learning_rate * box_learning_rate_scale,
                           'extractor': learning_rate * extractor_scale},
                   self.config.schedule.warmup_fraction)

  def _phases(self, cache, steps: int, heads_only: int, heads_first: int):
    """step -> (the step function, its inputs): the heads alone on the restored
    extractor's maps for the first `heads_first` steps, the whole step, then the
    heads alone on the trained extractor's maps for the last `heads_only`."""
    if (heads_only or heads_first) and self.heads_step is None:
      self.heads_step = self._step_fn(heads_only=True)
    current = [self.step, cache]
    if heads_first:
      current = [self.heads_step, (self.frozen_maps(cache[0]), *cache[1:])]

    def at(step: int):
      if heads_first and step == heads_first + 1:
        current[:] = [self.step, cache]
      if step == steps - heads_only + 1:
        current[:] = [self.heads_step, (self.frozen_maps(cache[0]), *cache[1:])]
      return current
    return at


def _progress(step: int, steps: int, losses: list[float], elapsed: float, batch: int) -> Progress:
  rate = step / elapsed if elapsed > 0 else 0.0
  return Progress(step=step, total_steps=steps, loss=float(np.mean(losses[-10:])),
                  images_per_s=rate * batch, eta_s=(steps - step) / rate if rate else 0.0)


class _HeldOut:
  """The held-out loss every `early_stopping.every` steps, whether to stop, and
  the weights that did best there (kept when `restore_best`)."""

  def __init__(self, trainer: Trainer, views: CachedViews | None, stopper: EarlyStopping):
    self.trainer, self.views, self.stopper = trainer, views, stopper
    self.config = trainer.config.early_stopping
    self.losses: list[tuple[int, float]] = []
    self.best_weights = None
    self.stopped_early = False

  def check(self, step: int, steps: int) -> None:
    if self.views is None or (step % self.config.every and step != steps):
      return
    value = self.trainer.validation_loss(self.views)
    self.losses.append((step, value))
    improved, self.stopped_early = self.stopper.observe(step, value)
    if improved and self.config.restore_best:
      self.best_weights = [v.numpy() for v in self.trainer.variables]

  def restore_best(self) -> None:
    """Keeps the weights that did best on held-out images, if any were kept."""
    if self.best_weights is not None:
      for variable, value in zip(self.trainer.variables, self.best_weights):
        variable.assign(value)

  def best_step(self, trained: int) -> int:
    return self.stopper.best_step if self.best_weights is not None else trained
