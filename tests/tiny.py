"""Small shared test fixtures: a tiny segmenter and a tiny Shapes training config."""

import keras
import tensorflow as tf

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


def eager_steps(strategy, model, batches) -> list:
    """Runs one `model.train_step` per global batch in `batches`, eagerly, and returns
    each step's logs as floats.

    Under a multi-replica strategy each replica gets its slice of the global batch, as in
    `fit`, and runs the same replica code with the same all-reduces and merge calls as the
    compiled step. Tracing a method of several networks once per replica costs a minute
    on two cores, where a few eager steps take seconds; the compiled two-replica path is
    covered by ClassMix's test (`tests/test_classmix.py`)."""
    dataset = tf.data.Dataset.from_tensors(batches[0])
    for data in batches[1:]:
        dataset = dataset.concatenate(tf.data.Dataset.from_tensors(data))
    if strategy.num_replicas_in_sync > 1:
        dataset = strategy.experimental_distribute_dataset(dataset)
    logs = []
    for data in dataset:
        out = strategy.run(model.train_step, args=(data,))
        # Reported values are global (all-reduced), identical on every replica.
        logs.append({name: float(strategy.experimental_local_results(value)[0])
                     for name, value in out.items()})
    return logs
