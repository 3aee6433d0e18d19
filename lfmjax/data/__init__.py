"""The data layer: datasets on the host, client partitions, on-device batches.

* `datasets`: `load_dataset(name, data_dir)` -> `Dataset` (uint8 NHWC, int32 labels)
  from Fashion-MNIST's idx files or CIFAR-10's official/image-folder formats.
* `partition`: how the train set is split over clients (IID, Dirichlet, shards, fixed)
  and the padded index table / weights a round reads.
* `sampling`: jittable per-client mini-batch indices and input preprocessing.
"""
from lfmjax.data.datasets import (CHANNEL_STATS, CIFAR10_CLASSES, FASHION_MNIST_CLASSES, Dataset,
                                  DatasetError, cache_dir, canonical_name, load_dataset)
from lfmjax.data.partition import (PARTITIONS, client_table, client_weights, dirichlet,
                                   fixed, holdout, iid, make_partition, shards)
from lfmjax.data.sampling import (NORMALIZATIONS, batch_indices, client_batch_indices,
                                  epochs_per_batch, gather, preprocess)

__all__ = [
    "CHANNEL_STATS", "CIFAR10_CLASSES", "FASHION_MNIST_CLASSES", "Dataset", "DatasetError", "cache_dir",
    "canonical_name", "load_dataset", "PARTITIONS", "client_table", "client_weights",
    "dirichlet", "fixed", "holdout", "iid", "make_partition", "shards", "NORMALIZATIONS",
    "batch_indices", "client_batch_indices", "epochs_per_batch", "gather", "preprocess",
]
