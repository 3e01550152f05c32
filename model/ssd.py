"""The SSD MobileNetV2 detector in tf_keras, in three named parts.

- `feature_extractor`: MobileNetV2 (depth 1.0, ReLU6) and the four extra
  layers; image in [-1, 1] -> six feature maps.
- `box_head`: six 1x1 convs -> box encodings (ty, tx, th, tw) per anchor.
- `class_head`: six 1x1 convs -> class logits per anchor, column 0 background.

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
_FIRST_MAP_BLOCK = 13
# Extra layers after Conv_1: (1x1 channels, 3x3 stride-2 channels).
_EXTRA_LAYERS = ((256, 512), (128, 256), (128, 256), (64, 128))


def _block_name(index: int) -> str:
  return 'expanded_conv' if index == 0 else f'expanded_conv_{index}'


def _conv(x, filters, kernel, stride, name, relu6=True):
  x = tf_keras.layers.Conv2D(filters, kernel, strides=stride, padding='same',
                             use_bias=True, name=name)(x)
  return tf_keras.layers.ReLU(6.0, name=f'{name}_relu6')(x) if relu6 else x


def extra_layer_names(index: int, channels: tuple[int, int]) -> tuple[str, str]:
  """Names of the 1x1 and 3x3 convs of extra layer `index` (0..3), as in the OD API."""
  squeeze, out = channels
  return (f'layer_19_1_Conv2d_{index + 2}_1x1_{squeeze}',
          f'layer_19_2_Conv2d_{index + 2}_3x3_s2_{out}')


def build_feature_extractor(input_size: int) -> tf_keras.Model:
  """MobileNetV2 + extra layers: [B, S, S, 3] in [-1, 1] -> six feature maps.

  For S = 300 the maps are 19x19x576, 10x10x1280, 5x5x512, 3x3x256, 2x2x256
  and 1x1x128.
  """
  image = tf_keras.Input((input_size, input_size, 3), name='image')
  x = _conv(image, 32, 3, 2, 'Conv')
  features = []
  in_channels = 32
  for index, (expansion, out_channels, stride) in enumerate(_INVERTED_RESIDUALS):
    name = _block_name(index)
    block_input = x
    if expansion != 1:
      x = _conv(x, in_channels * expansion, 1, 1, f'{name}_expand')
      if index == _FIRST_MAP_BLOCK:
        features.append(x)
    x = tf_keras.layers.DepthwiseConv2D(3, strides=stride, padding='same',
                                        use_bias=True, name=f'{name}_depthwise')(x)
    x = tf_keras.layers.ReLU(6.0, name=f'{name}_depthwise_relu6')(x)
    x = _conv(x, out_channels, 1, 1, f'{name}_project', relu6=False)
    if stride == 1 and in_channels == out_channels:
      x = tf_keras.layers.Add(name=f'{name}_add')([block_input, x])
    in_channels = out_channels
  x = _conv(x, 1280, 1, 1, 'Conv_1')
  features.append(x)
  for index, channels in enumerate(_EXTRA_LAYERS):
    squeeze_name, out_name = extra_layer_names(index, channels)
    x = _conv(x, channels[0], 1, 1, squeeze_name)
    x = _conv(x, channels[1], 3, 2, out_name)
    features.append(x)
  return tf_keras.Model(image, features, name='feature_extractor')


# The last backbone layer before the "top": Conv_1 and the extra layers.
TOP_INPUT_LAYER = f'{_block_name(len(_INVERTED_RESIDUALS) - 1)}_project'
FIRST_MAP_LAYER = f'{_block_name(_FIRST_MAP_BLOCK)}_expand_relu6'


def split_extractor(feature_extractor: tf_keras.Model) -> tuple[tf_keras.Model, tf_keras.Model]:
  """The extractor as (trunk, top), sharing its layers and so its weights.

  trunk: image -> [feature map 0, the last block's output (10x10x320 at 300)].
  top: that block output -> feature maps 1..5 (Conv_1 and the extra layers).
  Training `top` trains those layers of `feature_extractor` itself.
  """
  trunk = tf_keras.Model(feature_extractor.input,
                         [feature_extractor.get_layer(FIRST_MAP_LAYER).output,
                          feature_extractor.get_layer(TOP_INPUT_LAYER).output], name='trunk')
  top_input = tf_keras.Input(feature_extractor.get_layer(TOP_INPUT_LAYER).output.shape[1:])
  x = feature_extractor.get_layer('Conv_1_relu6')(feature_extractor.get_layer('Conv_1')(top_input))
  maps = [x]
  for index, channels in enumerate(_EXTRA_LAYERS):
    for name in extra_layer_names(index, channels):
      x = feature_extractor.get_layer(f'{name}_relu6')(feature_extractor.get_layer(name)(x))
    maps.append(x)
  return trunk, tf_keras.Model(top_input, maps, name='top')


class PredictionHead(tf_keras.layers.Layer):
  """One 1x1 conv per feature map, outputs flattened and concatenated.

  Args:
    anchors_per_location: anchors at each cell, per feature map.
    values_per_anchor: outputs per anchor (4 for boxes, classes + 1 for logits).
    conv_name: name stem of the convs; conv i is `{conv_name}_{i}`.
  """

  def __init__(self, anchors_per_location, values_per_anchor, conv_name,
               **kwargs):
    super().__init__(**kwargs)
    self.anchors_per_location = list(anchors_per_location)
    self.values_per_anchor = values_per_anchor
    self.conv_name = conv_name
    self.convs = [
        tf_keras.layers.Conv2D(count * values_per_anchor, 1, padding='same',
                               name=f'{conv_name}_{i}')
        for i, count in enumerate(self.anchors_per_location)
    ]

  def call(self, features):
    """features: six maps [B, H_i, W_i, C_i] -> [B, num_anchors, values_per_anchor]."""
    outputs = []
    for conv, feature in zip(self.convs, features):
      out = conv(feature)
      outputs.append(tf.reshape(out, [tf.shape(out)[0], -1, self.values_per_anchor]))
    return tf.concat(outputs, axis=1)

  def get_config(self):
    config = super().get_config()
    config.update(anchors_per_location=self.anchors_per_location,
                  values_per_anchor=self.values_per_anchor,
                  conv_name=self.conv_name)
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
                        config.num_classes + 1, 'class_logits', name='class_head')


def build_ssd(config: SSDConfig, *, feature_extractor=None, box_head=None,
              class_head=None) -> SSD:
  """Builds the detector for `config`, reusing any part passed in.

  The returned model is already built (its variables exist), so that it can
  be restored from or written to a checkpoint right away.
  """
  model = SSD(
      feature_extractor or build_feature_extractor(config.input_size),
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
