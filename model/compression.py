"""Optional optimizations of the part of the extractor that trains, with
tensorflow-model-optimization: quantization-aware training and magnitude pruning.

Both wrap a copy of that part (`top`, or the whole extractor with
trainable='all'): tfmot clones the model and trains the clone. When training
ends, the clone's float weights are copied back into the SSD's own layers, so
the checkpoint, the float .tflite and the next iteration see plain layers.

- QAT: fake quantization (tfmot's default 8-bit scheme) in the forward pass,
  so that what trains learns to live with int8 rounding. The int8 .tflite is
  converted from the quantization-aware copy: its ranges come from training,
  those of the frozen trunk and the heads from calibration as without QAT.
- Pruning: the smallest weights are zeroed on a polynomial schedule up to the
  target sparsity. Zeros make the .tflite compress well (download size); the
  runtime still multiplies them.
"""

from __future__ import annotations

import dataclasses
import gzip

import numpy as np
import tf_keras

from model.config import TrainConfig


@dataclasses.dataclass
class Optimized:
  """A wrapped copy of the trainable part of the extractor.

  Attributes:
    model: the copy that trains (quantization-aware or being pruned).
    kind: 'qat' or 'prune'.
  """

  model: tf_keras.Model
  kind: str

  def begin(self) -> None:
    """Before the first step: pruning counts its steps from 0."""
    if self.kind == 'prune':
      callback = _tfmot().sparsity.keras.UpdatePruningStep()
      callback.set_model(self.model)
      callback.on_train_begin()

  def calibrate(self, float_model: tf_keras.Model, inputs: np.ndarray, batch_size: int = 16) -> None:
    """Starts QAT's activation ranges where the float model's activations are.

    tfmot starts every range at [-6, 6] and moves it by an EMA with decay
    0.999, so after a few hundred steps (a few-shot budget) the ranges are
    still mostly that guess, and int8 loses accuracy (10-shot raccoon: mAP
    0.54 against 0.61 without QAT). Here each range starts at the mean batch
    min and max of `float_model`'s matching layer on `inputs` (the model's
    own inputs, e.g. cached views): what the EMA would settle at.
    """
    if self.kind != 'qat':
      return
    ranged = {}  # float layer name (None: the model input) -> (min variable, max variable)
    for layer in self.model.layers:
      found = {v.name.split('/')[-1].split(':')[0]: v for v in layer.non_trainable_weights}
      if f'{layer.name}_min' in found:  # the QuantizeLayer on the model's input
        ranged[None] = (found[f'{layer.name}_min'], found[f'{layer.name}_max'])
      elif 'output_min' in found:
        ranged[layer.layer.name] = (found['output_min'], found['output_max'])
    names = [n for n in ranged if n is not None]
    # A clone has each layer once, so `.output` is the one inside this model
    # (the top's layers are also called in the whole extractor).
    alone = tf_keras.models.clone_model(float_model)
    alone.set_weights(float_model.get_weights())
    probe = tf_keras.Model(alone.input, [alone.get_layer(n).output for n in names])
    lows, highs = {n: [] for n in ranged}, {n: [] for n in ranged}
    for start in range(0, len(inputs), batch_size):
      chunk = np.asarray(inputs[start:start + batch_size], np.float32)
      outputs = dict(zip(names, probe(chunk, training=False)))
      outputs[None] = chunk
      for name, value in outputs.items():
        lows[name].append(float(np.min(value)))
        highs[name].append(float(np.max(value)))
    for name, (low, high) in ranged.items():
      low.assign(min(0.0, float(np.mean(lows[name]))))  # TFLite needs 0 inside the range
      high.assign(max(0.0, float(np.mean(highs[name]))))

  def end(self, target: tf_keras.Model) -> None:
    """After the last step: applies the final pruning mask and copies the weights into `target`.

    `target` is the model whose layers the copy was made from (layers are
    matched by name).
    """
    if self.kind == 'prune':
      callback = _tfmot().sparsity.keras.UpdatePruningStep()
      callback.set_model(self.model)
      callback.on_train_begin()  # collects the pruned layers; the step is already past 0
      callback.on_epoch_end(0)   # weights = weights * mask, once more after the last update
    names = _layer_names(target)
    for layer in self.model.layers:
      inner = getattr(layer, 'layer', layer)  # both tfmot wrappers keep the layer as `.layer`
      if inner.name not in names or not layer.trainable_weights:
        continue
      # The float weights are the wrapper's trainable ones (QAT may swap the inner
      # layer's kernel attribute for its fake-quantized tensor; ranges and
      # pruning masks are not trainable).
      own = {_short_name(w): w for w in layer.trainable_weights}
      copy = target.get_layer(inner.name)
      copy.set_weights([own[_short_name(w)].numpy() for w in copy.weights])


def _tfmot():
  """tensorflow-model-optimization, imported when QAT or pruning first needs it:
  the import takes about a second that every other run (and every process
  that imports `model.train`) need not pay."""
  import tensorflow_model_optimization  # pylint: disable=import-outside-toplevel
  return tensorflow_model_optimization


def _short_name(variable) -> str:
  """'Conv/kernel:0' -> 'kernel'."""
  return variable.name.rsplit('/', 1)[-1].split(':')[0]


def _layer_names(model: tf_keras.Model) -> set[str]:
  return {layer.name for layer in model.layers}


def wrap(trainable_part: tf_keras.Model, config: TrainConfig, steps: int) -> Optimized | None:
  """The quantization-aware or pruned copy of `trainable_part` that `config` asks for, or None."""
  if config.compression.quantization_aware:
    return Optimized(_tfmot().quantization.keras.quantize_model(trainable_part), 'qat')
  if config.compression.prune_sparsity > 0:
    # Prune from 10% to 70% of the budget, so that the rest of training heals the cut.
    begin, end = int(0.1 * steps), max(int(0.1 * steps) + 1, int(0.7 * steps))
    schedule = _tfmot().sparsity.keras.PolynomialDecay(
        initial_sparsity=0.0, final_sparsity=config.compression.prune_sparsity, begin_step=begin,
        end_step=end, frequency=max(1, (end - begin) // 20))
    return Optimized(_tfmot().sparsity.keras.prune_low_magnitude(
        trainable_part, pruning_schedule=schedule), 'prune')
  return None


def kernel_sparsity(model: tf_keras.Model) -> float:
  """Fraction of zero weights over the kernels of the model's (depthwise) convolutions."""
  zeros = total = 0
  for layer in model.layers:
    kernel = getattr(layer, 'kernel', None)
    if kernel is None:
      kernel = getattr(layer, 'depthwise_kernel', None)
    if kernel is not None:
      values = kernel.numpy()
      zeros += int(np.count_nonzero(values == 0))
      total += values.size
  return zeros / total if total else 0.0


def gzipped_size(data: bytes) -> int:
  """Bytes of `data` after gzip at its fastest level: what a download of a pruned
  file costs. The default level 6 took 1.9 s for a float file instead of 0.6 s,
  for a file 2 % smaller; zeros compress at any level."""
  return len(gzip.compress(data, compresslevel=1))
