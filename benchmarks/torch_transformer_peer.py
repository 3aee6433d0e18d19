#!/usr/bin/env python3
"""lfmjax's PyTorch peer for the transformer paths of `benchmarks/bench.py`: one
split-learning iteration written the way a PyTorch user would, a Python loop over
clients, each with its own client-side model (and decoder) and its own optimizer.
`python benchmarks/bench.py` runs it, point by point, in a fresh process, for the paths
whose `peer` is this file (vit_psl_adam, vit_locfedmix_adam, lora_lm_psl,
lora_lm_locfedmix), and compares lfmjax's throughput with it.

It is `benchmarks/torch_peer.py` (the CNN peer) with lfmjax's two transformer splits in
place of the CNNs: same code structure, same flags where they apply, same iteration
logic, same output line. The models mirror lfmjax/models/vit.py and lfmjax/models/lm.py
(blocks of lfmjax/models/transformer.py, adapters of lfmjax/models/lora.py) layer for
layer, with the same parameter count in every segment (`--count-params`).

Flags:
  --clients C    number of clients (required, except with --count-params).
  --batch B      mini-batch per client (required, except with --count-params).
  --iters N      timed iterations (default 5), after one untimed warm-up iteration.
  --algo         locfedmix (default) | psl. See "Iterations" below.
  --model        vit (default) | lm. See "Models" below.
  --optimizer    adam (default) | sgd, used on both sides: one per client (its trainable
                 client-side parameters) and one for the server's trainable parameters.
                 Adam is torch.optim.Adam(lr) with the default betas and eps.
  --lr           learning rate of both sides (default 1e-3).
  --mu           weight of the decoder (local MI) loss in locfedmix (default 1).
  --lora-rank R  lm only (an error with vit): rank of the LoRA adapters (default 8);
                 0: full fine-tuning, every parameter trained, no adapters.
  --seq-len T    lm only (an error with vit): tokens a sample (default 128), also the
                 positions the model is built for.
  --server-forward  loop (default) | concat: the server applies its upper model to each
                 client's smashed batch (and each client's mixed batch) in turn, as
                 torch_peer.py's bench_cnn, or once to the concatenation of all clients'
                 real batches and once to all mixed batches, as lfmjax's server does. No
                 BatchNorm in these models: the losses and gradients are the same.
  --count-params print one JSON line of the parameter counts per segment and exit.

Models (dense layers: xavier_uniform weights, zero biases; LayerNorm eps 1e-6 with scale
and bias, as flax's; GELU the tanh approximation, as flax's nn.gelu; attention with
separate query/key/value/out nn.Linear(D, D) and F.scaled_dot_product_attention, scale
1/sqrt(D/heads); every block pre-LN: x + attn(ln1(x)), then x + mlp2(gelu(mlp1(ln2(x)))),
no dropout):
  vit (lfmjax/models/vit.py with its DEFAULTS; configs/cifar_vit.py): 32x32x3 images,
    10 classes, patch 4 (T = 64 tokens), width D = 64, depth 6, 4 heads, mlp_dim 128,
    cut 2, mean pooling, decoder_hidden 64.
    lower:   patchify (4x4x3 patches in row-major order, each flattened as (p, p, C) as
             lfmjax's `patchify`), nn.Linear(48 -> 64) `embedding`, + learned
             pos_embedding 1x64x64, blocks 0..1                          -> s: B x 64 x 64
    upper:   blocks 2..5, LayerNorm, mean over tokens, nn.Linear(64 -> 10) `head`
    decoder: per token LayerNorm, nn.Linear(64 -> 64), GELU, nn.Linear(64 -> 48),
             unpatchify to B x 3 x 32 x 32 (reconstruction logits)
    The client's input is the image standardised per channel (CIFAR-10 mean and std,
    configs/cifar_vit.py's input.normalize); the decoder's target the image in [0, 1].
  lm (lfmjax/models/lm.py built as configs/text_lm.py: --config.lora.segments=both): a
    byte-level causal LM, vocabulary V = 256, T = --seq-len, width 128, depth 4, 4 heads,
    mlp_dim 512, cut 1, causal attention.
    lower:   nn.Embedding(256, 128) `embedding` + learned pos_embedding 1 x T x 128,
             block 0                                                  -> s: B x T x 128
    upper:   blocks 1..3, LayerNorm, nn.Linear(128 -> 256) `lm_head` (next-token logits)
    decoder: TokenLogits: LayerNorm, nn.Linear(128 -> 256) (the input token's logits
             at each position)
    With R > 0, LoRA (Hu et al., ICLR 2022) on query, key, value and out of every block
    of both segments: y = x W^T + b + (alpha / R) (x A^T) B^T, alpha 16, A (R x in)
    kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)) (lfmjax's lora_a_init),
    B (out x R) zeros. The backbone (every other parameter of lower and upper) is
    frozen (requires_grad False) and held ONCE: one lower and one upper module, shared
    by all clients; each client holds only its own adapters (an nn.ModuleDict of `LoRA`
    modules its forward is given) and, in locfedmix, its decoder, which is fully
    trained (lfmjax freezes only the lower and upper segments). Each client's
    optimizer holds its adapters (+ decoder), the server's the server's adapters.
    With R = 0 every client holds its own full lower, trained, and the server its
    whole upper.
  Neither model builds lfmjax's aux head: psl and locfedmix do not use it (lfmjax
  leaves it out of the round's state).

Iterations (as torch_peer.py's; see SPEC.md):
  locfedmix: client forward s_k; decoder loss L^_k (vit: BCE of sigmoid(decoder logits)
    against the image in [0, 1], mean over pixels; lm: cross-entropy of the decoder's
    per-position logits against the input tokens, mean over the B*T positions),
    mu * L^_k backpropagated at once into the client's parameters; server CE on the
    real smashed data (lm: next-token CE against the targets, mean over the B*T
    positions) plus one SmashMix batch per client (partner j != k drawn uniformly, or
    j = k when C = 1, the partner's batch permuted, per-sample lambda ~ Beta(2, 2)
    mixing whole T x D token sequences, detached; the labels mixed one-hots with the
    same lambda, per position for the lm); one server step on sum_k delta_k (L_k + L~_k),
    delta_k = 1/C; each client gets dL_k/ds_k (the gradient of the weighted loss w.r.t.
    s_k, divided by delta_k); client step on VJP + mu * grad(L^_k); FedAvg of the
    clients' trainable segments (lowers, or the adapters under LoRA) and decoders every
    iteration (a no-op, so skipped, when C = 1).
  psl: no decoder, no SmashMix, no FedAvg: server loss sum_k delta_k L_k, one server
    step, each client backpropagates the gradient of its own loss and steps.

Inputs are random (vit: images in [0, 1] and labels in [0, 10); lm: tokens and targets
in [0, 256), C x B x T), made once before timing, as torch_peer.py's: lfmjax samples and
preprocesses its batches inside its round. Throughput does not depend on the values.

Usage: torch_transformer_peer.py --clients N --batch B [--iters 5]
           [--algo locfedmix|psl] [--model vit|lm] [--optimizer adam|sgd] [--lr 1e-3]
           [--mu 1] [--lora-rank 8] [--seq-len 128] [--server-forward loop|concat]
Prints one JSON line: {"clients", "batch", "algo", "iter_ms", "samples_per_s",
"threads", "model", "optimizer", "lr", ("lora_rank", "seq_len" for lm,)
("server_forward" when concat,) "peak_rss_mib"}; samples_per_s = C x B / iteration
time (samples, not tokens); peak_rss_mib is this process's ru_maxrss.
"""
import argparse
import json
import math
import resource
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

LN_EPS = 1e-6  # flax.linen.LayerNorm's epsilon
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)  # configs/cifar_vit.py's input.mean / input.std
CIFAR_STD = (0.2470, 0.2435, 0.2616)
VIT = dict(image=32, channels=3, classes=10, patch=4, width=64, depth=6, heads=4,
           mlp_dim=128, cut=2, decoder_hidden=64)
LM = dict(vocab=256, width=128, depth=4, heads=4, mlp_dim=512, cut=1)
LORA_ALPHA = 16.0
LORA_TARGETS = ("query", "key", "value", "out")  # configs/text_lm.py:lora's targets


def dense(d_in, d_out):
  """nn.Linear with lfmjax's LoRADense init: xavier_uniform weight, zero bias."""
  layer = nn.Linear(d_in, d_out)
  nn.init.xavier_uniform_(layer.weight)
  nn.init.zeros_(layer.bias)
  return layer


def layer_norm(d):
  return nn.LayerNorm(d, eps=LN_EPS)


class LoRA(nn.Module):
  """One client's adapter of one dense layer: (alpha / r) (x A^T) B^T, in loralib's
  layout (A r x in, B out x r), added to the shared frozen layer's output."""

  def __init__(self, d_in, d_out, rank, alpha=LORA_ALPHA):
    super().__init__()
    self.lora_a = nn.Parameter(torch.empty(rank, d_in))
    nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # U(-1/sqrt(in), 1/sqrt(in))
    self.lora_b = nn.Parameter(torch.zeros(d_out, rank))
    self.scale = alpha / rank

  def forward(self, x):
    return self.scale * F.linear(F.linear(x, self.lora_a), self.lora_b)


def adapted(layer, x, adapters, name):
  """layer(x), plus this client's adapter of the layer named `name` if it has one."""
  y = layer(x)
  if adapters is not None and name in adapters:
    y = y + adapters[name](x)
  return y


class Attention(nn.Module):
  """Self-attention: query/key/value/out nn.Linear(D, D), heads of D / heads."""

  def __init__(self, width, heads, causal, prefix):
    super().__init__()
    self.heads, self.causal, self.prefix = heads, causal, prefix
    self.query, self.key, self.value, self.out = (dense(width, width) for _ in range(4))

  def forward(self, x, adapters=None):
    b, t, d = x.shape

    def project(name):
      y = adapted(getattr(self, name), x, adapters, f"{self.prefix}_{name}")
      return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # B x N x T x H

    y = F.scaled_dot_product_attention(project("query"), project("key"), project("value"),
                                       is_causal=self.causal)
    return adapted(self.out, y.transpose(1, 2).reshape(b, t, d), adapters,
                   f"{self.prefix}_out")


class Block(nn.Module):
  """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp2(gelu(mlp1(ln2(x))))."""

  def __init__(self, width, heads, mlp_dim, causal, index):
    super().__init__()
    self.prefix = f"block{index}"
    self.ln1 = layer_norm(width)
    self.attn = Attention(width, heads, causal, self.prefix)
    self.ln2 = layer_norm(width)
    self.mlp1, self.mlp2 = dense(width, mlp_dim), dense(mlp_dim, width)

  def forward(self, x, adapters=None):
    x = x + self.attn(self.ln1(x), adapters)
    h = F.gelu(adapted(self.mlp1, self.ln2(x), adapters, f"{self.prefix}_mlp1"),
               approximate="tanh")
    return x + adapted(self.mlp2, h, adapters, f"{self.prefix}_mlp2")


def blocks(first, count, width, heads, mlp_dim, causal):
  """Blocks first..first+count-1, named by their index in the whole encoder."""
  return nn.ModuleList(Block(width, heads, mlp_dim, causal, i)
                       for i in range(first, first + count))


def run_blocks(module_list, x, adapters):
  for block in module_list:
    x = block(x, adapters)
  return x


def make_adapters(segment, rank, targets=LORA_TARGETS):
  """One holder's adapters of a segment: a LoRA per targeted layer of its blocks."""
  adapters = nn.ModuleDict()
  for block in segment.blocks:
    for name in targets:
      layer = getattr(block.attn, name)
      adapters[f"{block.prefix}_{name}"] = LoRA(layer.in_features, layer.out_features, rank)
  return adapters


# vit (lfmjax/models/vit.py)

def patchify(x_BxCxHxW, p):
  """B x C x H x W -> B x T x (p*p*C), patches in row-major order, each (p, p, C)."""
  b, c, h, w = x_BxCxHxW.shape
  x = x_BxCxHxW.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(y_BxTxP, h, w, p, c):
  """The inverse of `patchify`: B x T x (p*p*C) -> B x C x H x W."""
  b = y_BxTxP.shape[0]
  y = y_BxTxP.reshape(b, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4)
  return y.reshape(b, c, h, w)


class ViTLower(nn.Module):

  def __init__(self, patch, width, cut, heads, mlp_dim, image, channels):
    super().__init__()
    self.patch = patch
    d_in = patch * patch * channels
    self.embedding = nn.Linear(d_in, width)
    nn.init.trunc_normal_(self.embedding.weight, std=1.0 / math.sqrt(d_in))  # lecun_normal
    nn.init.zeros_(self.embedding.bias)
    tokens = (image // patch) ** 2
    self.pos_embedding = nn.Parameter(0.02 * torch.randn(1, tokens, width))
    self.blocks = blocks(0, cut, width, heads, mlp_dim, causal=False)

  def forward(self, x, adapters=None):
    x = self.embedding(patchify(x, self.patch)) + self.pos_embedding
    return run_blocks(self.blocks, x, adapters)


class ViTUpper(nn.Module):

  def __init__(self, first, count, width, heads, mlp_dim, classes):
    super().__init__()
    self.blocks = blocks(first, count, width, heads, mlp_dim, causal=False)
    self.encoder_norm = layer_norm(width)
    self.head = dense(width, classes)

  def forward(self, s, adapters=None):
    x = self.encoder_norm(run_blocks(self.blocks, s, adapters))
    return self.head(x.mean(dim=-2))


class TokenDecoder(nn.Module):
  """Per token LayerNorm, dense, gelu, dense p*p*C, unpatchify: reconstruction logits."""

  def __init__(self, width, hidden, patch, image, channels):
    super().__init__()
    self.patch, self.image, self.channels = patch, image, channels
    self.norm = layer_norm(width)
    self.fc1 = dense(width, hidden)
    self.fc2 = dense(hidden, patch * patch * channels)

  def forward(self, s):
    y = self.fc2(F.gelu(self.fc1(self.norm(s)), approximate="tanh"))
    return unpatchify(y, self.image, self.image, self.patch, self.channels)


# lm (lfmjax/models/lm.py)

class LMLower(nn.Module):

  def __init__(self, vocab, max_len, width, cut, heads, mlp_dim):
    super().__init__()
    self.embedding = nn.Embedding(vocab, width)
    nn.init.normal_(self.embedding.weight, std=0.02)
    self.pos_embedding = nn.Parameter(0.02 * torch.randn(1, max_len, width))
    self.blocks = blocks(0, cut, width, heads, mlp_dim, causal=True)

  def forward(self, tokens_BxT, adapters=None):
    x = self.embedding(tokens_BxT) + self.pos_embedding[:, :tokens_BxT.shape[-1]]
    return run_blocks(self.blocks, x, adapters)


class LMUpper(nn.Module):

  def __init__(self, vocab, first, count, width, heads, mlp_dim):
    super().__init__()
    self.blocks = blocks(first, count, width, heads, mlp_dim, causal=True)
    self.encoder_norm = layer_norm(width)
    self.lm_head = dense(width, vocab)

  def forward(self, s, adapters=None):
    return self.lm_head(self.encoder_norm(run_blocks(self.blocks, s, adapters)))


class TokenLogits(nn.Module):
  """Per-position LayerNorm + dense -> V: the lm's decoder."""

  def __init__(self, width, vocab):
    super().__init__()
    self.norm = layer_norm(width)
    self.fc = dense(width, vocab)

  def forward(self, s):
    return self.fc(self.norm(s))


def build(a):
  """(lower, upper and decoder factories, number of classes) of --model."""
  if a.model == "vit":
    v = VIT
    return (lambda: ViTLower(v["patch"], v["width"], v["cut"], v["heads"], v["mlp_dim"],
                             v["image"], v["channels"]),
            lambda: ViTUpper(v["cut"], v["depth"] - v["cut"], v["width"], v["heads"],
                             v["mlp_dim"], v["classes"]),
            lambda: TokenDecoder(v["width"], v["decoder_hidden"], v["patch"], v["image"],
                                 v["channels"]),
            v["classes"])
  m = LM
  return (lambda: LMLower(m["vocab"], a.seq_len, m["width"], m["cut"], m["heads"],
                          m["mlp_dim"]),
          lambda: LMUpper(m["vocab"], m["cut"], m["depth"] - m["cut"], m["width"],
                          m["heads"], m["mlp_dim"]),
          lambda: TokenLogits(m["width"], m["vocab"]),
          m["vocab"])


def count(module):
  return sum(p.numel() for p in module.parameters())


def count_params(a):
  """Per-segment parameter counts (backbone, and one holder's adapters)."""
  make_lower, make_upper, make_decoder, _ = build(a)
  rank = a.lora_rank if a.model == "lm" else 0
  out = {"model": a.model}
  for name, seg in (("lower", make_lower()), ("upper", make_upper())):
    adapters = count(make_adapters(seg, rank)) if rank else 0
    out[name] = {"backbone": count(seg), "adapters": adapters, "total": count(seg) + adapters}
  out["decoder"] = count(make_decoder())
  if a.model == "lm":
    out.update(lora_rank=rank, seq_len=a.seq_len)
  return out


def make_optimizer(name, params, lr):
  if name == "adam":
    return torch.optim.Adam(params, lr=lr)
  return torch.optim.SGD(params, lr=lr)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--clients", type=int)
  p.add_argument("--batch", type=int)
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--algo", choices=["locfedmix", "psl"], default="locfedmix")
  p.add_argument("--model", choices=["vit", "lm"], default="vit")
  p.add_argument("--optimizer", choices=["sgd", "adam"], default="adam")
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--mu", type=float, default=1.0)
  p.add_argument("--lora-rank", type=int)  # lm only; default 8
  p.add_argument("--seq-len", type=int)  # lm only; default 128
  p.add_argument("--server-forward", choices=["loop", "concat"], default="loop")
  p.add_argument("--count-params", action="store_true")
  a = p.parse_args()
  if a.model == "vit" and (a.lora_rank is not None or a.seq_len is not None):
    p.error("--lora-rank and --seq-len are for --model lm (the vit has no adapters and "
            "takes 32x32x3 images)")
  a.lora_rank = 8 if a.lora_rank is None else a.lora_rank
  a.seq_len = 128 if a.seq_len is None else a.seq_len
  if a.lora_rank < 0 or a.seq_len < 1:
    p.error("--lora-rank must be >= 0 and --seq-len >= 1")
  torch.manual_seed(0)
  if a.count_params:
    print(json.dumps(count_params(a)))
    return
  if a.clients is None or a.batch is None:
    p.error("--clients and --batch are required")
  C, B = a.clients, a.batch
  loc = a.algo == "locfedmix"
  lm = a.model == "lm"
  lora = lm and a.lora_rank > 0
  concat = a.server_forward == "concat"
  make_lower, make_upper, make_decoder, K = build(a)
  upper = make_upper()
  if lora:  # the backbone frozen and held once; each client its own adapters
    lower = make_lower()
    lower.requires_grad_(False)
    upper.requires_grad_(False)
    client_mods = [make_adapters(lower, a.lora_rank) for _ in range(C)]
    server_adapters = make_adapters(upper, a.lora_rank)
    server_params = list(server_adapters.parameters())

    def client_forward(k, x):
      return lower(x, client_mods[k])

    def server_forward(s):
      return upper(s, server_adapters)
  else:  # every client its own lower, all trained
    client_mods = [make_lower() for _ in range(C)]
    server_params = list(upper.parameters())

    def client_forward(k, x):
      return client_mods[k](x)

    server_forward = upper
  decs = [make_decoder() for _ in range(C)] if loc else []
  for k in range(1, C):  # all clients start from the same client-side segments
    client_mods[k].load_state_dict(client_mods[0].state_dict())
    if decs:
      decs[k].load_state_dict(decs[0].state_dict())
  client_params = [[q for q in client_mods[k].parameters() if q.requires_grad]
                   + (list(decs[k].parameters()) if decs else []) for k in range(C)]
  copt = [make_optimizer(a.optimizer, client_params[k], a.lr) for k in range(C)]
  sopt = make_optimizer(a.optimizer, server_params, a.lr)
  if lm:
    x = torch.randint(0, K, (C, B, a.seq_len))
    x01 = x  # the decoder's target: the input tokens
    y = torch.randint(0, K, (C, B, a.seq_len))
  else:
    x01 = torch.rand(C, B, VIT["channels"], VIT["image"], VIT["image"])
    mean = torch.tensor(CIFAR_MEAN).view(1, 1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 1, 3, 1, 1)
    x = (x01 - mean) / std
    y = torch.randint(0, K, (C, B))
  beta = torch.distributions.Beta(2.0, 2.0)
  delta = 1.0 / C

  def rec_loss(logits, target):
    if lm:  # cross-entropy of the input tokens, every position
      return F.cross_entropy(logits.reshape(-1, K), target.reshape(-1))
    return F.binary_cross_entropy_with_logits(logits, target)

  def ce(logits, labels):  # mean over the batch (and the positions, lm)
    return F.cross_entropy(logits.reshape(-1, K), labels.reshape(-1))

  def soft_ce(logits, targets):
    return -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()

  def iteration():
    for o in copt:
      o.zero_grad(set_to_none=True)
    sopt.zero_grad(set_to_none=True)
    smashed, leaves = [], []
    for k in range(C):  # client forward (+ local MI loss, backpropagated now)
      s = client_forward(k, x[k])
      leaf = s.detach().requires_grad_()
      if loc:
        (a.mu * rec_loss(decs[k](s), x01[k])).backward(retain_graph=True)
      smashed.append(s)
      leaves.append(leaf)
    server_loss = 0.0
    if concat:  # one server forward on the concatenated batch
      logits = server_forward(torch.cat(leaves))
      logits = logits.view((C, B) + logits.shape[1:])
      for k in range(C):
        server_loss = server_loss + delta * ce(logits[k], y[k])
    else:
      for k in range(C):  # server: real loss of each client
        server_loss = server_loss + delta * ce(server_forward(leaves[k]), y[k])
    if loc:  # SmashMix: one mixed batch per client, partner != k (k if C = 1), detached
      mixed, targets = [], []
      for k in range(C):
        j = k if C == 1 else (k + 1 + int(torch.randint(0, C - 1, ()))) % C
        perm = torch.randperm(B)
        lam = beta.sample((B,))
        lam_s = lam.view((B,) + (1,) * (leaves[k].dim() - 1))  # whole T x D sequences
        s_mix = lam_s * leaves[k].detach() + (1 - lam_s) * leaves[j].detach()[perm]
        lam_y = lam.view((B,) + (1,) * y[k].dim())  # lm: every position's one-hot
        y_mix = (lam_y * F.one_hot(y[k], K) + (1 - lam_y) * F.one_hot(y[j][perm], K))
        if concat:
          mixed.append(s_mix)
          targets.append(y_mix)
        else:
          server_loss = server_loss + delta * soft_ce(server_forward(s_mix), y_mix)
      if concat:  # one server forward on all mixed batches
        logits = server_forward(torch.cat(mixed)).view(torch.stack(targets).shape)
        for k in range(C):
          server_loss = server_loss + delta * soft_ce(logits[k], targets[k])
    server_loss.backward()
    sopt.step()
    for k in range(C):  # download own-loss gradient (undo the delta scale), client BP
      smashed[k].backward(leaves[k].grad / delta)
      copt[k].step()
    if loc and C > 1:
      with torch.no_grad():  # FedAvg of the trainable client segments and decoders
        for group in ([[q for q in m.parameters() if q.requires_grad] for m in client_mods],
                      [list(d.parameters()) for d in decs]):
          for i in range(len(group[0])):
            mean_i = torch.stack([ps[i] for ps in group]).mean(0)
            for ps in group:
              ps[i].copy_(mean_i)

  iteration()  # warm-up
  t0 = time.perf_counter()
  for _ in range(a.iters):
    iteration()
  dt = (time.perf_counter() - t0) / a.iters
  out = {"clients": C, "batch": B, "algo": a.algo, "iter_ms": round(dt * 1e3, 2),
         "samples_per_s": round(C * B / dt, 1), "threads": torch.get_num_threads(),
         "model": a.model, "optimizer": a.optimizer, "lr": a.lr}
  if lm:
    out.update(lora_rank=a.lora_rank, seq_len=a.seq_len)
  if concat:
    out["server_forward"] = a.server_forward
  out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
