"""The exported .tflite's post-processing: every class comes out, one label per object."""

import numpy as np
import pytest

from model import export, ssd as ssd_lib
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


def test_int8_calibration_leaves_out_an_image_with_outlying_activations(base_model):
  from tests.synthetic import textured_background
  model = base_model[0]
  size = model.config.input_size
  photos = [textured_background(size, size, seed=i).astype(np.float32) / 127.5 - 1.0
            for i in range(12)]
  white = np.ones((size, size, 3), np.float32)  # an overexposed frame: sums ~7x their median
  candidates = np.stack(photos[:6] + [white] + photos[6:])
  kept = export.calibration_inputs(model, candidates, count=10, outlier_ratio=3.0)
  np.testing.assert_array_equal(kept, np.stack(photos[:10]))
  everything = export.calibration_inputs(model, candidates, count=20, outlier_ratio=10.0)
  assert len(everything) == 13
