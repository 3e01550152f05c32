"""The SSD as .tflite with detection post-processing inside the graph.

The network up to its heads' outputs (box codes, class scores) converts from a
frozen concrete function; TFLite's `TFLite_Detection_PostProcess` op is then
appended to the file (`add_postprocess`), with the anchors as a constant. Its
four outputs are the standard TFLite SSD ones: boxes [1, K, 4] (ymin, xmin,
ymax, xmax, normalized), classes [1, K] (0..C-1 over real labels), scores
[1, K] and count [1].

`num_classes` is the number of real labels and the scores keep the background
as column 0, so the op skips that column and never reports the background.
"""

from __future__ import annotations

import contextlib
import logging
import math
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import tensorflow as tf

from model import anchors as anchors_lib
from model import ssd as ssd_lib
from model.config import ExportConfig
from model.run_folder import FLOAT, INT8, write_labels_file
from model.tflite_detector import POSTPROCESS_OP, tflite_ops

log = logging.getLogger(__name__)

# The file's signature ('serving_default'): its input's and outputs' names.
SIGNATURE_KEY, INPUT_NAME = 'serving_default', 'image'
OUTPUT_NAMES = ('boxes', 'classes', 'scores', 'num_detections')


class ExportError(RuntimeError):
  """The converter produced something we would not ship."""


def postprocess_options(num_classes: int, config: ExportConfig, scale_factors) -> dict:
  """The post-processing op's settings, as its kernel reads them."""
  y, x, h, w = (float(np.float32(v)) for v in scale_factors)
  return {
      'max_detections': config.max_detections,
      'max_classes_per_detection': 1,
      # Class-agnostic ("fast") NMS: each anchor keeps its likeliest class,
      # then boxes are suppressed whatever their class, so one object gets one
      # label, which is what a person wants to see. The per-class ("regular")
      # NMS is also broken in TFLite's kernel when it runs on several threads:
      # class column `num_threads` is never processed (a third class on two
      # threads never comes out). The checkpoint's detector suppresses the same way.
      'use_regular_nms': False,
      'nms_score_threshold': float(np.float32(config.nms_score_threshold)),
      'nms_iou_threshold': float(np.float32(config.nms_iou_threshold)),
      'num_classes': num_classes,
      'y_scale': y, 'x_scale': x, 'h_scale': h, 'w_scale': w,
  }


def heads_function(model: ssd_lib.SSD, config: ExportConfig):
  """(tf.function: image [1, S, S, 3] float32 in [-1, 1] -> (box codes [1, N, 4],
  class scores [1, N, C + 1])), and the anchors [N, (cy, cx, h, w)] and scale
  factors that decode those codes."""
  size = model.config.input_size
  anchors, scales = anchors_lib.generate_anchors_cycxhw(model.config), model.config.box_scale_factors
  floors = code_floors(model.config, config.box_floor_px) if config.box_floor_px else None
  if floors is not None:
    anchors, scales = floored_decoding(anchors, floors, scales)
  box_encodings = split_box_head(model.box_head, config.box_weight_outlier_ratio, floors)
  class_scores = bounded_class_scores(model.class_head, config.min_class_logit)

  @tf.function(input_signature=[tf.TensorSpec([1, size, size, 3], tf.float32, name=INPUT_NAME)])
  def heads(image):
    features = model.feature_extractor(image, training=False)
    return box_encodings(features), class_scores(features)

  return heads, anchors, scales


def add_postprocess(data: bytes, anchors: np.ndarray, options: dict) -> bytes:
  """The .tflite `data` (outputs: box codes, class scores) with TFLite's
  post-processing op appended, whose four outputs become the file's.

  TensorFlow's way to this op is a `tf.function` with `experimental_implements`
  that the converter replaces, which only a SavedModel keeps: saving one and
  the converter loading it back took ~1.6 s of a 2.5 s conversion, against
  ~0.05 s for this edit of the converted file.
  """
  from flatbuffers import flexbuffers
  from tensorflow.lite.python import schema_py_generated as schema
  from tensorflow.lite.tools import flatbuffer_utils
  model = flatbuffer_utils.convert_bytearray_to_object(bytearray(data))
  graph = model.subgraphs[0]

  def tensor(name: str, shape, values: np.ndarray | None = None) -> int:
    buffer = schema.BufferT()
    if values is not None:
      buffer.data = np.frombuffer(np.ascontiguousarray(values, np.float32).tobytes(), np.uint8)
    model.buffers.append(buffer)
    new = schema.TensorT()
    new.name, new.shape, new.type = name.encode(), np.array(shape, np.int32), schema.TensorType.FLOAT32
    new.buffer = len(model.buffers) - 1
    graph.tensors.append(new)
    return len(graph.tensors) - 1

  code = schema.OperatorCodeT()
  code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.CUSTOM
  code.customCode, code.version = POSTPROCESS_OP.encode(), 1
  model.operatorCodes.append(code)
  op = schema.OperatorT()
  op.opcodeIndex = len(model.operatorCodes) - 1
  codes, scores = graph.outputs  # in `heads_function`'s order
  op.inputs = np.array([codes, scores, tensor('anchors', anchors.shape, anchors)], np.int32)
  op.outputs = np.array([tensor(name, []) for name in OUTPUT_NAMES], np.int32)  # sized by the op
  op.customOptions = np.frombuffer(flexbuffers.Dumps(options), np.uint8)
  op.customOptionsFormat = schema.CustomOptionsFormat.FLEXBUFFERS
  graph.operators.append(op)
  graph.outputs = op.outputs
  model.signatureDefs = [_signature(graph.inputs[0], op.outputs)]
  return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _signature(image: int, outputs):
  """The file's one signature: `INPUT_NAME` and output_0..3 (as a SavedModel names them)."""
  from tensorflow.lite.python import schema_py_generated as schema

  def named(name: str, index) -> schema.TensorMapT:
    entry = schema.TensorMapT()
    entry.name, entry.tensorIndex = name.encode(), int(index)
    return entry
  signature = schema.SignatureDefT()
  signature.signatureKey, signature.subgraphIndex = SIGNATURE_KEY.encode(), 0
  signature.inputs = [named(INPUT_NAME, image)]
  signature.outputs = [named(f'output_{i}', index) for i, index in enumerate(outputs)]
  return signature


def code_floors(config: ssd_lib.SSDConfig, pixels: float) -> np.ndarray:
  """Lower bounds on the box codes (ty, tx, th, tw) below which boxes are all alike:
  a centre a whole anchor off (a matched box's lies within half of one), a size
  where even the largest anchor's box is under `pixels` pixels."""
  y_scale, x_scale, h_scale, w_scale = config.box_scale_factors
  largest = float(anchors_lib.generate_anchors_cycxhw(config)[:, 2:].max()) * config.input_size
  size = min(h_scale, w_scale) * math.log(pixels / largest)
  return np.array([-y_scale, -x_scale, size, size], np.float32)


def floored_decoding(anchors: np.ndarray, floors: np.ndarray, scale_factors
                     ) -> tuple[np.ndarray, tuple[float, ...]]:
  """Anchors [N, (cy, cx, h, w)] and scale factors under which TFLite's decoding
  (cy + ty / y_scale * h, h * exp(th / h_scale)) of the codes less `floors`
  gives the boxes the given ones give the codes."""
  cy, cx, h, w = anchors.T
  (y_scale, x_scale, h_scale, w_scale), (fy, fx, fh, fw) = scale_factors, floors
  # Sizes: the anchor shrinks by what the floor took. Centres: the anchor moves
  # by the floor, and its scale grows as the anchor shrank (the op scales the
  # centre code by the anchor's size too).
  kh, kw = math.exp(fh / h_scale), math.exp(fw / w_scale)
  shifted = np.stack([cy + fy / y_scale * h, cx + fx / x_scale * w, h * kh, w * kw], axis=1)
  return shifted.astype(np.float32), (y_scale * kh, x_scale * kw, h_scale, w_scale)


def split_box_head(box_head: ssd_lib.PredictionHead, outlier_ratio: float,
                   floors: np.ndarray | None = None):
  """features -> the box head's encodings, each conv split in two so that int8
  keeps every weight's precision; with `floors`, the codes less `floors`,
  bounded at 0 (`floored_decoding` decodes them).

  int8 weights are scaled per output channel by its largest: the restored
  head's lowest map gives two channels one weight of 5.4 among weights under
  0.8, which alone cost 0.07 mAP@0.5 on the synthetic shapes at one image.
  `split_outlier_weights` moves such weights to a second conv of their own,
  whose sum with the first is exact.

  The codes reach the post-processing as one int8 tensor, whose range the
  lowest map's empty anchors stretch (to -83 on the small shapes) with size
  codes of boxes far under a pixel. Bounded at `code_floors`, the real codes
  get a finer step. The bound is a ReLU on the codes less the floors (folded
  into the last conv's or add's bias) that TFLite fuses into that op, so no
  int8 tensor holds the unbounded codes (benchmarks/results/choices.md).
  """
  convs = [(split_outlier_weights(conv.kernel.numpy(), outlier_ratio), conv.bias.numpy())
           for conv in box_head.convs]  # read here: a tf.function cannot
  per_anchor = box_head.values_per_anchor

  def encode(features):
    outputs = []
    for (kernels, bias), feature in zip(convs, features):
      if floors is not None:
        bias = bias - np.tile(floors, len(bias) // per_anchor)
      # The bias goes with the last part: were the outliers' input channels
      # zero on every calibration image, their conv would otherwise have an
      # empty range, which XNNPACK refuses.
      parts = [tf.nn.conv2d(feature, tf.constant(kernel), 1, 'SAME') for kernel in kernels]
      out = parts[-1] + bias
      for part in parts[:-1]:
        out = part + out  # ADD (add_n has no int8 kernel)
      if floors is not None:
        out = tf.nn.relu(out)
      outputs.append(tf.reshape(out, [tf.shape(out)[0], -1, per_anchor]))
    return tf.concat(outputs, axis=1)

  return encode


def bounded_class_scores(class_head: ssd_lib.PredictionHead, min_logit: float | None):
  """features -> the class head's scores, its logits bounded below at `min_logit`
  (None: as they are) and its background column's there too.

  The logits reach the sigmoid as one int8 tensor (a concatenation shares its
  inputs' scale), whose range confident background stretched to -52..+47 on
  the small shapes: a step of 0.39, which moves a score of 0.05 by a third.
  Scores under sigmoid(`min_logit`) never pass the post-processing's
  threshold, and the op skips the background column, so neither range is
  needed. The bound is a ReLU on the logits less `min_logit` (folded into
  each conv's bias, as `split_box_head` does), added back before the sigmoid.
  """
  if min_logit is None:
    return lambda features: tf.sigmoid(class_head(features))
  per_anchor = class_head.values_per_anchor
  convs = []
  for level, conv in enumerate(class_head.convs):  # read here: a tf.function cannot
    kernel, bias = conv.kernel.numpy().copy(), conv.bias.numpy().copy()
    kernel[..., ::per_anchor], bias[::per_anchor] = 0.0, min_logit  # the background
    colour = None
    if class_head.colour_convs:
      colour = class_head.colour_convs[level].kernel.numpy().copy()
      colour[..., ::per_anchor] = 0.0
      colour = tf.constant(colour)
    convs.append((tf.constant(kernel), colour, bias - min_logit))

  def scores(features):
    outputs = []
    maps, colours = ssd_lib.split_colours(features)
    for level, (kernel, colour, bias) in enumerate(convs):
      out = tf.nn.conv2d(maps[level], kernel, 1, 'SAME')
      if colour is not None:
        out = out + tf.nn.conv2d(colours[level], colour, 1, 'SAME')
      out = tf.nn.relu(out + bias)
      outputs.append(tf.reshape(out, [tf.shape(out)[0], -1, per_anchor]))
    return tf.sigmoid(tf.concat(outputs, axis=1) + min_logit)

  return scores


def split_outlier_weights(kernel: np.ndarray, ratio: float) -> list[np.ndarray]:
  """[kernel] or [bulk, outliers]: kernel [.., in, out] split where an output
  channel's largest weight exceeds `ratio` x its 99th percentile; bulk clipped
  there, outliers what the clip took (bulk + outliers == kernel). ratio 0: no split."""
  if not ratio:
    return [kernel]
  magnitude = np.abs(kernel).reshape(-1, kernel.shape[-1])
  limit = ratio * np.percentile(magnitude, 99, axis=0)
  if (magnitude.max(axis=0) <= limit).all():
    return [kernel]
  bulk = np.clip(kernel, -limit, limit)
  return [bulk, kernel - bulk]


def full_range_image(size: int) -> np.ndarray:
  """A checkerboard of -1 and 1: calibration then maps uint8 pixels p to p/127.5 - 1 exactly."""
  board = (np.indices((size, size)).sum(axis=0) % 2) * 2.0 - 1.0
  return np.repeat(board[..., None], 3, axis=-1)[None].astype(np.float32)


# Activations no ReLU6 bounds: residual sums and linear projections.
UNBOUNDED_LAYERS = ('_add', '_project')


def unbounded_outputs(model) -> list:
  """The outputs of `model`'s layers whose activations nothing bounds."""
  return [layer.output for layer in model.layers if layer.name.endswith(UNBOUNDED_LAYERS)]


def peaks_of(activations) -> tf.Tensor:
  """[images, tensors]: the largest |value| of each activation [images, ...] per image."""
  return tf.stack([tf.reduce_max(tf.abs(t), axis=[1, 2, 3]) for t in activations], axis=1)


def calibration_inputs(model: ssd_lib.SSD, candidates: np.ndarray, count: int,
                       outlier_ratio: float, outlier_share: float,
                       peaks: np.ndarray | None = None, batch_size: int = 16) -> np.ndarray:
  """Up to `count` of the candidate inputs, without those that push an unbounded
  activation of the extractor past `outlier_ratio` x its median over the candidates,
  if there are at most `outlier_share` of them.

  int8 ranges are the min and max seen in calibration, so one such image
  stretches a tensor's range for every other image: one raccoon photo drove
  block 11's sum to 7.8x its median, costing 3 points of mAP@0.5. Where many
  inputs reach that level (a handful of images' zoom-outs, or all views of one
  of five photos), it is the data's, and a range without it clips.

  Args:
    peaks: [candidates, tensors] `peaks_of` the extractor's unbounded activations
      where they are known already (`views.cache_features`); else measured here.
  """
  if peaks is None:
    import tf_keras
    extractor = model.feature_extractor
    probe = tf_keras.Model(extractor.input, unbounded_outputs(extractor))
    peaks = np.concatenate([peaks_of(probe(candidates[start:start + batch_size], training=False))
                            for start in range(0, len(candidates), batch_size)])
  typical = np.median(peaks, axis=0)
  kept = np.flatnonzero((peaks <= outlier_ratio * typical).all(axis=1))
  if len(candidates) - len(kept) > outlier_share * len(candidates):
    log.info('int8 calibration keeps all %d images: %d reach %gx the median activation, '
             'too many to be outliers', len(candidates), len(candidates) - len(kept),
             outlier_ratio)
    kept = np.arange(len(candidates))
  if len(kept) < len(candidates):
    log.info('int8 calibration leaves out %d of %d images with outlying activations',
             len(candidates) - len(kept), len(candidates))
  return candidates[kept[:count]] if len(kept) else candidates[:count]


def convert(model: ssd_lib.SSD, kind: str, config: ExportConfig = ExportConfig(),
            calibration: Iterable[np.ndarray] = ()) -> bytes:
  """Converts `model` to .tflite bytes with the post-processing op.

  Args:
    kind: FLOAT (float32 weights and input) or INT8 (full-integer weights and
      activations, uint8 input, float outputs; `quantize_float` makes the same
      file from the float one without converting again).
    calibration: model inputs [S, S, 3] in [-1, 1] from the project's images (INT8 only).

  Raises:
    ExportError: when conversion fails or the file lacks the post-processing op or weights.
  """
  started = time.monotonic()
  heads, anchors, scales = heads_function(model, config)
  converter = tf.lite.TFLiteConverter.from_concrete_functions([heads.get_concrete_function()])
  if kind == INT8:
    samples = calibration_samples(calibration, model.config.input_size)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([sample] for sample in samples)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.float32
  elif kind != FLOAT:
    raise ValueError(f'unknown export kind {kind!r}')
  options = postprocess_options(model.config.num_classes, config, scales)
  try:
    data = add_postprocess(converter.convert(), anchors, options)
  except Exception as error:  # the converter raises many types; all mean "no file"
    raise ExportError(f'{kind} conversion failed: {error}') from error
  check_tflite(data)
  log.info('Exported %s .tflite: %.1f MB in %.1f s', kind, len(data) / 1e6,
           time.monotonic() - started)
  return data


def calibration_samples(calibration: Iterable[np.ndarray], input_size: int) -> list[np.ndarray]:
  """The representative inputs [1, S, S, 3]: the calibration images and `full_range_image`."""
  samples = [np.asarray(x, np.float32)[None] for x in calibration]
  if not samples:
    raise ExportError('int8 export needs calibration images')
  return [*samples, full_range_image(input_size)]


def calibrate(data: bytes, samples: list[np.ndarray]) -> bytes:
  """The float file with each activation's min and max over `samples` recorded
  on its tensor, which is what the quantizer reads: the ranges TFLite's
  calibrator records (to float rounding), ~5x faster.

  That calibrator runs every input through reference kernels on one thread
  (~100 ms at 300 px); this runs the interpreter on two threads with its
  intermediate tensors kept. Like that calibrator, it gives a tensor that
  only feeds a sum the sum's range too: the calibrator logs it after the sum
  has reused its buffer, and every int8 file measured so far was made so.
  """
  from tensorflow.lite.python import schema_py_generated as schema
  from tensorflow.lite.tools import flatbuffer_utils
  model = flatbuffer_utils.convert_bytearray_to_object(bytearray(data))
  tensors = model.subgraphs[0].tensors
  activations = [i for i, tensor in enumerate(tensors) if tensor.type == schema.TensorType.FLOAT32
                 and model.buffers[tensor.buffer].data is None]
  low, high = _ranges(data, activations, samples)
  for tensor, output in _summed_alone(model):
    low[tensor], high[tensor] = min(low[tensor], low[output]), max(high[tensor], high[output])
  for i in activations:
    tensors[i].quantization = schema.QuantizationParametersT()
    tensors[i].quantization.min, tensors[i].quantization.max = [low[i]], [high[i]]
  return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _ranges(data: bytes, tensors: list[int], samples: list[np.ndarray]) -> tuple[dict, dict]:
  """Min and max of each of `tensors` over `samples` run through the .tflite."""
  import warnings
  from ai_edge_litert.interpreter import Interpreter
  with warnings.catch_warnings():  # "for debugging purposes only": here, for the ranges
    warnings.simplefilter('ignore')
    interpreter = Interpreter(model_content=data, experimental_preserve_all_tensors=True,
                              num_threads=2)
  interpreter.allocate_tensors()
  image = interpreter.get_input_details()[0]['index']
  low, high = dict.fromkeys(tensors, math.inf), dict.fromkeys(tensors, -math.inf)
  for sample in samples:
    interpreter.set_tensor(image, sample)
    interpreter.invoke()
    for i in tensors:
      least, most = _min_max(interpreter, i)
      low[i], high[i] = min(low[i], least), max(high[i], most)
  return low, high


def _min_max(interpreter, tensor: int) -> tuple[float, float]:
  """A tensor's min and max, read through a view instead of a copy (~2x faster
  here); the view is gone when this returns, as the next invoke requires."""
  values = interpreter.tensor(tensor)()
  return float(values.min()), float(values.max())


def _summed_alone(model) -> list[tuple[int, int]]:
  """(input, output) of each ADD with an input that feeds nothing else: the first such input."""
  from tensorflow.lite.python import schema_py_generated as schema
  graph = model.subgraphs[0]
  uses = np.zeros(len(graph.tensors), int)
  for op in graph.operators:
    for i in op.inputs:
      if i >= 0:
        uses[i] += 1
  pairs = []
  for op in graph.operators:
    code = model.operatorCodes[op.opcodeIndex]
    if max(code.builtinCode, code.deprecatedBuiltinCode) == schema.BuiltinOperator.ADD:
      alone = [i for i in op.inputs if i >= 0 and uses[i] == 1]
      pairs += [(alone[0], op.outputs[0])] if alone else []  # the sum reuses the first one's buffer
  return pairs


def quantize_float(data: bytes, calibration: Iterable[np.ndarray], input_size: int) -> bytes:
  """The int8 file made from the float one, as `convert(..., INT8)` makes it.

  The converter's int8 path converts the graph to a float .tflite, calibrates
  it and quantizes it (`TFLiteConverter._quantize`). When the float file is
  exported anyway, the same two steps on it save converting the graph a
  second time (~2.5 s of ~6 s here), and `calibrate` runs the calibration
  ~5x faster (`tests/test_export.py` holds both to the converter's own); the
  converter's own metadata in the file still lists no quantization.
  """
  from tensorflow.lite.python.convert import mlir_quantize
  started = time.monotonic()
  samples = calibration_samples(calibration, input_size)
  try:
    calibrated = calibrate(data, samples)
    quantized = mlir_quantize(calibrated, input_data_type=tf.uint8, output_data_type=tf.float32)
  except Exception as error:  # as in `convert`: all mean "no file"
    raise ExportError(f'int8 quantization failed: {error}') from error
  check_tflite(quantized)
  log.info('Quantized the float .tflite to int8: %.1f MB in %.1f s', len(quantized) / 1e6,
           time.monotonic() - started)
  return quantized


def op_names(data: bytes) -> list[str]:
  """Operator names of a .tflite, in execution order."""
  from ai_edge_litert.interpreter import Interpreter
  return _op_names(Interpreter(model_content=data))


def _op_names(interpreter) -> list[str]:
  return [op['op_name'] for op in tflite_ops(interpreter)]


def check_tflite(data: bytes) -> None:
  """Refuses files without the post-processing op, with weights left as variables,
  or that the runtime we serve with (XNNPACK) cannot prepare."""
  from ai_edge_litert.interpreter import Interpreter
  try:
    interpreter = Interpreter(model_content=data)
    interpreter.allocate_tensors()
  except (RuntimeError, ValueError) as error:
    raise ExportError(f'the file does not load in TFLite: {error}') from error
  names = _op_names(interpreter)
  if POSTPROCESS_OP not in names:
    raise ExportError(f'{POSTPROCESS_OP} is missing from the exported graph')
  variables = sorted({n for n in names if n in ('VAR_HANDLE', 'READ_VARIABLE', 'ASSIGN_VARIABLE')})
  if variables:
    raise ExportError(f'the exported graph reads weights from variables ({variables}); '
                      'they were not frozen into the file')


def metadata_python() -> Path | None:
  """The interpreter of the MediaPipe environment set-up creates, if it is there."""
  python = Path(__file__).resolve().parents[1] / '.venv-mediapipe' / 'bin' / 'python'
  return python if python.is_file() else None


class MetadataWriter:
  """Adds TFLite metadata (labels, normalization) with MediaPipe's writer, which
  runs in its own environment (`model.tflite_metadata` reading stdin).

  Started before the conversions, its start-up and each file's metadata run
  while the next file converts; `results` waits for the last one.

  Raises:
    ExportError: from `results`, when the writer fails.
  """

  def __init__(self, labels: list[str], python: Path):
    self._work = tempfile.TemporaryDirectory()
    self.folder = Path(self._work.name)
    write_labels_file(self.folder / 'labels.txt', labels)
    self.targets: dict[str, Path] = {}
    self.process = subprocess.Popen(
        [str(python), '-m', 'model.tflite_metadata', '--labels', str(self.folder / 'labels.txt')],
        cwd=Path(__file__).resolve().parents[1], stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

  def submit(self, kind: str, data: bytes) -> None:
    source, target = self.folder / f'{kind}.in.tflite', self.folder / f'{kind}.tflite'
    source.write_bytes(data)
    self.targets[kind] = target
    try:
      self.process.stdin.write(f'{source}\t{target}\n')
      self.process.stdin.flush()
    except BrokenPipeError:
      pass  # the writer died; `results` reports why

  def results(self) -> dict[str, bytes]:
    """kind -> the submitted file with metadata, checked."""
    _, errors = self.process.communicate()
    if self.process.returncode != 0 or not all(t.is_file() for t in self.targets.values()):
      raise ExportError(f'writing TFLite metadata failed: {errors.strip()[-800:]}')
    files = {kind: target.read_bytes() for kind, target in self.targets.items()}
    for data in files.values():
      check_tflite(data)
    return files

  def __enter__(self) -> 'MetadataWriter':
    return self

  def __exit__(self, *exc) -> None:
    if self.process.poll() is None:
      self.process.kill()
      self.process.communicate()
    self._work.cleanup()


def export_files(model: ssd_lib.SSD, kinds: tuple[str, ...], labels: list[str],
                 config: ExportConfig = ExportConfig(), calibration: Iterable[np.ndarray] = (),
                 metadata_python: Path | None = None,
                 int8_model: ssd_lib.SSD | None = None) -> dict[str, bytes]:
  """kind -> .tflite bytes of each of `kinds`, with TFLite metadata when
  `metadata_python` (the MediaPipe environment's interpreter) is given.

  The int8 file is quantized from the float one (`quantize_float`), so asking
  for int8 alone returns the float file too, at the cost of its metadata. A
  quantization-aware `int8_model` converts on its own instead. Each file's
  metadata is written while the next one converts.

  Raises:
    ExportError: when a conversion or the metadata fails.
  """
  calibration = list(calibration)
  with contextlib.ExitStack() as stack:
    writer = (stack.enter_context(MetadataWriter(labels, metadata_python))
              if metadata_python is not None and kinds else None)
    files = {}

    def add(kind, converted):
      files[kind] = converted()
      if writer is not None:
        writer.submit(kind, files[kind])

    if FLOAT in kinds or (INT8 in kinds and int8_model is None):
      add(FLOAT, lambda: convert(model, FLOAT, config))
    if INT8 in kinds and int8_model is None:
      add(INT8, lambda: quantize_float(files[FLOAT], calibration, model.config.input_size))
    elif INT8 in kinds:
      add(INT8, lambda: convert(int8_model, INT8, config, calibration))
    return writer.results() if writer is not None else files
