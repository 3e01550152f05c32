"""Adds TFLite metadata (labels, input normalization) to an exported detector.

MediaPipe's ObjectDetector (and the TFLite Task Library) load a detection
.tflite only with this metadata. The writer is MediaPipe's, which cannot share
an environment with tensorflow-model-optimization, so this module runs in the
small second environment set-up creates (`.venv-mediapipe/`), imports neither
TensorFlow nor the rest of `model/`, and is called as:

  .venv-mediapipe/bin/python -m model.tflite_metadata IN.tflite OUT.tflite [IN OUT ...] \
      --labels labels.txt

Several files go in one call: starting MediaPipe costs about a second. Without
files it reads "IN<tab>OUT" lines from stdin, so that an export can start it
before its first conversion and hand each file over as it is converted.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import types

# The metadata writer asks a compiled helper, missing from mediapipe's wheels
# since 0.10.30, for the minimum parser version the metadata needs. Everything
# this writer emits (object detector with NMS outputs, label file, input
# normalization) is readable by parsers from 1.0.0 on.
MIN_PARSER_VERSION = '1.0.0'


def _supply_version_helper() -> None:
  name = 'mediapipe.tasks.cc.metadata.python._pywrap_metadata_version'
  if name in sys.modules:
    return
  try:
    __import__(name)
    return
  except ImportError:
    pass
  helper = types.ModuleType(name)
  helper.GetMinimumMetadataParserVersion = lambda metadata_buf: MIN_PARSER_VERSION
  for parent in ('mediapipe.tasks.cc', 'mediapipe.tasks.cc.metadata',
                 'mediapipe.tasks.cc.metadata.python'):
    sys.modules.setdefault(parent, types.ModuleType(parent))
  sys.modules[name] = helper


def with_metadata(model: bytes, labels: list[str]) -> bytes:
  """The model with object-detector metadata: labels and the [-1, 1] input normalization.

  The normalization (x - 127.5) / 127.5 is what a float32 input needs; for a
  uint8 input the file's quantization already maps pixels to [-1, 1] and
  readers skip it.
  """
  _supply_version_helper()
  from mediapipe.tasks.python.metadata.metadata_writers import metadata_writer, object_detector
  writer = object_detector.MetadataWriter.create_for_models_with_nms(
      model, input_norm_mean=[127.5], input_norm_std=[127.5],
      labels=metadata_writer.Labels().add(labels))
  model_with_metadata, _ = writer.populate()  # (bytes, metadata as JSON)
  del writer  # its __del__ cleans a temp dir; at interpreter exit that fails noisily
  return bytes(model_with_metadata)


def _load_writer() -> None:
  """Imports MediaPipe's writer (about a second)."""
  _supply_version_helper()
  importlib.import_module('mediapipe.tasks.python.metadata.metadata_writers.object_detector')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('files', nargs='*', metavar='IN OUT',
                      help='pairs of input and output paths; none: read "IN<tab>OUT" lines '
                           'from stdin')
  parser.add_argument('--labels', required=True, help='labels.txt, one real label per line')
  args = parser.parse_args(argv)
  if len(args.files) % 2:
    parser.error('give the files as pairs: IN OUT [IN OUT ...]')
  with open(args.labels) as file:
    labels = [line.rstrip('\n') for line in file if line.strip()]
  if args.files:
    pairs = zip(args.files[::2], args.files[1::2])
  else:
    _load_writer()  # while the caller is still converting its first file
    pairs = (line.rstrip('\n').split('\t') for line in sys.stdin if line.strip())
  for source, target in pairs:
    with open(source, 'rb') as file:
      model = file.read()
    with open(target, 'wb') as file:
      file.write(with_metadata(model, labels))
  return 0


if __name__ == '__main__':
  sys.exit(main())
