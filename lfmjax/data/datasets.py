"""Loading Fashion-MNIST and CIFAR-10 from local files into uint8 NHWC arrays.

`load_dataset(name, data_dir)` finds a dataset in the usual places, reads it in one of
its official formats, checks what it read (checksums, shapes, labels, counts) and
returns a `Dataset`. Anything missing or corrupt raises `DatasetError` with a single
line naming the file or the places looked in and how to provide the data.

Search order (first hit wins; a hit that turns out corrupt is an error, not a reason
to fall through to the next place, so a broken copy is never silently shadowed):

* Fashion-MNIST (the four idx files, `.gz` or uncompressed): `data_dir`,
  `$LFMJAX_DATA_DIR` (each the directory itself or its `fashion-mnist/` or
  `fashion_mnist/` subdir), Debian's `/usr/share/datasets/fashion-mnist`, the cache
  `${LFMJAX_CACHE_DIR:-~/.cache/lfmjax}/fashion-mnist`, then a download into the cache.
* CIFAR-10: in `data_dir`, `$LFMJAX_DATA_DIR`, the cache dir: `cifar-10-batches-py/`,
  `cifar-10-python.tar.gz`, `cifar10*/` image trees (`train|test/<class>/*.png|jpg`),
  `cifar10*.tar|.tar.gz|.tgz` image tarballs; then tensorflow-datasets if installed.
  Tarballs and image trees are decoded once and cached as an `.npz` in the cache dir.

`verify=True` (the default) demands the official data: the SHA-256 of every
uncompressed Fashion-MNIST file and the full CIFAR-10 counts (50000/10000, 5000/1000 a
class). `verify=False` skips those for subsets and synthetic test data; the structural
checks (idx headers, NHWC shapes, label range, class folders) always apply.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import re
import tarfile
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

ENV_DATA_DIR = "LFMJAX_DATA_DIR"
ENV_CACHE_DIR = "LFMJAX_CACHE_DIR"
# Where distributions install datasets (Debian's `fashion-mnist` package); a tuple so
# tests can empty it.
SYSTEM_DATA_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets"),)
HOW_TO_PASS = f"pass --config.data_dir=DIR or set {ENV_DATA_DIR}"

FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_HOME = "https://github.com/zalandoresearch/fashion-mnist"
DOWNLOAD_TIMEOUT_S = 15.0
# SHA-256 of the UNCOMPRESSED official files: gzip headers carry mtimes and names,
# so the .gz bytes of equal data may differ between mirrors; the contents may not.
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
FASHION_MNIST_COUNTS = {"train": 60000, "test": 10000}

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
CIFAR10_COUNTS = {"train": 50000, "test": 10000}
CIFAR10_SHAPE = (32, 32, 3)
CIFAR10_BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)),
                   "test": ("test_batch",)}
# Per-channel mean and std of x/255 over the official train splits, for
# preprocess(normalize="standard"). (The JPEG re-encoding of CIFAR-10 shifts them by
# < 0.002.)
CHANNEL_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
# Bumped whenever the layout of the decoded .npz cache changes.
CACHE_FORMAT = 1

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_CIFAR_NAME = re.compile(r"^cifar[-_]?10", re.IGNORECASE)
# `<anything>/train|test/<class>/<file>.png|jpg|jpeg` inside a tarball.
_IMAGE_MEMBER = re.compile(r"(?:^|/)(train|test)/([^/]+)/([^/]+\.(?:png|jpe?g))$",
                           re.IGNORECASE)


class DatasetError(ValueError):
  """A dataset is missing or corrupt; the message is one line that says how to fix it."""

  def __init__(self, message: str):
    # One line keeps CLI errors and log greps readable; flatten whatever got in.
    super().__init__(" ".join(str(message).split("\n")))


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: arrays have no bool ==
class Dataset:
  """A train/test split as host arrays: images uint8 N x H x W x C, labels int32 N."""
  name: str
  train_x: np.ndarray
  train_y: np.ndarray
  test_x: np.ndarray
  test_y: np.ndarray
  num_classes: int
  class_names: tuple[str, ...]
  source: str  # where it was read from (a directory, an archive, a cache file)
  # "images" (uint8 N x H x W x C, a label per sample) or "tokens" (a text corpus:
  # uint8 N x T byte windows, int32 N x T next-byte targets, `lfmjax.data.text`).
  kind: str = "images"
  # A group per train sample (a book of a text corpus), which the `groups` partition
  # deals out to clients; None: the labels are the only grouping.
  train_groups: np.ndarray | None = None
  group_names: tuple[str, ...] = ()

  @property
  def image_shape(self) -> tuple[int, ...]:
    return tuple(self.train_x.shape[1:])

  @property
  def tokens(self) -> bool:
    return self.kind == "tokens"


_ALIASES = {"fashionmnist": "fashion_mnist", "fmnist": "fashion_mnist",
            "cifar10": "cifar10", "kjv": "kjv", "bible": "kjv", "kingjames": "kjv",
            "kjvpublic": "kjv_public"}


def canonical_name(name: str) -> str:
  """'fmnist', 'Fashion-MNIST', 'cifar-10', ... -> 'fashion_mnist' or 'cifar10'."""
  key = re.sub(r"[-_\s]", "", str(name).lower())
  if key not in _ALIASES:
    raise DatasetError(f"unknown dataset {name!r}; valid names: 'fashion_mnist' "
                       f"(aliases fmnist, fashion-mnist), 'cifar10' (alias cifar-10), "
                       f"'kjv' (text; alias bible) and 'kjv_public'")
  return _ALIASES[key]


def dataset_kind(name: str) -> str:
  """'tokens' for the text corpora (`lfmjax.data.text`), else 'images'."""
  return "tokens" if canonical_name(name) in ("kjv", "kjv_public") else "images"


def load_dataset(name: str, data_dir: str | os.PathLike | None = None,
                 download: bool = True, *, verify: bool = True, seq_len: int = 128) -> Dataset:
  """Loads 'fashion_mnist' or 'cifar10' (see the module docstring for where from).

  `download` allows fetching Fashion-MNIST into the cache and tensorflow-datasets to
  download CIFAR-10. `verify=False` skips the checks that only official data passes
  (checksums, full counts), for subsets and synthetic data.
  """
  match canonical_name(name):
    case "fashion_mnist":
      return _load_fashion_mnist(data_dir, download, verify)
    case "cifar10":
      return _load_cifar10(data_dir, download, verify)
    case "kjv" | "kjv_public" as text:
      from lfmjax.data.text import load_text_dataset
      return load_text_dataset(text, data_dir, seq_len=seq_len, verify=verify)
  raise AssertionError(name)  # canonical_name returns one of the above


# ----------------------------------------------------------------------------- places

def cache_dir() -> Path:
  """`$LFMJAX_CACHE_DIR`, else `~/.cache/lfmjax` (not created here)."""
  return Path(os.environ.get(ENV_CACHE_DIR) or "~/.cache/lfmjax").expanduser()


def _user_roots(data_dir) -> list[Path]:
  """`data_dir` then `$LFMJAX_DATA_DIR`, where given."""
  roots = [data_dir, os.environ.get(ENV_DATA_DIR)]
  return _dedupe(Path(r).expanduser() for r in roots if r)


def _dedupe(paths) -> list[Path]:
  out: list[Path] = []
  for p in paths:
    if p not in out:
      out.append(p)
  return out


def _shown(paths: list[Path]) -> str:
  return ", ".join(str(p) for p in paths) if paths else "(nowhere)"


# --------------------------------------------------------------------- Fashion-MNIST

def _load_fashion_mnist(data_dir, download: bool, verify: bool) -> Dataset:
  cache = cache_dir() / "fashion-mnist"
  places = [d for root in _user_roots(data_dir)
            for d in (root, root / "fashion-mnist", root / "fashion_mnist")]
  places += [root / "fashion-mnist" for root in SYSTEM_DATA_DIRS] + [cache]
  places = _dedupe(places)
  partial = []
  for place in places:
    files, missing = _find_idx_files(place)
    if not missing:
      return _read_fashion_mnist(files, place, verify)
    if files:
      partial.append(f"{place} lacks {', '.join(missing)}")
  why = "download disabled"
  if download:
    try:
      _download_fashion_mnist(cache, verify)
      return _read_fashion_mnist(_find_idx_files(cache)[0], cache, verify)
    except (OSError, urllib.error.URLError, ValueError) as exc:
      if isinstance(exc, DatasetError):
        raise
      why = f"download from {FASHION_MNIST_URL} failed ({type(exc).__name__}: {exc})"
  partial_note = f" ({'; '.join(partial)})" if partial else ""
  raise DatasetError(
      f"Fashion-MNIST not found: looked in {_shown(places)}{partial_note} and {why}; "
      f"put the four idx .gz files ({', '.join(f + '.gz' for f in FASHION_MNIST_SHA256)}) "
      f"from {FASHION_MNIST_HOME} in a directory and {HOW_TO_PASS}")


def _find_idx_files(place: Path) -> tuple[dict[str, Path], list[str]]:
  """The idx files in `place` (`name.gz` preferred over `name`), and the missing names."""
  found, missing = {}, []
  for stem in FASHION_MNIST_SHA256:
    for candidate in (place / f"{stem}.gz", place / stem):
      if candidate.is_file():
        found[stem] = candidate
        break
    else:
      missing.append(stem)
  return found, missing


def _read_fashion_mnist(files: dict[str, Path], place: Path, verify: bool) -> Dataset:
  for path in files.values():  # header and size first: nothing large is read blindly
    _check_idx_header(path)
  arrays = {stem: _parse_idx(_read_maybe_gz(path, FASHION_MNIST_SHA256[stem] if verify
                                            else None), path)
            for stem, path in files.items()}
  split = {}
  for name, prefix in (("train", "train"), ("test", "t10k")):
    x, y = arrays[f"{prefix}-images-idx3-ubyte"], arrays[f"{prefix}-labels-idx1-ubyte"]
    where = files[f"{prefix}-images-idx3-ubyte"]
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
      raise DatasetError(f"Fashion-MNIST {name} split in {place} is inconsistent: images "
                         f"{x.shape}, labels {y.shape}; replace the files with the "
                         f"originals from {FASHION_MNIST_HOME}")
    if verify and x.shape != (FASHION_MNIST_COUNTS[name], 28, 28):
      raise DatasetError(f"{where} has shape {x.shape}, expected "
                         f"({FASHION_MNIST_COUNTS[name]}, 28, 28); replace it with the "
                         f"original from {FASHION_MNIST_HOME}")
    split[name] = (x[..., None].astype(np.uint8), _checked_labels(y, 10, where))
  return Dataset("fashion_mnist", *split["train"], *split["test"], num_classes=10,
                 class_names=FASHION_MNIST_CLASSES, source=str(place))


def _checked_labels(y: np.ndarray, num_classes: int, where) -> np.ndarray:
  if y.size and (y.min() < 0 or y.max() >= num_classes):
    raise DatasetError(f"labels in {where} range over {y.min()}..{y.max()}, expected "
                       f"0..{num_classes - 1}; the file is corrupt, replace it")
  return y.astype(np.int32)


def _read_maybe_gz(path: Path, sha256: str | None, gz: bool | None = None) -> bytes:
  """The uncompressed bytes of `path` (gzip if `gz`, default: if named *.gz), checked
  against `sha256` when one is given."""
  try:
    raw = path.read_bytes()
    if path.suffix == ".gz" if gz is None else gz:
      raw = gzip.decompress(raw)
  except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
    raise DatasetError(f"{path} is unreadable or corrupt ({type(exc).__name__}: {exc}); "
                       f"delete it and put a fresh copy of the original there") from None
  if sha256 is not None:
    got = hashlib.sha256(raw).hexdigest()
    if got != sha256:
      raise DatasetError(f"checksum mismatch for {path}: expected SHA-256 {sha256} of the "
                         f"uncompressed contents, got {got}; replace it with the original "
                         f"from {FASHION_MNIST_HOME} (or load with verify=False on purpose)")
  return raw


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4",
               0x0E: ">f8"}


MAX_IDX_BYTES = 1 << 30  # an idx file larger than this is not a dataset lfmjax reads


def _check_idx_header(path: Path) -> None:
  """Reads an idx file's header alone (through gzip for *.gz) and checks its magic
  number and that its dimensions give a plausible size, and for an uncompressed file
  the size on disk, before the whole file is read."""
  def corrupt(why: str) -> DatasetError:
    return DatasetError(f"{path} is not a valid idx file ({why}); replace it with the "
                        f"original")
  try:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
      magic = f.read(4)
      if len(magic) < 4 or magic[0] or magic[1] or magic[2] not in _IDX_DTYPES:
        raise corrupt(f"bad magic number {magic.hex() or 'none'}")
      dims_raw = f.read(4 * magic[3])
  except (OSError, EOFError, zlib.error) as exc:
    raise DatasetError(f"{path} is unreadable or corrupt ({type(exc).__name__}: {exc}); "
                       f"delete it and put a fresh copy of the original there") from None
  if len(dims_raw) < 4 * magic[3]:
    raise corrupt("truncated header")
  dims = tuple(np.frombuffer(dims_raw, ">u4").astype(np.int64).tolist())
  header = 4 + len(dims_raw)
  data = int(np.prod(dims, dtype=np.int64)) * np.dtype(_IDX_DTYPES[magic[2]]).itemsize
  if header + data > MAX_IDX_BYTES:
    raise corrupt(f"its header gives dims {dims}, {header + data} bytes")
  if path.suffix != ".gz" and path.stat().st_size - header != data:
    raise corrupt(f"{path.stat().st_size - header} data bytes for dims {dims}, expected "
                  f"{data}")


def _parse_idx(raw: bytes, where) -> np.ndarray:
  """An idx file (LeCun's MNIST format): 0 0 dtype ndim, big-endian uint32 dims, data."""
  def corrupt(why: str) -> DatasetError:
    return DatasetError(f"{where} is not a valid idx file ({why}); replace it with the "
                        f"original")
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
    raise corrupt(f"bad magic number {raw[:4].hex() or 'none'}")
  dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise corrupt("truncated header")
  dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
  expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
  if len(raw) - header != expected:
    raise corrupt(f"{len(raw) - header} data bytes for dims {dims}, expected {expected}")
  # Copy: frombuffer over bytes is read-only, and callers may want to write.
  return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _download_fashion_mnist(cache: Path, verify: bool) -> None:
  """Fetches the missing idx .gz files into `cache`, each via a temp file + rename."""
  cache.mkdir(parents=True, exist_ok=True)
  for stem in _find_idx_files(cache)[1]:
    dest = cache / f"{stem}.gz"
    url = FASHION_MNIST_URL + dest.name
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=f".{stem}.", suffix=".part")
    try:
      with os.fdopen(fd, "wb") as out, urllib.request.urlopen(
          url, timeout=DOWNLOAD_TIMEOUT_S) as response:
        while chunk := response.read(1 << 20):
          out.write(chunk)
      # Check before the rename so that a bad download never lands in the cache.
      try:
        _read_maybe_gz(Path(tmp), FASHION_MNIST_SHA256[stem] if verify else None, gz=True)
      except DatasetError as exc:
        raise DatasetError(f"the download of {url} is bad: {exc}") from None
      os.replace(tmp, dest)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)


# ---------------------------------------------------------------------------- CIFAR-10

def _load_cifar10(data_dir, download: bool, verify: bool) -> Dataset:
  roots = _dedupe(_user_roots(data_dir) + [cache_dir()])
  for root in roots:
    for kind, path in _cifar_candidates(root):
      train, test, source = _read_cifar_source(kind, path)
      return _cifar_dataset(train, test, source, verify)
  found, why = _cifar10_tfds(download)
  if found is not None:
    return _cifar_dataset(*found, "tensorflow_datasets:cifar10", verify)
  raise DatasetError(
      f"CIFAR-10 not found: looked in {_shown(roots)} for cifar-10-batches-py/, "
      f"cifar-10-python.tar.gz, cifar10*/ image trees (train|test/<class>/*.png|jpg) and "
      f"cifar10*.tar.gz image tarballs, and {why}; download {CIFAR10_URL} into a "
      f"directory and {HOW_TO_PASS}")


def _is_batches_dir(path: Path) -> bool:
  return (path / "data_batch_1").is_file() and (path / "test_batch").is_file()


def _is_image_tree(path: Path) -> bool:
  return (path / "train").is_dir() and (path / "test").is_dir()


def _is_tarball(path: Path) -> bool:
  return path.is_file() and path.name.lower().endswith(TAR_SUFFIXES)


def _cifar_candidates(root: Path) -> Iterator[tuple[str, Path]]:
  """(kind, path) of the CIFAR-10 sources in or at `root`, in order of preference."""
  if _is_tarball(root):  # data_dir may name an archive directly
    yield ("pickle_tar" if "python" in root.name else "image_tar"), root
    return
  if not root.is_dir():
    return
  if _is_batches_dir(root):
    yield "pickle_dir", root
  if _is_batches_dir(root / "cifar-10-batches-py"):
    yield "pickle_dir", root / "cifar-10-batches-py"
  if (root / "cifar-10-python.tar.gz").is_file():
    yield "pickle_tar", root / "cifar-10-python.tar.gz"
  if _is_image_tree(root) and (root / "train" / CIFAR10_CLASSES[0]).is_dir():
    yield "image_tree", root
  named = sorted(p for p in root.iterdir() if _CIFAR_NAME.match(p.name))
  for path in named:
    if path.is_dir() and _is_image_tree(path):
      yield "image_tree", path
  for path in named:
    if _is_tarball(path) and path.name != "cifar-10-python.tar.gz":
      yield ("pickle_tar" if "python" in path.name else "image_tar"), path


Split = tuple[np.ndarray, np.ndarray]


def _read_cifar_source(kind: str, path: Path) -> tuple[Split, Split, str]:
  """Reads one source; archives and image trees go through the decoded .npz cache."""
  if kind == "pickle_dir":
    return (*_pickle_splits(lambda name: (path / name).read_bytes(), path), str(path))
  build = {"pickle_tar": _pickle_tar_splits, "image_tar": _image_tar_splits,
           "image_tree": _image_tree_splits}[kind]
  return _cached_decode(path, lambda: build(path))


def _cifar_dataset(train: Split, test: Split, source: str, verify: bool) -> Dataset:
  for name, (x, y) in (("train", train), ("test", test)):
    _check_cifar_split(name, x, y, source, verify)
  return Dataset("cifar10", train[0], train[1], test[0], test[1], num_classes=10,
                 class_names=CIFAR10_CLASSES, source=source)


def _check_cifar_split(name: str, x: np.ndarray, y: np.ndarray, source: str,
                       verify: bool) -> None:
  if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != CIFAR10_SHAPE or y.shape != (
      len(x),) or y.dtype != np.int32:
    raise DatasetError(f"CIFAR-10 {name} split from {source} has images {x.shape} "
                       f"{x.dtype} and labels {y.shape} {y.dtype}, expected N x 32 x 32 x 3 "
                       f"uint8 and N int32; replace the source with the original")
  _checked_labels(y, 10, source)
  if verify:
    expected = CIFAR10_COUNTS[name]
    counts = np.bincount(y, minlength=10)
    if len(y) != expected or (counts != expected // 10).any():
      per_class = " ".join(f"{c}={n}" for c, n in zip(CIFAR10_CLASSES, counts))
      raise DatasetError(f"CIFAR-10 from {source} is incomplete: {len(y)} {name} images "
                         f"({per_class}), expected {expected} ({expected // 10} a class); "
                         f"provide the full dataset or load with verify=False for a subset")


def _split_arrays(images: list[np.ndarray], labels: list[int]) -> Split:
  x = np.stack(images) if images else np.zeros((0, *CIFAR10_SHAPE), np.uint8)
  return x.astype(np.uint8, copy=False), np.asarray(labels, np.int32)


# --- the official python pickles

def _pickle_splits(read: Callable[[str], bytes], where) -> tuple[Split, Split]:
  """Both splits from the pickled batches, each read by name through `read`."""
  out = []
  for split, names in CIFAR10_BATCHES.items():
    xs, ys = [], []
    for name in names:
      try:
        # The official format is a pickle; we only unpickle files the user pointed us at.
        batch = pickle.loads(read(name), encoding="bytes")
        data = np.asarray(batch[b"data"], np.uint8)
        labels = np.asarray(batch[b"labels"], np.int64)
        # Rows are 3072 bytes: 1024 red, 1024 green, 1024 blue (CHW) -> HWC.
        xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(labels)
      except (OSError, KeyError, ValueError, TypeError, EOFError, pickle.UnpicklingError,
              zlib.error) as exc:
        raise DatasetError(f"CIFAR-10 batch {name} in {where} is missing or corrupt "
                           f"({type(exc).__name__}: {exc}); re-extract {CIFAR10_URL}") from None
    out.append((np.ascontiguousarray(np.concatenate(xs)),
                np.concatenate(ys).astype(np.int32)))
  return out[0], out[1]


def _pickle_tar_splits(path: Path) -> tuple[Split, Split]:
  try:
    with tarfile.open(path, "r:*") as tar:
      members = {Path(m.name).name: m for m in tar.getmembers()
                 if m.isfile() and "cifar-10-batches-py" in m.name}

      def read(name: str) -> bytes:
        if name not in members:
          raise KeyError(f"{name} not in the archive")
        return tar.extractfile(members[name]).read()
      return _pickle_splits(read, path)
  except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
    raise DatasetError(f"{path} is not a readable tar archive ({type(exc).__name__}: "
                       f"{exc}); delete it and download {CIFAR10_URL} again") from None


# --- image folders: train|test/<class>/*.png|jpg

def _decode_image(data: bytes, where) -> np.ndarray:
  from PIL import Image, UnidentifiedImageError  # Pillow only when images are decoded
  try:
    with Image.open(io.BytesIO(data)) as image:
      array = np.asarray(image.convert("RGB"))
  except (UnidentifiedImageError, OSError, ValueError) as exc:
    raise DatasetError(f"cannot decode image {where} ({type(exc).__name__}: {exc}); "
                       f"replace or delete it") from None
  if array.shape != CIFAR10_SHAPE:
    raise DatasetError(f"image {where} is {array.shape[1]}x{array.shape[0]}, expected "
                       f"32x32 RGB for CIFAR-10; use the original images")
  return array


def _folder_splits(records: dict[str, dict[str, list[tuple[str, np.ndarray]]]],
                   source: Path) -> tuple[Split, Split]:
  """{split: {class: [(file name, image)]}} -> splits; class id = sorted position."""
  out = []
  for split in ("train", "test"):
    classes = tuple(sorted(records.get(split, {})))
    if classes != CIFAR10_CLASSES:
      raise DatasetError(f"{source}: {split}/ has class folders {list(classes)}, expected "
                         f"the 10 CIFAR-10 classes {list(CIFAR10_CLASSES)}; fix the layout "
                         f"to train|test/<class>/*.png|jpg")
    images, labels = [], []
    for label, name in enumerate(classes):
      for _, image in sorted(records[split][name], key=lambda r: r[0]):
        images.append(image)
        labels.append(label)
    out.append(_split_arrays(images, labels))
  return out[0], out[1]


def _check_gzip_complete(path: Path) -> None:
  """Reads a gzip file to its end: tarfile's streaming mode stops silently at a
  truncated gzip stream, so an incomplete download would load as a smaller dataset."""
  with open(path, "rb") as f:
    if f.read(2) != b"\x1f\x8b":
      return
  with gzip.open(path, "rb") as f:
    while f.read(1 << 22):
      pass


def _image_tar_splits(path: Path) -> tuple[Split, Split]:
  records: dict = {}
  try:
    _check_gzip_complete(path)
    # Streaming mode ("r|*"): one sequential pass, no seeking through the gzip stream.
    with tarfile.open(path, "r|*") as tar:
      for member in tar:
        match = _IMAGE_MEMBER.search(member.name)
        if not member.isfile() or not match or match[3].startswith("."):
          continue
        image = _decode_image(tar.extractfile(member).read(), f"{path}:{member.name}")
        records.setdefault(match[1].lower(), {}).setdefault(match[2], []).append(
            (match[3], image))
  except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
    raise DatasetError(f"{path} is not a readable tar archive ({type(exc).__name__}: "
                       f"{exc}); delete it and provide an intact copy") from None
  return _folder_splits(records, path)


def _image_tree_splits(root: Path) -> tuple[Split, Split]:
  records: dict = {}
  for split in ("train", "test"):
    for class_dir in sorted(p for p in (root / split).iterdir() if p.is_dir()):
      files = [f for f in class_dir.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES
               and not f.name.startswith(".")]
      records.setdefault(split, {})[class_dir.name] = [
          (f.name, _decode_image(f.read_bytes(), f)) for f in files]
  return _folder_splits(records, root)


# --- the decoded .npz cache

def _source_fingerprint(path: Path) -> str:
  """Identifies a source's contents cheaply: name, sizes and mtimes of its files."""
  if path.is_file():
    st = path.stat()
    return f"v{CACHE_FORMAT}|{path.name}|{st.st_size}|{st.st_mtime_ns}"
  entries = []
  for dirpath, _, filenames in os.walk(path):
    for name in filenames:
      st = os.stat(os.path.join(dirpath, name))
      entries.append(f"{os.path.relpath(os.path.join(dirpath, name), path)}"
                     f":{st.st_size}:{st.st_mtime_ns}")
  return f"v{CACHE_FORMAT}|{path.resolve()}|" + ";".join(sorted(entries))


def _cached_decode(path: Path, build: Callable[[], tuple[Split, Split]]
                   ) -> tuple[Split, Split, str]:
  """Returns build()'s splits, from `cache_dir()/cifar10-<key>.npz` when valid there."""
  key = _source_fingerprint(path)
  npz = cache_dir() / f"cifar10-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
  source = f"{path} (decoded cache {npz})"
  if npz.is_file():
    cached = _read_npz(npz, key)
    if cached is not None:
      return (*cached, source)
    warnings.warn(f"rebuilding the corrupt or stale CIFAR-10 cache {npz}", stacklevel=3)
  train, test = build()
  try:
    npz.parent.mkdir(parents=True, exist_ok=True)
    _write_npz_atomically(npz, key=np.array(key), train_x=train[0], train_y=train[1],
                          test_x=test[0], test_y=test[1])
  except OSError as exc:  # a read-only cache only costs speed
    warnings.warn(f"could not write the CIFAR-10 cache {npz}: {exc}", stacklevel=3)
    source = str(path)
  return train, test, source


def _read_npz(npz: Path, key: str) -> tuple[Split, Split] | None:
  """The cached splits, or None when the file is unreadable, stale or malformed."""
  try:
    # Our own handle: np.load leaks its file when the zip is corrupt.
    with open(npz, "rb") as handle, np.load(handle, allow_pickle=False) as f:
      if str(f["key"]) != key:
        return None
      train, test = (f["train_x"], f["train_y"]), (f["test_x"], f["test_y"])
    for name, (x, y) in (("train", train), ("test", test)):
      _check_cifar_split(name, x, y, str(npz), verify=False)
    return train, test
  except (OSError, KeyError, ValueError, EOFError, zlib.error,
          zipfile.BadZipFile):  # DatasetError is a ValueError
    return None


def _write_npz_atomically(path: Path, **arrays: np.ndarray) -> None:
  """Readers see either no file or a complete one: write a temp file, then rename."""
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".part")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)  # uncompressed: loading must be fast, the disk is cheap
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


# --- tensorflow-datasets, the last resort

def _cifar10_tfds(download: bool) -> tuple[tuple[Split, Split] | None, str]:
  """(splits, None) from tfds when it is installed and works, else (None, why not)."""
  try:
    import tensorflow_datasets as tfds  # optional; never a dependency of lfmjax
  except ImportError:
    return None, "tensorflow_datasets is not installed"
  try:
    train, test = tfds.as_numpy(tfds.load("cifar10", split=["train", "test"],
                                          batch_size=-1, as_supervised=True,
                                          download=download))
  except Exception as exc:  # tfds raises many types (network, registry, disk)
    first_line = str(exc).split("\n")[0]
    return None, f"tfds.load('cifar10') failed ({type(exc).__name__}: {first_line})"
  return tuple((np.asarray(x, np.uint8), np.asarray(y, np.int32))
               for x, y in (train, test)), "found by tfds"
