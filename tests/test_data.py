"""Tests of lfmjax.data: loaders on synthetic files in every supported format (and on
the real data where present), partitions, and on-device batch sampling."""
from __future__ import annotations

import gzip
import os
import pickle
import sys
import tarfile
import time
import types
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from lfmjax.data import datasets, partition
from lfmjax.data import (CIFAR10_CLASSES, DatasetError, batch_indices, client_table,
                         client_weights, epochs_per_batch, gather, load_dataset,
                         make_partition, preprocess)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LFMJAX_TEST_SHARED_DATA", REPO / ".." / "shared" / "data"))


@pytest.fixture(autouse=True)
def isolated_places(tmp_path, monkeypatch):
  """No test sees the user's cache, $LFMJAX_DATA_DIR or system datasets."""
  monkeypatch.setenv("LFMJAX_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.delenv("LFMJAX_DATA_DIR", raising=False)
  monkeypatch.setattr(datasets, "SYSTEM_DATA_DIRS", ())
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails


def assert_one_line(exc_info, *needles):
  message = str(exc_info.value)
  assert "\n" not in message
  for needle in needles:
    assert str(needle) in message, (needle, message)


# ------------------------------------------------------------------ synthetic files

def idx_bytes(array: np.ndarray) -> bytes:
  header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  return header + array.astype(np.uint8).tobytes()


def write_fashion_mnist(directory: Path, gz: bool = True, n_train=20, n_test=10, seed=0):
  """Synthetic idx files; returns the arrays written."""
  rng = np.random.default_rng(seed)
  directory.mkdir(parents=True, exist_ok=True)
  arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
            "train-labels-idx1-ubyte": np.arange(n_train) % 10,
            "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
            "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test)}
  for stem, array in arrays.items():
    data = idx_bytes(array)
    if gz:
      (directory / f"{stem}.gz").write_bytes(gzip.compress(data))
    else:
      (directory / stem).write_bytes(data)
  return arrays


def cifar_images(n: int, seed: int) -> np.ndarray:
  """Smooth random images, so JPEG round trips stay close."""
  rng = np.random.default_rng(seed)
  low = rng.integers(0, 256, (n, 4, 4, 3)).astype(np.uint8)
  return np.repeat(np.repeat(low, 8, axis=1), 8, axis=2)


def write_cifar_pickles(directory: Path, per_batch=3, n_test=4):
  """cifar-10-batches-py/ with tiny batches; returns (train_x, train_y, test_x, test_y)."""
  directory.mkdir(parents=True, exist_ok=True)
  out = {"train": ([], []), "test": ([], [])}
  for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
    n = n_test if name == "test_batch" else per_batch
    x = cifar_images(n, seed=i)
    y = [(i + j) % 10 for j in range(n)]
    rows = x.transpose(0, 3, 1, 2).reshape(n, 3072)  # the official CHW rows
    with open(directory / name, "wb") as f:
      pickle.dump({b"data": rows, b"labels": y, b"batch_label": name.encode()}, f)
    split = "test" if name == "test_batch" else "train"
    out[split][0].append(x)
    out[split][1].extend(y)
  return (np.concatenate(out["train"][0]), np.array(out["train"][1]),
          np.concatenate(out["test"][0]), np.array(out["test"][1]))


def write_image_tree(root: Path, ext: str, per_class=(2, 1), size=32, classes=CIFAR10_CLASSES):
  """train|test/<class>/NNNN.<ext>; returns {split: (x, y)} in the loader's order."""
  expected = {}
  for split, n in zip(("train", "test"), per_class):
    xs, ys = [], []
    for label, name in enumerate(classes):
      (root / split / name).mkdir(parents=True, exist_ok=True)
      images = cifar_images(n, seed=100 * (split == "test") + label)  # deterministic
      if size != 32:
        images = np.zeros((n, size, size, 3), np.uint8)
      for j, image in enumerate(images):
        lossless_ish = dict(quality=95, subsampling=0) if ext != "png" else {}
        Image.fromarray(image).save(root / split / name / f"{j:04d}.{ext}", **lossless_ish)
      xs.append(images)
      ys += [label] * n
    expected[split] = (np.concatenate(xs), np.array(ys))
  return expected


def tar_dir(source: Path, tarball: Path, arcname: str = "") -> Path:
  with tarfile.open(tarball, "w:gz" if tarball.name.endswith("gz") else "w") as tar:
    for child in sorted(source.iterdir()):
      tar.add(child, arcname=f"{arcname}{child.name}")
  return tarball


# ------------------------------------------------------------------------ Fashion-MNIST

@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("subdir", ["", "fashion-mnist", "fashion_mnist"])
def test_fashion_mnist_idx_formats(tmp_path, gz, subdir):
  arrays = write_fashion_mnist(tmp_path / "data" / subdir, gz=gz)
  ds = load_dataset("fmnist", tmp_path / "data", download=False, verify=False)
  assert ds.name == "fashion_mnist" and ds.num_classes == 10 and len(ds.class_names) == 10
  assert ds.train_x.shape == (20, 28, 28, 1) and ds.test_x.shape == (10, 28, 28, 1)
  assert ds.train_x.dtype == np.uint8 and ds.train_y.dtype == np.int32
  np.testing.assert_array_equal(ds.train_x[..., 0], arrays["train-images-idx3-ubyte"])
  np.testing.assert_array_equal(ds.test_y, arrays["t10k-labels-idx1-ubyte"])
  assert ds.source == str(tmp_path / "data" / subdir).rstrip("/")


def test_fashion_mnist_from_env_var(tmp_path, monkeypatch):
  write_fashion_mnist(tmp_path / "env" / "fashion_mnist")
  monkeypatch.setenv("LFMJAX_DATA_DIR", str(tmp_path / "env"))
  ds = load_dataset("Fashion-MNIST", download=False, verify=False)
  assert ds.source == str(tmp_path / "env" / "fashion_mnist")


def test_fashion_mnist_data_dir_wins_over_env_and_cache(tmp_path, monkeypatch):
  write_fashion_mnist(tmp_path / "a", n_train=30)
  write_fashion_mnist(tmp_path / "b", n_train=40)
  write_fashion_mnist(tmp_path / "cache" / "fashion-mnist", n_train=50)
  monkeypatch.setenv("LFMJAX_DATA_DIR", str(tmp_path / "b"))
  assert len(load_dataset("fashion_mnist", tmp_path / "a", verify=False).train_y) == 30
  assert len(load_dataset("fashion_mnist", verify=False).train_y) == 40
  monkeypatch.delenv("LFMJAX_DATA_DIR")
  assert len(load_dataset("fashion_mnist", verify=False).train_y) == 50


def test_fashion_mnist_wrong_checksum(tmp_path):
  write_fashion_mnist(tmp_path)
  with pytest.raises(DatasetError) as exc_info:
    load_dataset("fashion_mnist", tmp_path, download=False)  # verify=True by default
  assert_one_line(exc_info, "checksum mismatch", tmp_path, "expected SHA-256",
                  "got", "verify=False")


def test_fashion_mnist_corrupt_gz(tmp_path):
  write_fashion_mnist(tmp_path)
  path = tmp_path / "train-images-idx3-ubyte.gz"
  path.write_bytes(path.read_bytes()[:200])  # truncated mid-stream
  with pytest.raises(DatasetError) as exc_info:
    load_dataset("fashion_mnist", tmp_path, download=False, verify=False)
  assert_one_line(exc_info, path, "corrupt", "fresh copy")


@pytest.mark.parametrize("mutate, why", [
    (lambda b: b"\x00\x00\x07\x03" + b[4:], "bad magic number"),
    (lambda b: b[:-5], "data bytes"),
    (lambda b: b[:6], "truncated header")])
def test_fashion_mnist_bad_idx(tmp_path, mutate, why):
  write_fashion_mnist(tmp_path, gz=False)
  path = tmp_path / "t10k-images-idx3-ubyte"
  path.write_bytes(mutate(path.read_bytes()))
  with pytest.raises(DatasetError) as exc_info:
    load_dataset("fashion_mnist", tmp_path, download=False, verify=False)
  assert_one_line(exc_info, path, why)


def test_fashion_mnist_bad_labels(tmp_path):
  write_fashion_mnist(tmp_path, gz=False)
  (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(20, 12)))
  with pytest.raises(DatasetError) as exc_info:
    load_dataset("fashion_mnist", tmp_path, download=False, verify=False)
  assert_one_line(exc_info, "0..9")


def test_fashion_mnist_missing(tmp_path, monkeypatch):
  (tmp_path / "partial").mkdir()
  write_fashion_mnist(tmp_path / "partial")
  (tmp_path / "partial" / "t10k-labels-idx1-ubyte.gz").unlink()
  with pytest.raises(DatasetError) as exc_info:
    load_dataset("fashion_mnist", tmp_path / "partial", download=False)
  assert_one_line(exc_info, "Fashion-MNIST not found", tmp_path / "partial",
                  tmp_path / "cache" / "fashion-mnist", "lacks t10k-labels-idx1-ubyte",
                  "download disabled", "LFMJAX_DATA_DIR", "--config.data_dir",
                  "zalandoresearch/fashion-mnist")


def test_fashion_mnist_download_into_cache(tmp_path, monkeypatch):
  write_fashion_mnist(tmp_path / "mirror")
  monkeypatch.setattr(datasets, "FASHION_MNIST_URL", (tmp_path / "mirror").as_uri() + "/")
  ds = load_dataset("fashion_mnist", tmp_path / "empty", verify=False)
  cache = tmp_path / "cache" / "fashion-mnist"
  assert ds.source == str(cache) and len(ds.train_y) == 20
  assert sorted(p.name for p in cache.iterdir()) == sorted(
      f"{stem}.gz" for stem in datasets.FASHION_MNIST_SHA256)  # no temp files left


def test_fashion_mnist_bad_download_never_lands_in_cache(tmp_path, monkeypatch):
  write_fashion_mnist(tmp_path / "mirror")
  monkeypatch.setattr(datasets, "FASHION_MNIST_URL", (tmp_path / "mirror").as_uri() + "/")
  with pytest.raises(DatasetError) as exc_info:
    load_dataset("fashion_mnist", verify=True)
  assert_one_line(exc_info, "download of", "checksum mismatch")
  assert list((tmp_path / "cache" / "fashion-mnist").iterdir()) == []


def test_fashion_mnist_failed_download(tmp_path, monkeypatch):
  monkeypatch.setattr(datasets, "FASHION_MNIST_URL", (tmp_path / "nowhere").as_uri() + "/")
  with pytest.raises(DatasetError) as exc_info:
    load_dataset("fashion_mnist")
  assert_one_line(exc_info, "Fashion-MNIST not found", "failed (URLError")


# --------------------------------------------------------------------------- names

@pytest.mark.parametrize("name, canonical", [
    ("fashion_mnist", "fashion_mnist"), ("fmnist", "fashion_mnist"),
    ("Fashion-MNIST", "fashion_mnist"), ("cifar10", "cifar10"), ("CIFAR-10", "cifar10"),
    ("cifar_10", "cifar10")])
def test_dataset_aliases(name, canonical):
  assert datasets.canonical_name(name) == canonical


def test_unknown_dataset():
  with pytest.raises(DatasetError) as exc_info:
    load_dataset("mnist")
  assert_one_line(exc_info, "'mnist'", "fashion_mnist", "cifar10")


# ----------------------------------------------------------------------------- CIFAR-10

def assert_cifar(ds, expected, exact=True):
  train_x, train_y, test_x, test_y = expected
  assert ds.name == "cifar10" and ds.class_names == CIFAR10_CLASSES
  assert ds.train_x.dtype == np.uint8 and ds.train_y.dtype == np.int32
  assert ds.train_x.shape == train_x.shape and ds.test_x.shape == test_x.shape
  np.testing.assert_array_equal(ds.train_y, train_y)
  np.testing.assert_array_equal(ds.test_y, test_y)
  for got, want in ((ds.train_x, train_x), (ds.test_x, test_x)):
    if exact:
      np.testing.assert_array_equal(got, want)
    else:  # JPEG is lossy; smooth images stay close
      assert np.abs(got.astype(int) - want).mean() < 3


def test_cifar_pickle_dir(tmp_path):
  expected = write_cifar_pickles(tmp_path / "cifar-10-batches-py")
  ds = load_dataset("cifar10", tmp_path, verify=False)
  assert_cifar(ds, expected)
  assert ds.source == str(tmp_path / "cifar-10-batches-py")
  # data_dir may also be the batches directory itself.
  assert_cifar(load_dataset("cifar10", tmp_path / "cifar-10-batches-py", verify=False),
               expected)


def test_cifar_pickle_tarball_and_its_cache(tmp_path):
  expected = write_cifar_pickles(tmp_path / "src" / "cifar-10-batches-py")
  (tmp_path / "data").mkdir()
  tar_dir(tmp_path / "src", tmp_path / "data" / "cifar-10-python.tar.gz")
  ds = load_dataset("cifar-10", tmp_path / "data", verify=False)
  assert_cifar(ds, expected)
  assert "decoded cache" in ds.source
  assert len(list((tmp_path / "cache").glob("cifar10-*.npz"))) == 1
  assert_cifar(load_dataset("cifar-10", tmp_path / "data", verify=False), expected)


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_cifar_image_tree(tmp_path, ext):
  expected = write_image_tree(tmp_path / "data" / "cifar10-imgs", ext)
  ds = load_dataset("cifar10", tmp_path / "data", verify=False)
  assert_cifar(ds, (*expected["train"], *expected["test"]), exact=ext == "png")
  assert str(tmp_path / "data" / "cifar10-imgs") in ds.source


@pytest.mark.parametrize("ext, tarname, prefix", [
    ("png", "cifar10-png.tar.gz", ""), ("jpg", "cifar10-jpg.tgz", "cifar10/"),
    ("jpeg", "cifar10.tar", "")])
def test_cifar_image_tarball(tmp_path, ext, tarname, prefix):
  expected = write_image_tree(tmp_path / "tree", ext)
  (tmp_path / "data").mkdir()
  tar_dir(tmp_path / "tree", tmp_path / "data" / tarname, arcname=prefix)
  ds = load_dataset("cifar10", tmp_path / "data", verify=False)
  assert_cifar(ds, (*expected["train"], *expected["test"]), exact=ext == "png")
  assert ds.source.startswith(str(tmp_path / "data" / tarname))


def test_cifar_corrupt_cache_is_rebuilt(tmp_path):
  expected = write_image_tree(tmp_path / "tree", "png")
  (tmp_path / "data").mkdir()
  tar_dir(tmp_path / "tree", tmp_path / "data" / "cifar10-png.tar.gz")
  load_dataset("cifar10", tmp_path / "data", verify=False)
  (npz,) = (tmp_path / "cache").glob("cifar10-*.npz")
  npz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])
  with pytest.warns(UserWarning, match="rebuilding"):
    ds = load_dataset("cifar10", tmp_path / "data", verify=False)
  assert_cifar(ds, (*expected["train"], *expected["test"]))
  assert datasets._read_npz(npz, datasets._source_fingerprint(
      tmp_path / "data" / "cifar10-png.tar.gz")) is not None


def test_cifar_counts_checked_when_verifying(tmp_path):
  write_image_tree(tmp_path / "cifar10", "png")
  with pytest.raises(DatasetError) as exc_info:
    load_dataset("cifar10", tmp_path)
  assert_one_line(exc_info, "incomplete", "20 train images", "expected 50000",
                  "airplane=2", "verify=False")


def test_cifar_wrong_classes(tmp_path):
  write_image_tree(tmp_path / "cifar10", "png", classes=CIFAR10_CLASSES[:9] + ("zebra",))
  with pytest.raises(DatasetError) as exc_info:
    load_dataset("cifar10", tmp_path, verify=False)
  assert_one_line(exc_info, "zebra", "class folders", tmp_path / "cifar10")


def test_cifar_wrong_image_size(tmp_path):
  write_image_tree(tmp_path / "cifar10", "png", size=28)
  with pytest.raises(DatasetError) as exc_info:
    load_dataset("cifar10", tmp_path, verify=False)
  assert_one_line(exc_info, "28x28", "expected 32x32")


def test_cifar_corrupt_tarball(tmp_path):
  write_image_tree(tmp_path / "tree", "png")
  tarball = tar_dir(tmp_path / "tree", tmp_path / "cifar10-png.tar.gz")
  tarball.write_bytes(tarball.read_bytes()[:3000])
  with pytest.raises(DatasetError) as exc_info:
    load_dataset("cifar10", tmp_path, verify=False)
  assert_one_line(exc_info, tarball, "not a readable tar archive")


def test_cifar_missing(tmp_path, monkeypatch):
  monkeypatch.setenv("LFMJAX_DATA_DIR", str(tmp_path / "env"))
  with pytest.raises(DatasetError) as exc_info:
    load_dataset("cifar10", tmp_path / "data")
  assert_one_line(exc_info, "CIFAR-10 not found", tmp_path / "data", tmp_path / "env",
                  tmp_path / "cache", "tensorflow_datasets is not installed",
                  "cifar-10-python.tar.gz", "LFMJAX_DATA_DIR")


def test_cifar_tfds_fallback(tmp_path, monkeypatch):
  expected = write_cifar_pickles(tmp_path / "unused")
  fake = types.ModuleType("tensorflow_datasets")
  fake.load = lambda name, **kw: [(expected[0], expected[1]), (expected[2], expected[3])]
  fake.as_numpy = lambda tree: tree
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
  ds = load_dataset("cifar10", tmp_path / "data", verify=False)
  assert_cifar(ds, expected)
  assert ds.source == "tensorflow_datasets:cifar10"


# ------------------------------------------------------------------- the real data

def shared(path: str) -> Path:
  full = SHARED_DATA / path
  if not full.exists():
    pytest.skip(f"{full} is absent (set LFMJAX_TEST_SHARED_DATA to the data directory)")
  return full


def test_real_fashion_mnist():
  root = shared("fashion-mnist").parent
  ds = load_dataset("fashion_mnist", root, download=False)  # checksums verified
  assert ds.train_x.shape == (60000, 28, 28, 1) and ds.test_x.shape == (10000, 28, 28, 1)
  assert ds.train_y.min() == 0 and ds.train_y.max() == 9
  np.testing.assert_array_equal(np.bincount(ds.train_y), np.full(10, 6000))
  np.testing.assert_array_equal(np.bincount(ds.test_y), np.full(10, 1000))
  mean, std = datasets.CHANNEL_STATS["fashion_mnist"]
  np.testing.assert_allclose(ds.train_x.mean() / 255, mean, atol=1e-3)


def test_real_cifar10_jpg_tarball(tmp_path):
  """Decodes the 60,000 JPEGs once (~10 s), then reads the .npz cache."""
  tarball = shared("cifar10-jpg.tar.gz")
  ds = load_dataset("cifar10", tarball.parent, download=False)  # counts verified
  assert ds.train_x.shape == (50000, 32, 32, 3) and ds.test_x.shape == (10000, 32, 32, 3)
  np.testing.assert_array_equal(np.bincount(ds.train_y), np.full(10, 5000))
  np.testing.assert_array_equal(np.bincount(ds.test_y), np.full(10, 1000))
  assert "decoded cache" in ds.source and str(tmp_path / "cache") in ds.source
  mean, _ = datasets.CHANNEL_STATS["cifar10"]
  np.testing.assert_allclose(ds.train_x[::10].mean((0, 1, 2)) / 255, mean, atol=0.02)
  start = time.perf_counter()
  again = load_dataset("cifar10", tarball.parent, download=False)
  assert time.perf_counter() - start < 5
  np.testing.assert_array_equal(again.test_x, ds.test_x)


# ---------------------------------------------------------------------------- partitions

LABELS = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 300))  # 3000
KINDS = {"iid": {}, "dirichlet": dict(alpha=0.3, min_size=20),
         "shards": dict(classes_per_client=2), "fixed": dict(per_client=100)}


def assert_disjoint(parts, complete: bool):
  everything = np.concatenate(parts)
  assert everything.dtype == np.int64
  assert len(np.unique(everything)) == len(everything)
  assert all((np.diff(p) > 0).all() for p in parts)
  if complete:
    np.testing.assert_array_equal(np.sort(everything), np.arange(len(LABELS)))


@pytest.mark.parametrize("kind", KINDS)
def test_partitions_deterministic_and_seeded(kind):
  first = make_partition(kind, LABELS, 10, seed=1, **KINDS[kind])
  again = make_partition(kind, LABELS, 10, seed=1, **KINDS[kind])
  other = make_partition(kind, LABELS, 10, seed=2, **KINDS[kind])
  assert len(first) == 10
  assert all(np.array_equal(a, b) for a, b in zip(first, again))
  assert not all(np.array_equal(a, b) for a, b in zip(first, other))
  assert_disjoint(first, complete=kind != "fixed")


def test_iid_sizes_distribute_remainder():
  parts = partition.iid(LABELS[:1003], 10, seed=0)
  assert sorted(len(p) for p in parts) == [100] * 7 + [101] * 3
  assert_disjoint(parts, complete=False)


def test_fixed_sizes_and_limit():
  parts = partition.fixed(LABELS, 30, per_client=100, seed=0)
  assert [len(p) for p in parts] == [100] * 30
  with pytest.raises(ValueError, match="3100"):
    partition.fixed(LABELS, 31, per_client=100, seed=0)


def test_shards_give_about_k_classes():
  for k in (1, 2, 3):
    parts = partition.shards(LABELS, 10, k, seed=0)
    classes = [len(np.unique(LABELS[p])) for p in parts]
    # 300 per class and shards of 3000 / (10 k) never straddle a class for these k.
    assert max(classes) <= k and np.mean(classes) >= k - 0.5, (k, classes)


def test_dirichlet_label_skew():
  def top_class_share(alpha):
    parts = partition.dirichlet(LABELS, 10, alpha, seed=0, min_size=0)
    return np.mean([np.bincount(LABELS[p]).max() / len(p) for p in parts if len(p)])
  assert top_class_share(0.05) > 0.6
  assert top_class_share(1000.0) < 0.2


@pytest.mark.parametrize("alpha, clients, min_size", [(0.01, 100, 25), (0.001, 300, 10),
                                                      (0.05, 30, 100)])
def test_dirichlet_min_size_is_fast_even_when_adversarial(alpha, clients, min_size):
  start = time.perf_counter()
  parts = partition.dirichlet(LABELS, clients, alpha, seed=0, min_size=min_size)
  assert time.perf_counter() - start < 3
  assert min(len(p) for p in parts) >= min_size
  assert_disjoint(parts, complete=True)


def test_partition_errors():
  with pytest.raises(ValueError, match="min_size"):
    partition.dirichlet(LABELS, 100, 0.5, seed=0, min_size=31)
  with pytest.raises(ValueError, match="alpha"):
    partition.dirichlet(LABELS, 10, 0.0, seed=0)
  with pytest.raises(ValueError, match="unknown partition"):
    make_partition("pathological", LABELS, 10, seed=0)
  with pytest.raises(ValueError, match="integer"):
    partition.iid(LABELS.astype(float), 10, seed=0)


def test_client_table_and_weights():
  parts = [np.array([5, 9]), np.array([1, 2, 3, 4, 7]), np.array([0])]
  idx_CxM, sizes_C = client_table(parts)
  assert idx_CxM.dtype == np.int32 and sizes_C.dtype == np.int32
  assert idx_CxM.shape == (3, 5)
  np.testing.assert_array_equal(sizes_C, [2, 5, 1])
  for row, part, size in zip(idx_CxM, parts, sizes_C):
    np.testing.assert_array_equal(row[:size], part)
    assert set(row[size:]) <= set(part)  # pads are the client's own indices
  weights = client_weights(sizes_C)
  assert weights.dtype == np.float32
  np.testing.assert_allclose(weights, [0.25, 0.625, 0.125])
  with pytest.raises(ValueError, match="no samples"):
    client_table([np.array([1]), np.array([], np.int64)])


# ----------------------------------------------------------------------------- sampling

PAD = 999  # a sentinel in pad columns: drawing it means a pad entry was sampled


def sentinel_table(sizes):
  """Client k owns 100 k + (0..size-1); columns past its size hold PAD."""
  width = max(sizes)
  table = np.full((len(sizes), width), PAD, np.int32)
  for k, size in enumerate(sizes):
    table[k, :size] = 100 * k + np.arange(size)
  return jnp.asarray(table), jnp.asarray(sizes, jnp.int32)


@pytest.fixture(scope="module")
def sample_steps():
  """A jitted sampler and the batches of steps 0..S-1 for clients of sizes 7, 12, 5."""
  sizes, batch, steps = (7, 12, 5), 4, 30
  idx_CxM, sizes_C = sentinel_table(sizes)
  fn = jax.jit(batch_indices, static_argnames=("batch", "max_epochs"))
  key = jax.random.key(0)
  out = np.stack([fn(key, jnp.int32(s), idx_CxM, sizes_C, batch=batch) for s in range(steps)])
  return dict(fn=fn, key=key, idx_CxM=idx_CxM, sizes_C=sizes_C, sizes=sizes, batch=batch,
              out=out)


def test_batch_indices_shape_and_dtype(sample_steps):
  s = sample_steps
  chex.assert_shape(s["out"], (30, 3, 4))
  assert s["out"].dtype == np.int32
  assert PAD not in s["out"]


def test_every_epoch_is_a_permutation(sample_steps):
  s = sample_steps
  for k, size in enumerate(s["sizes"]):
    stream = s["out"][:, k].reshape(-1)  # steps x batch positions, in order
    # Batches of 4 straddle epochs of 7 and 5 samples: checks the two-epoch path.
    for e in range(len(stream) // size):
      np.testing.assert_array_equal(np.sort(stream[e * size:(e + 1) * size]),
                                    100 * k + np.arange(size))
    orders = {tuple(stream[e * size:(e + 1) * size]) for e in range(len(stream) // size)}
    assert len(orders) > 1  # a fresh order each epoch


def test_clients_get_different_orders():
  idx_CxM = jnp.tile(jnp.arange(50, dtype=jnp.int32), (4, 1))
  out = batch_indices(jax.random.key(3), 0, idx_CxM, jnp.full(4, 50, jnp.int32), 50)
  assert len({tuple(row) for row in np.asarray(out)}) == 4
  np.testing.assert_array_equal(np.sort(out, axis=1), np.tile(np.arange(50), (4, 1)))


def test_batch_indices_deterministic_and_keyed(sample_steps):
  s = sample_steps
  args = (s["idx_CxM"], s["sizes_C"])
  a = s["fn"](s["key"], jnp.int32(7), *args, batch=4)
  np.testing.assert_array_equal(a, s["out"][7])
  b = s["fn"](jax.random.key(1), jnp.int32(7), *args, batch=4)
  assert not np.array_equal(a, b)
  keys = jax.random.split(jax.random.key(0), 5)
  many = jax.jit(jax.vmap(lambda k: batch_indices(k, jnp.int32(7), *args, 4)))(keys)
  chex.assert_shape(many, (5, 3, 4))
  np.testing.assert_array_equal(many[0], batch_indices(keys[0], 7, *args, 4))
  # Raw uint32 keys work too.
  chex.assert_shape(batch_indices(jax.random.PRNGKey(0), 7, *args, 4), (3, 4))


def test_batches_larger_than_a_client():
  sizes, batch = (3, 8), 8
  idx_CxM, sizes_C = sentinel_table(sizes)
  max_epochs = epochs_per_batch(sizes, batch)
  assert max_epochs == 4  # 1 + ceil(7 / 3)
  fn = jax.jit(batch_indices, static_argnames=("batch", "max_epochs"))
  out = np.stack([fn(jax.random.key(0), jnp.int32(s), idx_CxM, sizes_C, batch=batch,
                     max_epochs=max_epochs) for s in range(3)])
  stream = out[:, 0].reshape(-1)
  for e in range(len(stream) // 3):
    np.testing.assert_array_equal(np.sort(stream[3 * e:3 * e + 3]), [0, 1, 2])
  # With too few epochs computed, samples are still the client's own.
  short = batch_indices(jax.random.key(0), 1, idx_CxM, sizes_C, batch)
  assert set(np.asarray(short[0])) <= {0, 1, 2}


def test_gather_keeps_uint8():
  x_N = jnp.arange(40, dtype=jnp.uint8).reshape(10, 2, 2, 1)
  got = gather(x_N, jnp.array([[0, 3], [9, 9]]))
  chex.assert_shape(got, (2, 2, 2, 2, 1))
  assert got.dtype == jnp.uint8
  np.testing.assert_array_equal(got[1, 0], x_N[9])


# -------------------------------------------------------------------------- preprocess

def test_preprocess_modes():
  x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 3, 8, 8, 1)), jnp.uint8)
  x_model, x01 = jax.jit(lambda x: preprocess(x, resize_to=None, channels=None,
                                              normalize="none"))(x)
  assert x_model.dtype == jnp.float32
  np.testing.assert_allclose(x01, np.asarray(x) / 255, rtol=1e-6)
  np.testing.assert_array_equal(x_model, x01)
  pm1, _ = preprocess(x, resize_to=None, channels=None, normalize="pm1")
  np.testing.assert_allclose(pm1, 2 * x01 - 1, atol=1e-6)
  assert pm1.min() >= -1 and pm1.max() <= 1
  std, _ = preprocess(x, resize_to=None, channels=3, normalize="standard",
                      mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.25))
  chex.assert_shape(std, (2, 3, 8, 8, 3))
  np.testing.assert_allclose(std[..., 2], (x01[..., 0] - 0.3) / 0.25, rtol=1e-5)


def test_preprocess_resize_and_channels():
  x = jnp.full((4, 28, 28, 1), 200, jnp.uint8)
  x_model, x01 = preprocess(x, resize_to=32, channels=3, normalize="pm1")
  chex.assert_shape([x_model, x01], (4, 32, 32, 3))
  np.testing.assert_allclose(x01, 200 / 255, rtol=1e-5)  # a constant stays constant
  assert float(x01.min()) >= 0 and float(x01.max()) <= 1


def test_preprocess_errors():
  x = jnp.zeros((2, 8, 8, 3), jnp.uint8)
  with pytest.raises(ValueError, match="mean"):
    preprocess(x, resize_to=None, channels=None, normalize="standard")
  with pytest.raises(ValueError, match="unknown normalize"):
    preprocess(x, resize_to=None, channels=None, normalize="zscore")
  with pytest.raises(ValueError, match="channels"):
    preprocess(x, resize_to=None, channels=1, normalize="none")


def test_holdout_is_a_seeded_disjoint_split():
  import lfmjax.data as data_lib
  kept, held = data_lib.holdout(100, 30, seed=4)
  assert len(held) == 30 and len(kept) == 70
  assert sorted(np.concatenate([kept, held]).tolist()) == list(range(100))
  again = data_lib.holdout(100, 30, seed=4)
  np.testing.assert_array_equal(held, again[1])
  assert not np.array_equal(held, data_lib.holdout(100, 30, seed=5)[1])
  with pytest.raises(ValueError, match="cannot hold out 100 of 100"):
    data_lib.holdout(100, 100, seed=0)

