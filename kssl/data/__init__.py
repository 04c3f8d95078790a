"""Datasets: readers for on-disk layouts, labelled subsets, validation and tf.data pipelines."""
