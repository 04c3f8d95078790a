"""Small shared test fixtures: a tiny segmenter and a tiny Shapes training config."""

import keras

NUM_CLASSES = 3


def tiny_segmenter(seed, num_classes=NUM_CLASSES):
    """conv -> synchronised BN -> relu -> 1x1 classifier, logits at input size."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    x = keras.layers.BatchNormalization(synchronized=True)(x)
    x = keras.layers.ReLU()(x)
    outputs = keras.layers.Conv2D(num_classes, 1)(x)
    return keras.Model(inputs, outputs)


# A Shapes run small enough for a test: 24 training images of 48x64, 8 of them labelled,
# the small backbone with narrow heads. Tests append the method and step bindings.
TINY_SHAPES_CONFIG = """
dataset.reader = @shapes()
shapes.num_train = 24
shapes.height = 48
shapes.width = 64
labels.count = 8
pipeline.batch_size = 4
pipeline.crop_size = (48, 64)
pipeline.scale_range = (1.0, 1.0)
model.arch = 'deeplabv3plus'
model.backbone = 'small'
model.aspp_channels = 16
model.decoder_channels = 16
optimizer.learning_rate = 0.01
train.verbose = 0
"""
