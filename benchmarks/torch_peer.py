#!/usr/bin/env python3
"""lfmjax's PyTorch peer: one split-learning iteration written the way a PyTorch user
would, a Python loop over clients, each with its own lower model (and decoder) and its
own optimizer. `python benchmarks/bench.py` runs it, point by point, in a fresh process and
compares lfmjax's throughput with it.

It is the project's own peer, derived from the project's first one,
shared/bench/torch_reference.py: same code structure, same argument names, same output.
With --model bench_cnn --optimizer sgd it does exactly the work of that file's psl
iteration, and of its locfedmix iteration for C > 1. What it adds: Adam, the resnet16
split, and SmashMix with a single client (which torch_reference.py skipped).

Flags:
  --clients C    number of clients (required).
  --batch B      mini-batch per client (required).
  --iters N      timed iterations (default 5), after one untimed warm-up iteration.
  --algo         locfedmix (default) | psl. See "Iterations" below.
  --model        bench_cnn (default) | resnet16. See "Models" below.
  --optimizer    sgd (default) | adam, used on both sides: one per client (its lower
                 model and decoder) and one for the server's upper model.
                 Adam is torch.optim.Adam(lr) with the default betas and eps.
  --lr           learning rate of both sides (default 0.01; benchmarks/bench.py passes 1e-3
                 with adam).
  --mu           weight of the decoder (local MI) loss in locfedmix (default 1).

Models (32x32x3 input, 10 classes):
  bench_cnn (torch_reference.py's "bench-cnn"):
    lower:   conv3x3(3->32) relu maxpool2, conv3x3(32->64) relu maxpool2   -> 8x8x64
    upper:   conv3x3(64->128) relu maxpool2, flatten, dense 2048->256 relu,
             dense 256->10
    decoder: bilinear upsample 8x8->32x32, conv3x3(64->12) relu, conv3x3(12->3)
  resnet16 (lfmjax/models/resnet.py; SGLR's InfoPro-style CIFAR ResNet, cut_stage 2):
    lower:   conv3x3(3->16, no bias) BN relu; stage 1: 2 BasicBlocks of 16;
             stage 2: 2 BasicBlocks of 32, stride 2                        -> 16x16x32
    upper:   stage 3: 3 BasicBlocks of 64, stride 2; global average pool; dense 64->10
    A BasicBlock is conv3x3-BN-relu-conv3x3-BN plus a shortcut (1x1 conv + BN where the
    shape changes, else the identity), then relu. Convs bias-free, He-normal on fan-out;
    BatchNorm momentum 0.1 (PyTorch's convention), eps 1e-5, training mode.

Iterations (see SPEC.md):
  locfedmix (bench_cnn only): client forward; decoder BCE loss; server CE on the real
    smashed data plus one SmashMix batch per client (partner j != k drawn uniformly, or
    j = k when C = 1, the partner's batch permuted, per-sample lambda~Beta(2,2),
    detached); one server step on sum_k delta_k (L_k + L~_k); each client gets
    dL_k/ds_k; client step on VJP + mu * grad(L^_k); FedAvg of lowers and decoders every
    iteration (a no-op, so skipped, when C = 1).
  psl: no decoder, no SmashMix, no FedAvg. bench_cnn: the server applies its upper model
    to each client's smashed batch in turn (as torch_reference.py). resnet16: one server
    forward on the concatenation of all clients' detached smashed batches, so that the
    server's BatchNorm normalises over the concatenated batch (as lfmjax's server does);
    loss sum_k delta_k CE_k on the per-client slices of the logits; one backward and
    server step; each client backpropagates the gradient of its own loss and steps.
    Each client's lower model keeps its own BatchNorm statistics.
  resnet16 with --algo locfedmix is an error; --algo defaults to locfedmix, so resnet16
  needs --algo psl.

Usage: torch_peer.py --clients N --batch B [--iters 5] [--algo locfedmix|psl]
                     [--model bench_cnn|resnet16] [--optimizer sgd|adam] [--lr 0.01]
Prints one JSON line: {"clients", "batch", "algo", "iter_ms", "samples_per_s",
"threads", "model", "optimizer", "lr"}. Input values are random: throughput does not
depend on them.
"""
import argparse
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def lower_net():
  return nn.Sequential(
      nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
      nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))


def upper_net():
  return nn.Sequential(
      nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
      nn.Linear(128 * 4 * 4, 256), nn.ReLU(), nn.Linear(256, 10))


class Decoder(nn.Module):

  def __init__(self):
    super().__init__()
    self.c1 = nn.Conv2d(64, 12, 3, padding=1)
    self.c2 = nn.Conv2d(12, 3, 3, padding=1)

  def forward(self, s):
    s = F.interpolate(s, size=(32, 32), mode="bilinear", align_corners=False)
    return self.c2(F.relu(self.c1(s)))


# resnet16: (channels, blocks, stride of the first block) per stage, as lfmjax's STAGES.
STAGES = ((16, 2, 1), (32, 2, 2), (64, 3, 2))
CUT_STAGE = 2  # conv1 + stages 1..2 on the client


def conv(cin, cout, kernel, stride=1):
  """Bias-free conv, padding kernel // 2, He-normal on fan-out (InfoPro's init)."""
  c = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)
  nn.init.kaiming_normal_(c.weight, mode="fan_out", nonlinearity="relu")
  return c


def bn(channels):
  return nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)


class BasicBlock(nn.Module):
  """conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU (He et al., 2016)."""

  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1, self.bn1 = conv(cin, cout, 3, stride), bn(cout)
    self.conv2, self.bn2 = conv(cout, cout, 3), bn(cout)
    self.shortcut = nn.Identity()
    if stride != 1 or cin != cout:
      self.shortcut = nn.Sequential(conv(cin, cout, 1, stride), bn(cout))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + self.shortcut(x))


def stages(cin, indices):
  """The BasicBlocks of the given stages (0-based indices into STAGES)."""
  blocks = []
  for i in indices:
    cout, n, stride = STAGES[i]
    for b in range(n):
      blocks.append(BasicBlock(cin, cout, stride if b == 0 else 1))
      cin = cout
  return blocks


def resnet_lower():
  return nn.Sequential(conv(3, 16, 3), bn(16), nn.ReLU(),
                       *stages(16, range(CUT_STAGE)))


def resnet_upper(num_classes=10):
  cin = STAGES[CUT_STAGE - 1][0]
  return nn.Sequential(*stages(cin, range(CUT_STAGE, len(STAGES))),
                       nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                       nn.Linear(STAGES[-1][0], num_classes))


def make_optimizer(name, params, lr):
  if name == "adam":
    return torch.optim.Adam(params, lr=lr)
  return torch.optim.SGD(params, lr=lr)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--clients", type=int, required=True)
  p.add_argument("--batch", type=int, required=True)
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--algo", choices=["locfedmix", "psl"], default="locfedmix")
  p.add_argument("--model", choices=["bench_cnn", "resnet16"], default="bench_cnn")
  p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
  p.add_argument("--lr", type=float, default=0.01)
  p.add_argument("--mu", type=float, default=1.0)
  a = p.parse_args()
  if a.model == "resnet16" and a.algo != "psl":
    p.error(f"--model resnet16 supports only --algo psl (got --algo {a.algo}): "
            "the peer has no resnet16 decoder, SmashMix or FedAvg")
  torch.manual_seed(0)
  C, B = a.clients, a.batch
  loc = a.algo == "locfedmix"
  resnet = a.model == "resnet16"
  if resnet:
    lowers = [resnet_lower() for _ in range(C)]
    decs = []  # psl only: no decoder
  else:
    lowers = [lower_net() for _ in range(C)]
    decs = [Decoder() for _ in range(C)]
  for k in range(1, C):  # all clients start from the same lower model
    lowers[k].load_state_dict(lowers[0].state_dict())
    if decs:
      decs[k].load_state_dict(decs[0].state_dict())
  upper = resnet_upper() if resnet else upper_net()
  copt = [make_optimizer(a.optimizer, list(lowers[k].parameters())
                         + (list(decs[k].parameters()) if decs else []), a.lr)
          for k in range(C)]
  sopt = make_optimizer(a.optimizer, upper.parameters(), a.lr)
  x = torch.rand(C, B, 3, 32, 32)
  y = torch.randint(0, 10, (C, B))
  beta = torch.distributions.Beta(2.0, 2.0)
  delta = 1.0 / C

  def iteration():
    for o in copt:
      o.zero_grad(set_to_none=True)
    sopt.zero_grad(set_to_none=True)
    smashed, leaves = [], []
    for k in range(C):  # client forward (+ local MI loss, backpropagated now)
      s = lowers[k](x[k])
      leaf = s.detach().requires_grad_()
      if loc:
        rec = F.binary_cross_entropy_with_logits(decs[k](s), x[k])
        (a.mu * rec).backward(retain_graph=True)
      smashed.append(s)
      leaves.append(leaf)
    server_loss = 0.0
    if resnet:  # one server forward on the concatenated batch (BN over all of it)
      logits = upper(torch.cat(leaves))
      for k in range(C):
        ce = F.cross_entropy(logits[k * B:(k + 1) * B], y[k])  # client k's slice
        server_loss = server_loss + delta * ce
    else:
      for k in range(C):  # server: real loss of each client
        server_loss = server_loss + delta * F.cross_entropy(upper(leaves[k]), y[k])
    if loc:  # SmashMix: one mixed batch per client, partner != k (k if C = 1), detached
      for k in range(C):
        j = k if C == 1 else (k + 1 + int(torch.randint(0, C - 1, ()))) % C
        perm = torch.randperm(B)
        lam = beta.sample((B,))
        s_mix = (lam.view(B, 1, 1, 1) * leaves[k].detach()
                 + (1 - lam.view(B, 1, 1, 1)) * leaves[j].detach()[perm])
        y_mix = (lam.view(B, 1) * F.one_hot(y[k], 10)
                 + (1 - lam.view(B, 1)) * F.one_hot(y[j][perm], 10))
        logp = F.log_softmax(upper(s_mix), dim=-1)
        server_loss = server_loss - delta * (y_mix * logp).sum(-1).mean()
    server_loss.backward()
    sopt.step()
    for k in range(C):  # download own-loss gradient (undo the delta scale), client BP
      smashed[k].backward(leaves[k].grad / delta)
      copt[k].step()
    if loc and C > 1:
      with torch.no_grad():  # FedAvg of lowers and decoders (psl has none)
        for group in (lowers, decs):
          params = [list(m.parameters()) for m in group]
          for i in range(len(params[0])):
            mean = torch.stack([ps[i] for ps in params]).mean(0)
            for ps in params:
              ps[i].copy_(mean)

  iteration()  # warm-up
  t0 = time.perf_counter()
  for _ in range(a.iters):
    iteration()
  dt = (time.perf_counter() - t0) / a.iters
  print(json.dumps({"clients": C, "batch": B, "algo": a.algo,
                    "iter_ms": round(dt * 1e3, 2),
                    "samples_per_s": round(C * B / dt, 1),
                    "threads": torch.get_num_threads(),
                    "model": a.model, "optimizer": a.optimizer, "lr": a.lr}))


if __name__ == "__main__":
  main()
