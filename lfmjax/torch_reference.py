"""A verbatim copy of the PyTorch peer lfmjax is measured against (the project's
shared/bench/torch_reference.py; tests check the copy is exact). `python -m lfmjax.bench`
runs it, interleaved with lfmjax, when torch is installed. Its docstring follows."""
#!/usr/bin/env python3
"""PyTorch reference for one LocFedMix-SL iteration, written the way a PyTorch user
would: a Python loop over clients, each with its own lower model, decoder and
optimizer. It is the peer that lfmjax's throughput is measured against.

Model ("bench-cnn", 32x32x3 input):
  lower:   conv3x3(3->32) relu maxpool2, conv3x3(32->64) relu maxpool2   -> 8x8x64
  upper:   conv3x3(64->128) relu maxpool2, flatten, dense 2048->256 relu, dense 256->10
  decoder: bilinear upsample 8x8->32x32, conv3x3(64->12) relu, conv3x3(12->3)
Iteration (see SPEC.md): client forward; decoder BCE loss; server CE on the real smashed
data plus one SmashMix batch per client (partner j != k, per-sample lambda~Beta(2,2),
detached); one server SGD step on sum_k delta_k (L_k + L~_k); each client gets dL_k/ds_k;
client step on VJP + mu * grad(L^_k); FedAvg of lowers and decoders every iteration.
`--algo psl` drops the decoder, SmashMix and FedAvg.

Usage: torch_reference.py --clients N --batch B [--iters 5] [--algo locfedmix|psl]
Prints one JSON line: {"clients", "batch", "algo", "iter_ms", "samples_per_s", "threads"}.
Input values are random: throughput does not depend on them.
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


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--clients", type=int, required=True)
  p.add_argument("--batch", type=int, required=True)
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--algo", choices=["locfedmix", "psl"], default="locfedmix")
  p.add_argument("--lr", type=float, default=0.01)
  p.add_argument("--mu", type=float, default=1.0)
  a = p.parse_args()
  torch.manual_seed(0)
  C, B = a.clients, a.batch
  loc = a.algo == "locfedmix"
  lowers = [lower_net() for _ in range(C)]
  decs = [Decoder() for _ in range(C)]
  for k in range(1, C):  # all clients start from the same lower model
    lowers[k].load_state_dict(lowers[0].state_dict())
    decs[k].load_state_dict(decs[0].state_dict())
  upper = upper_net()
  copt = [torch.optim.SGD(list(l.parameters()) + list(d.parameters()), lr=a.lr)
          for l, d in zip(lowers, decs)]
  sopt = torch.optim.SGD(upper.parameters(), lr=a.lr)
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
    for k in range(C):  # server: real loss of each client
      server_loss = server_loss + delta * F.cross_entropy(upper(leaves[k]), y[k])
    if loc:  # SmashMix: one mixed batch per client, partner != k, detached
      for k in range(C):
        if C == 1:
          break
        j = (k + 1 + int(torch.randint(0, C - 1, ()))) % C
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
                    "threads": torch.get_num_threads()}))


if __name__ == "__main__":
  main()
