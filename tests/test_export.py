"""The exported .tflite's post-processing: every class comes out, one label per object."""

import numpy as np
import pytest

from model import export, ssd as ssd_lib
from model.anchors import generate_anchors_cycxhw
from model.config import SSDConfig
from model.tflite_detector import TFLiteDetector


@pytest.fixture(scope='module')
def three_class_tflite(tmp_path_factory):
  """A 3-class SSD (random extractor) whose class head says "class 3" for every anchor,
  "class 1" a little less, and whose box head leaves each box on its anchor."""
  model = ssd_lib.build_ssd(SSDConfig(num_classes=3))
  for heads, values in ((model.class_head, [-9.0, 0.0, -9.0, 2.0]), (model.box_head, None)):
    for conv in heads.convs:
      kernel, bias = (w.numpy() for w in conv.weights)
      bias = np.zeros_like(bias) if values is None else np.tile(values, len(bias) // 4)
      conv.set_weights([np.zeros_like(kernel), bias.astype(np.float32)])
  path = tmp_path_factory.mktemp('export') / 'model.tflite'
  path.write_bytes(export.convert(model, export.FLOAT))
  return path


def test_the_file_lists_its_four_outputs_in_tflites_ssd_order(three_class_tflite):
  """The order README's snippet and MediaPipe read: boxes, classes, scores, count,
  by index, by the output listing and by the signature alike."""
  from ai_edge_litert.interpreter import Interpreter
  interpreter = Interpreter(str(three_class_tflite))
  listed = interpreter.get_output_details()
  assert [o['name'] for o in listed] == list(export.OUTPUT_NAMES)
  assert [o['index'] for o in listed] == sorted(o['index'] for o in listed)
  runner = interpreter.get_signature_runner(export.SIGNATURE_KEY)
  outputs = runner(**{export.INPUT_NAME: np.zeros((1, 300, 300, 3), np.float32)})
  assert [outputs[f'output_{i}'].shape for i in range(4)] == [(1, 100, 4), (1, 100), (1, 100), (1,)]


@pytest.mark.parametrize('threads', [1, 2, 4])
def test_the_last_class_is_reported_on_any_thread_count(three_class_tflite, threads):
  """TFLite's per-class NMS skips class column `num_threads` on several threads;
  the exported suppression must not (the third class on two threads, here)."""
  from PIL import Image
  detector = TFLiteDetector(three_class_tflite, ['a', 'b', 'c'], num_threads=threads)
  found = detector.raw(Image.new('RGB', (300, 300)))
  assert found['count'] == 100
  # One label per box, the likeliest: never the runner-up "a" on a box already called "c".
  assert set(found['classes'].tolist()) == {2}
  assert np.allclose(found['scores'], 1 / (1 + np.exp(-2.0)), atol=1e-4)


def test_int8_calibration_leaves_out_a_rare_image_with_outlying_activations(base_model):
  from tests.synthetic import textured_background
  model = base_model[0]
  size = model.config.input_size
  photos = [textured_background(size, size, seed=i).astype(np.float32) / 127.5 - 1.0
            for i in range(12)]
  white = np.ones((size, size, 3), np.float32)  # an overexposed frame: sums ~7x their median
  candidates = np.stack(photos[:6] + [white] + photos[6:])
  kept = export.calibration_inputs(model, candidates, count=10, outlier_ratio=3.0,
                                   outlier_share=1 / 12)
  np.testing.assert_array_equal(kept, np.stack(photos[:10]))
  everything = export.calibration_inputs(model, candidates, count=20, outlier_ratio=10.0,
                                         outlier_share=1 / 12)
  assert len(everything) == 13
  # Two such frames of 14 are more than a twelfth: a level the data reaches, kept.
  candidates = np.stack(photos[:6] + [white, white] + photos[6:])
  kept = export.calibration_inputs(model, candidates, count=10, outlier_ratio=3.0,
                                   outlier_share=1 / 12)
  np.testing.assert_array_equal(kept, candidates[:10])


def test_outlying_weights_go_to_a_conv_of_their_own_and_sum_back_exactly():
  rng = np.random.default_rng(0)
  kernel = rng.normal(0, 0.1, (1, 1, 200, 6)).astype(np.float32)
  assert export.split_outlier_weights(kernel, 4.0) == [kernel]  # nothing outlies
  kernel[0, 0, 17, 2] = 5.0
  bulk, outliers = export.split_outlier_weights(kernel, 4.0)
  np.testing.assert_array_equal(bulk + outliers, kernel)
  assert np.count_nonzero(outliers) == 1 and outliers[0, 0, 17, 2] > 3.0
  assert np.abs(bulk).max() < 0.3 * 5.0
  assert export.split_outlier_weights(kernel, 0) == [kernel]


def _int8_box_encodings(head, features, ratio: float, floors=None) -> np.ndarray:
  """The encodings of `head` (split at `ratio`, bounded at `floors`) run as an int8
  .tflite, dequantized (and the floors added back)."""
  encodings = _run_int8(export.split_box_head(head, ratio, floors), features)
  return encodings + (0 if floors is None else floors)


def _run_int8(encode, features) -> np.ndarray:
  """`encode` ([features] -> a tensor) converted to an int8 .tflite calibrated on
  `features` and run on each of them, its output dequantized."""
  import tensorflow as tf
  from ai_edge_litert.interpreter import Interpreter
  signature = tf.TensorSpec([1, *features.shape[1:]], tf.float32)
  function = tf.function(lambda f: encode([f]), input_signature=[signature])
  converter = tf.lite.TFLiteConverter.from_concrete_functions([function.get_concrete_function()])
  converter.optimizations = [tf.lite.Optimize.DEFAULT]
  converter.representative_dataset = lambda: ([f[None]] for f in features)
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
  interpreter = Interpreter(model_content=converter.convert())
  interpreter.allocate_tensors()
  (source,), (target,) = interpreter.get_input_details(), interpreter.get_output_details()

  def run(feature):
    interpreter.set_tensor(source['index'], feature[None])
    interpreter.invoke()
    return interpreter.get_tensor(target['index'])

  return np.concatenate([run(f) for f in features])


def test_int8_box_encodings_keep_their_precision_beside_an_outlying_weight():
  """The restored head's lowest map has a weight of 5.4 among weights under 0.8 in two
  output channels; int8 scales each channel by its largest weight, so unsplit, that one
  weight coarsens all the others (0.07 mAP@0.5 on the synthetic shapes at one image)."""
  rng = np.random.default_rng(1)
  features = (rng.uniform(0, 6, (24, 6, 6, 96)) * (rng.random((24, 6, 6, 96)) < 0.3)).astype(np.float32)
  features[..., 7] = 0.0  # a feature these images (nearly) never show, with an outlying weight
  features[::6, 2, 3, 7] = 1.0
  head = ssd_lib.PredictionHead([1], 4, 'box_encoding')
  head([features])
  kernel = rng.normal(0, 0.03, (1, 1, 96, 4)).astype(np.float32)
  kernel[0, 0, 7, 2:] = 5.0
  head.convs[0].set_weights([kernel, np.array([0.1, -0.2, 0.3, 0.05], np.float32)])
  exact = head([features]).numpy()
  errors = {ratio: np.abs(_int8_box_encodings(head, features, ratio) - exact)[..., 2:].mean()
            for ratio in (0.0, 4.0)}
  assert errors[4.0] < 0.3 * errors[0.0], errors


def test_int8_box_encodings_keep_their_precision_beside_degenerate_ones():
  """Empty anchors' size codes far below any real box's (the restored lowest map's reach
  -83: a large negative bias that what an object shows makes up for) stretch the one
  int8 range every code shares; bounded at a degenerate code, the real codes get a finer
  step, and in float they are untouched."""
  rng = np.random.default_rng(2)
  features = rng.uniform(0, 1, (24, 6, 6, 32)).astype(np.float32)
  empty = rng.random((24, 6, 6)) < 0.5
  features[..., :16] = ~empty[..., None]  # what an object shows
  head = ssd_lib.PredictionHead([1], 4, 'box_encoding')
  head([features])
  kernel = rng.normal(0, 0.5, (1, 1, 32, 4)).astype(np.float32)
  kernel[0, 0, :16, 2:] = 5.0
  head.convs[0].set_weights([kernel, np.array([0.0, 0.0, -80.0, -80.0], np.float32)])
  exact, real = head([features]).numpy(), ~empty.reshape(24, -1)
  assert exact[~real][:, 2:].max() < -60 < -10 < exact[real].min()
  floors = np.array([-10.0, -10.0, -30.0, -30.0], np.float32)
  shifted = export.split_box_head(head, 4.0, floors)([features]).numpy()
  np.testing.assert_allclose(shifted[real] + floors, exact[real], atol=1e-4)
  assert (shifted[~real][:, 2:] == 0).all()  # bounded at the floor
  errors = {bounded: np.abs(_int8_box_encodings(head, features, 4.0, floors if bounded else None)
                            - exact)[real].mean() for bounded in (False, True)}
  assert errors[True] < 0.6 * errors[False], errors


def test_int8_class_scores_keep_their_precision_beside_confident_background():
  """Confident background (+40 in the background column, -50 in the others) stretches the
  one int8 range all logits share; bounded at -8, where no score passes the
  post-processing's threshold, and without the background column, which it skips,
  the scores that matter get a finer step, and in float they are untouched."""
  rng = np.random.default_rng(3)
  features = rng.uniform(0, 1, (24, 6, 6, 32)).astype(np.float32)
  features[..., :16] = rng.random((24, 6, 6, 1)) < 0.3  # what an object shows
  head = ssd_lib.PredictionHead([1], 3, 'class_logits')
  head([features])
  kernel = rng.normal(0, 0.3, (1, 1, 32, 3)).astype(np.float32)
  kernel[0, 0, :16] = [-3.0, 3.0, 3.0]
  head.convs[0].set_weights([kernel, np.array([40.0, -50.0, -50.0], np.float32)])
  exact = 1 / (1 + np.exp(-head([features]).numpy()))
  real = exact[..., 1:] >= 0.01  # scores the post-processing keeps
  assert real.sum() > 100 and exact[..., 0].max() > 0.99
  bounded = export.bounded_class_scores(head, -8.0)([features]).numpy()
  np.testing.assert_allclose(bounded[..., 1:][real], exact[..., 1:][real], rtol=1e-5)
  assert bounded[..., 1:][~real].max() < 0.01
  errors = {bound: np.abs(_run_int8(export.bounded_class_scores(head, bound), features)[..., 1:]
                          - exact[..., 1:])[real].mean() for bound in (None, -8.0)}
  assert errors[-8.0] < 0.5 * errors[None], errors


def _decode(codes, anchors, scales):
  """TFLite_Detection_PostProcess's decoding: (cy, cx, h, w) of each box."""
  return np.stack([anchors[:, 0] + codes[:, 0] / scales[0] * anchors[:, 2],
                   anchors[:, 1] + codes[:, 1] / scales[1] * anchors[:, 3],
                   anchors[:, 2] * np.exp(codes[:, 2] / scales[2]),
                   anchors[:, 3] * np.exp(codes[:, 3] / scales[3])], axis=1)


def test_floored_codes_decode_to_the_same_boxes_or_to_under_a_pixel():
  config = SSDConfig(num_classes=1, input_size=448)
  anchors, scales = generate_anchors_cycxhw(config), config.box_scale_factors
  floors = export.code_floors(config, 1.0)
  assert list(floors[:2]) == [-scales[0], -scales[1]] and floors[2] < -25
  shifted, shifted_scales = export.floored_decoding(anchors, floors, scales)
  codes = np.random.default_rng(0).uniform(-6, 6, anchors.shape).astype(np.float32)
  np.testing.assert_allclose(_decode(codes - floors, shifted, shifted_scales),
                             _decode(codes, anchors, scales), rtol=1e-4, atol=1e-5)
  # a size code at the floor: even the largest anchor's box is a pixel
  at_floor = _decode(np.zeros_like(codes), shifted, shifted_scales)
  assert at_floor[:, 2:].max() * 448 == pytest.approx(1.0, rel=1e-3)


def test_caching_the_frozen_part_measures_the_peaks_calibration_would(base_model):
  """With the top training, every unbounded activation lies in the cached trunk: the peaks
  caching measured are those int8 calibration measures on the whole extractor."""
  import tf_keras
  from model.train import ExtractorSplit
  from model.images import pixels_to_input
  from model.views import cache_features
  from tests.synthetic import textured_background
  extractor = base_model[0].feature_extractor
  split = ExtractorSplit.for_training(extractor, 'top')
  assert not export.unbounded_outputs(split.trainable)
  pixels = np.stack([textured_background(300, 300, seed=i) for i in range(3)]).astype(np.uint8)
  _, peaks = cache_features(split.frozen, pixels, batch_size=2)
  probe = tf_keras.Model(extractor.input, export.unbounded_outputs(extractor))
  inputs = pixels_to_input(pixels)
  np.testing.assert_allclose(peaks, export.peaks_of(probe(inputs)).numpy(), rtol=1e-5)
  assert peaks.shape == (3, len(export.unbounded_outputs(extractor))) and peaks.shape[1] > 20


def test_metadata_writer_adds_labels_to_each_file_handed_over(three_class_tflite):
  python = export.metadata_python()
  if python is None:
    pytest.skip('no .venv-mediapipe (bash scripts/setup.sh creates it)')
  data = three_class_tflite.read_bytes()
  with export.MetadataWriter(['apple', 'orange', 'pear'], python) as writer:
    writer.submit('first', data)
    writer.submit('second', data)
    files = writer.results()
  assert sorted(files) == ['first', 'second']
  for with_metadata in files.values():
    assert b'TFLITE_METADATA' in with_metadata and b'TFLITE_METADATA' not in data
    assert b'apple\norange\npear' in with_metadata  # labels.txt, packed into the file
    assert export.op_names(with_metadata) == export.op_names(data)


def test_metadata_writer_failure_is_an_export_error(tmp_path):
  python = export.metadata_python()
  if python is None:
    pytest.skip('no .venv-mediapipe (bash scripts/setup.sh creates it)')
  with export.MetadataWriter(['a'], python) as writer:
    writer.submit('float', b'not a tflite file')
    with pytest.raises(export.ExportError, match='metadata'):
      writer.results()


def test_int8_quantized_from_the_float_file_matches_the_converters_own(tmp_path):
  """`quantize_float` calibrates the float file itself (`export.calibrate`), then
  quantizes it as the converter's int8 path does (TensorFlow's private calls): the
  ranges it records must be those of TFLite's calibrator and its file answer as the
  converter's does."""
  from ai_edge_litert.interpreter import Interpreter
  from tensorflow.lite.python.optimize import calibrator
  from tensorflow.lite.tools import flatbuffer_utils
  from model.images import pixels_to_input
  from tests.synthetic import textured_background
  model = ssd_lib.build_ssd(SSDConfig(num_classes=2, input_size=96))
  pixels = np.stack([textured_background(96, 96, seed=i) for i in range(6)]).astype(np.uint8)
  calibration = pixels_to_input(pixels[:4])
  direct = export.convert(model, export.INT8, calibration=calibration)
  float_file = export.convert(model, export.FLOAT)
  quantized = export.quantize_float(float_file, calibration, 96)
  assert quantized != float_file and len(quantized) < len(float_file) / 2

  def ranges(calibrated):
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(calibrated))
    tensors = model.subgraphs[0].tensors
    return {t.name: (t.quantization.min[0], t.quantization.max[0]) for t in tensors
            if t.quantization is not None and t.quantization.min is not None}
  samples = export.calibration_samples(calibration, 96)
  theirs = ranges(calibrator.Calibrator(float_file).calibrate(lambda: ([s] for s in samples)))
  ours = ranges(export.calibrate(float_file, samples))
  assert ours.keys() == theirs.keys() and len(ours) > 50
  # A block's projection that feeds nothing but its residual sum takes the sum's range too.
  project = next(n for n in ours if n.startswith(b'feature_extractor/expanded_conv_4_project/'))
  total = ours[b'feature_extractor/expanded_conv_4_add/add']
  assert ours[project][0] <= total[0] and ours[project][1] >= total[1]
  for name, (low, high) in theirs.items():
    np.testing.assert_allclose(ours[name], (low, high), rtol=1e-4, atol=1e-5, err_msg=name)

  def outputs(data, image):
    interpreter = Interpreter(model_content=data)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]['index'], image[None])
    interpreter.invoke()
    return [interpreter.get_tensor(o['index']) for o in interpreter.get_output_details()]
  assert export.op_names(quantized) == export.op_names(direct)
  for image in pixels[4:]:  # images calibration never saw
    for ours_out, theirs_out in zip(outputs(quantized, image), outputs(direct, image)):
      np.testing.assert_allclose(ours_out, theirs_out, atol=0.02)
  with pytest.raises(export.ExportError, match='calibration'):
    export.quantize_float(float_file, [], 96)
