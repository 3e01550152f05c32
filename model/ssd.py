"""The SSD MobileNetV2 detector in tf_keras, in three named parts.

- `feature_extractor`: MobileNetV2 (depth 1.0, ReLU6) and the four extra
  layers; image in [-1, 1] -> six feature maps, then (`SSDConfig.colour`) the
  image's mean colour over each map's cells (`colour_maps`).
- `box_head`: six 1x1 convs -> box encodings (ty, tx, th, tw) per anchor.
- `class_head`: six 1x1 convs -> class logits per anchor, column 0 background;
  with colour maps, six more convs on them (`SSDConfig.colour_kernel` square:
  3x3 reads the cells around each anchor's too), added (zero where nothing
  trained them: the base's head, a fresh column).

Batch norm is folded into every convolution's kernel and bias (as in the
pretrained .tflite), so there is no batch-norm state to freeze or to drift on
small batches. Layer names follow the TF Object Detection API scopes, with
`FeatureExtractor/MobilenetV2/` dropped and `/` written as `_`.
"""

from __future__ import annotations

import tensorflow as tf
import tf_keras

from model.config import SSDConfig

# MobileNetV2 inverted residual blocks after the stem: (expansion, out channels, stride).
_INVERTED_RESIDUALS = (
    (1, 16, 1),                                      # expanded_conv
    (6, 24, 2), (6, 24, 1),                          # expanded_conv_1, _2
    (6, 32, 2), (6, 32, 1), (6, 32, 1),              # _3 .. _5
    (6, 64, 2), (6, 64, 1), (6, 64, 1), (6, 64, 1),  # _6 .. _9
    (6, 96, 1), (6, 96, 1), (6, 96, 1),              # _10 .. _12
    (6, 160, 2), (6, 160, 1), (6, 160, 1),           # _13 .. _15
    (6, 320, 1),                                     # _16
)
# Block whose expansion output (before its stride-2 depthwise) is feature map 0.
FIRST_MAP_BLOCK = 13
FIRST_MAP_LAYER = f'expanded_conv_{FIRST_MAP_BLOCK}_expand_relu6'
# Extra layers after Conv_1: (1x1 channels, 3x3 stride-2 channels).
_EXTRA_LAYERS = ((256, 512), (128, 256), (128, 256), (64, 128))
# Channels of the six feature maps, at any input size: block 13's expansion,
# Conv_1, the extra layers.
FEATURE_CHANNELS = (
    _INVERTED_RESIDUALS[FIRST_MAP_BLOCK][0] * _INVERTED_RESIDUALS[FIRST_MAP_BLOCK - 1][1],
    1280, *(out for _, out in _EXTRA_LAYERS))


def _block_name(index: int) -> str:
  return 'expanded_conv' if index == 0 else f'expanded_conv_{index}'


class _Layers:
  """Makes the extractor's layers by name, or, given a built extractor, hands back
  its layers of those names: a model that replays part of it shares its weights."""

  def __init__(self, existing: tf_keras.Model | None = None):
    self.existing = existing

  def _get(self, name, make):
    return self.existing.get_layer(name) if self.existing is not None else make()

  def conv(self, x, filters, kernel, stride, name, relu6=True):
    x = self._get(name, lambda: tf_keras.layers.Conv2D(
        filters, kernel, strides=stride, padding='same', use_bias=True, name=name))(x)
    return self.relu6(x, f'{name}_relu6') if relu6 else x

  def depthwise(self, x, stride, name):
    x = self._get(name, lambda: tf_keras.layers.DepthwiseConv2D(
        3, strides=stride, padding='same', use_bias=True, name=name))(x)
    return self.relu6(x, f'{name}_relu6')

  def relu6(self, x, name):
    return self._get(name, lambda: tf_keras.layers.ReLU(6.0, name=name))(x)

  def add(self, a, b, name):
    return self._get(name, lambda: tf_keras.layers.Add(name=name))([a, b])


def extra_layer_names(index: int, channels: tuple[int, int]) -> tuple[str, str]:
  """Names of the 1x1 and 3x3 convs of extra layer `index` (0..3), as in the OD API."""
  squeeze, out = channels
  return (f'layer_19_1_Conv2d_{index + 2}_1x1_{squeeze}',
          f'layer_19_2_Conv2d_{index + 2}_3x3_s2_{out}')


def _block_channels(index: int) -> int:
  """Channels entering inverted residual block `index` (the stem gives 32)."""
  return 32 if index == 0 else _INVERTED_RESIDUALS[index - 1][1]


def _blocks_and_extras(x, first_block: int, layers: _Layers) -> list:
  """Blocks `first_block`.. of MobileNetV2, Conv_1 and the extra layers on `x`.

  Returns the feature maps made on the way: all six when `first_block` is at
  most the first map's block, else maps 1..5.
  """
  features = []
  for index in range(first_block, len(_INVERTED_RESIDUALS)):
    expansion, out_channels, stride = _INVERTED_RESIDUALS[index]
    name, in_channels, block_input = _block_name(index), _block_channels(index), x
    if expansion != 1:
      x = layers.conv(x, in_channels * expansion, 1, 1, f'{name}_expand')
      if index == FIRST_MAP_BLOCK:
        features.append(x)
    x = layers.depthwise(x, stride, f'{name}_depthwise')
    x = layers.conv(x, out_channels, 1, 1, f'{name}_project', relu6=False)
    if stride == 1 and in_channels == out_channels:
      x = layers.add(block_input, x, f'{name}_add')
  x = layers.conv(x, 1280, 1, 1, 'Conv_1')
  features.append(x)
  for index, channels in enumerate(_EXTRA_LAYERS):
    squeeze_name, out_name = extra_layer_names(index, channels)
    x = layers.conv(x, channels[0], 1, 1, squeeze_name)
    x = layers.conv(x, channels[1], 3, 2, out_name)
    features.append(x)
  return features


def build_feature_extractor(input_size: int, colour: bool = False) -> tf_keras.Model:
  """MobileNetV2 + extra layers: [B, S, S, 3] in [-1, 1] -> six feature maps,
  and with `colour` the six `colour_maps` after them.

  For S = 300 the maps are 19x19x576, 10x10x1280, 5x5x512, 3x3x256, 2x2x256
  and 1x1x128.
  """
  image = tf_keras.Input((input_size, input_size, 3), name='image')
  layers = _Layers()
  x = layers.conv(image, 32, 3, 2, 'Conv')
  maps = _blocks_and_extras(x, 0, layers)
  return tf_keras.Model(image, maps + (colour_maps(image) if colour else []),
                        name='feature_extractor')


# Map 0's stride: its cells are 16x16 pixels.
FIRST_MAP_STRIDE = 16


def colour_maps(image) -> list:
  """The image's mean colour [B, H_i, W_i, 3] over the cells of each of the six maps.

  MobileNetV2's frozen blocks hand on little of an object's colour (trained on
  natural images, a red and a yellow ball are both balls): labels told apart
  by colour need it from the pixels. Average pools with SAME padding round
  up as the network's stride-2 convs do, so the sides match the maps'.
  """
  x = tf_keras.layers.AveragePooling2D(FIRST_MAP_STRIDE, padding='same', name='colour_0')(image)
  maps = [x]
  for index in range(1, len(FEATURE_CHANNELS)):
    x = tf_keras.layers.AveragePooling2D(2, padding='same', name=f'colour_{index}')(x)
    maps.append(x)
  return maps


def split_colours(features: list) -> tuple[list, list]:
  """(the six feature maps, the colour maps after them, if any): the extractor's
  outputs as the heads and what caches them read them."""
  return features[:len(FEATURE_CHANNELS)], features[len(FEATURE_CHANNELS):]


def _block_output_layer(index: int) -> str:
  """The layer whose output leaves inverted residual block `index`."""
  _, out_channels, stride = _INVERTED_RESIDUALS[index]
  residual = stride == 1 and _block_channels(index) == out_channels
  return f'{_block_name(index)}_{"add" if residual else "project"}'


# What trains of the extractor, by `TrainConfig.trainable`: the first block
# that trains. 'top' is Conv_1 and the four extra layers (maps 1..5); 'upper'
# also blocks 13..16, whose first expansion is map 0, so every map adapts;
# 'most' also blocks 6..12, from the first at stride 16: only the stride-8
# stem stays frozen (blocks 0..12 hand on little of an object's colour).
FIRST_TRAINED_BLOCK = {'top': len(_INVERTED_RESIDUALS), 'upper': FIRST_MAP_BLOCK, 'most': 6}


def split_extractor(feature_extractor: tf_keras.Model, first_block: int = FIRST_TRAINED_BLOCK['top']
                    ) -> tuple[tf_keras.Model, tf_keras.Model]:
  """The extractor as (trunk, tail) at block `first_block`, sharing its layers and weights.

  trunk: image -> the output of block `first_block - 1`, preceded by feature
  map 0 when that map is made below the cut (the cut above its block) and
  followed by the colour maps, if the extractor makes them.
  tail: that block output -> the maps made above the cut (all six, or 1..5).
  Training `tail` trains those layers of `feature_extractor` itself.
  """
  cut = feature_extractor.get_layer(_block_output_layer(first_block - 1)).output
  below = [feature_extractor.get_layer(FIRST_MAP_LAYER).output] if first_block > FIRST_MAP_BLOCK else []
  _, colours = split_colours(feature_extractor.outputs)  # cached with the cut
  trunk = tf_keras.Model(feature_extractor.input, [*below, cut, *colours], name='trunk')
  tail_input = tf_keras.Input(cut.shape[1:])
  tail = tf_keras.Model(tail_input, _blocks_and_extras(tail_input, first_block,
                                                      _Layers(feature_extractor)), name='tail')
  return trunk, tail


class PredictionHead(tf_keras.layers.Layer):
  """One 1x1 conv per feature map (and one per colour map), outputs flattened and concatenated.

  Args:
    anchors_per_location: anchors at each cell, per feature map.
    values_per_anchor: outputs per anchor (4 for boxes, classes + 1 for logits).
    conv_name: name stem of the convs; conv i is `{conv_name}_{i}`.
    colour: also a conv (no bias, zeros at first) per colour map
      (`colour_maps`, after the six feature maps in the input), added;
      `{conv_name}_colour_{i}`. A head without reads only the feature maps.
    colour_kernel: the side of those convs.
  """

  def __init__(self, anchors_per_location, values_per_anchor, conv_name,
               colour: bool = False, colour_kernel: int = 1, **kwargs):
    super().__init__(**kwargs)
    self.anchors_per_location = list(anchors_per_location)
    self.values_per_anchor = values_per_anchor
    self.conv_name = conv_name
    self.colour = colour
    self.colour_kernel = colour_kernel
    self.convs = [
        tf_keras.layers.Conv2D(count * values_per_anchor, 1, padding='same',
                               name=f'{conv_name}_{i}')
        for i, count in enumerate(self.anchors_per_location)
    ]
    self.colour_convs = [
        tf_keras.layers.Conv2D(count * values_per_anchor, colour_kernel, padding='same',
                               use_bias=False, kernel_initializer='zeros',
                               name=f'{conv_name}_colour_{i}')
        for i, count in enumerate(self.anchors_per_location)
    ] if colour else []

  def call(self, features):
    """features: six maps [B, H_i, W_i, C_i] (and the colour maps) -> [B, num_anchors,
    values_per_anchor]."""
    outputs = []
    maps, colours = split_colours(features)
    for i, (conv, feature) in enumerate(zip(self.convs, maps)):
      out = conv(feature)
      if self.colour_convs:
        out = out + self.colour_convs[i](colours[i])
      outputs.append(tf.reshape(out, [tf.shape(out)[0], -1, self.values_per_anchor]))
    return tf.concat(outputs, axis=1)

  def get_config(self):
    config = super().get_config()
    config.update(anchors_per_location=self.anchors_per_location,
                  values_per_anchor=self.values_per_anchor,
                  conv_name=self.conv_name, colour=self.colour,
                  colour_kernel=self.colour_kernel)
    return config


class SSD(tf_keras.Model):
  """Feature extractor + box head + class head.

  Call it on images [B, S, S, 3] float32 in [-1, 1]; it returns a dict with
  `box_encodings` [B, N, 4] (ty, tx, th, tw) and `class_logits` [B, N, C + 1]
  (column 0 is the background), N the number of anchors.
  """

  def __init__(self, feature_extractor, box_head, class_head, config, **kwargs):
    super().__init__(**kwargs)
    self.feature_extractor = feature_extractor
    self.box_head = box_head
    self.class_head = class_head
    self.config = config

  def get_config(self):
    return {'num_classes': self.config.num_classes, 'input_size': self.config.input_size}

  def call(self, images, training=False):
    features = self.feature_extractor(images, training=training)
    return {
        'box_encodings': self.box_head(features),
        'class_logits': self.class_head(features),
    }


def build_box_head(config: SSDConfig) -> PredictionHead:
  return PredictionHead(config.anchors.anchors_per_location(), 4,
                        'box_encoding', name='box_head')


def build_class_head(config: SSDConfig) -> PredictionHead:
  return PredictionHead(config.anchors.anchors_per_location(),
                        config.num_classes + 1, 'class_logits', colour=config.colour,
                        colour_kernel=config.colour_kernel, name='class_head')


def load_class_head(config: SSDConfig, checkpoint_prefix) -> PredictionHead:
  """The class head alone, restored from a checkpoint of the three parts (the
  base's or a run's): what a new model's columns start from, without building
  and restoring an extractor (a second of each iteration).

  Raises:
    AssertionError / ValueError / tf.errors.OpError: a checkpoint without a matching class head.
  """
  head = build_class_head(config)
  colours = [tf.zeros([1, 1, 1, 3])] * len(FEATURE_CHANNELS) if config.colour else []
  head([tf.zeros([1, 1, 1, channels]) for channels in FEATURE_CHANNELS] + colours)  # any size
  tf.train.Checkpoint(class_head=head).read(str(checkpoint_prefix)).expect_partial(
  ).assert_existing_objects_matched()
  return head


def build_ssd(config: SSDConfig, *, feature_extractor=None, box_head=None,
              class_head=None) -> SSD:
  """Builds the detector for `config`, reusing any part passed in.

  The returned model is already built (its variables exist), so that it can
  be restored from or written to a checkpoint right away.
  """
  model = SSD(
      feature_extractor or build_feature_extractor(config.input_size, config.colour),
      box_head or build_box_head(config),
      class_head or build_class_head(config),
      config,
      name='ssd')
  model(tf.zeros([1, config.input_size, config.input_size, 3]))
  return model


def checkpoint_for(model: SSD, *, parts=('feature_extractor', 'box_head',
                                         'class_head')) -> tf.train.Checkpoint:
  """A checkpoint object naming only `parts` of `model`.

  Writing it saves those parts; restoring through it restores exactly those
  and leaves the others as they are (the few-shot "fake checkpoint").
  """
  return tf.train.Checkpoint(**{part: getattr(model, part) for part in parts})
