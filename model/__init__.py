"""The detector: build, restore, train, evaluate and export an SSD MobileNetV2."""

import os

# tf.keras is tf_keras (Keras 2), which this package and tf-models-official
# build on: without this, importing TensorFlow also loads Keras 3 for nothing
# (about 1 s of every process's start).
os.environ.setdefault('TF_USE_LEGACY_KERAS', '1')
