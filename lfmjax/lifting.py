"""How a function of one client is lifted over the client axis, and the random streams
the round's phases share (LocFedMix-SL, Oh et al., WWW 2022: one iteration of every
client as one XLA program)."""
from __future__ import annotations

import jax
from jax.sharding import Mesh, PartitionSpec

from lfmjax.models import apply_module
from lfmjax.models.patch_conv import kernel_backend

CLIENTS = "clients"  # the mesh axis the clients are split over (lfmjax.mesh)

# fold_in tags: one independent stream of randomness per purpose.
TAG_BATCH, TAG_MIX, TAG_ORDER, TAG_GRADMIX = 0, 1, 2, 3


def apply_segment(module, params, stats, x, train: bool, method: str | None = None):
  """Applies a flax module; returns (output, updated non-param collections)."""
  out, variables = apply_module(module, {"params": params, **stats}, x, train=train,
                                method=method)
  new_stats = {k: v for k, v in variables.items() if k != "params"}
  return out, new_stats

def map_clients(fn, mesh: Mesh | None = None):
  """fn of one client's arrays, over a leading client axis.

  On the CPU a `lax.map`: each step is one client's whole computation with unbatched
  weights, so every convolution runs its one-client kernel and the loop over clients is
  one loop, not one per layer (`models.patch_conv` would otherwise map each layer of a
  vmapped call, slicing its inputs and stacking its outputs each time). On a mesh of
  several devices whose 'clients' axis divides the clients, the loop runs per device
  (`jax.shard_map`) over that device's own clients: a loop over an axis split across
  devices would make the partitioner gather it onto every device. Elsewhere (GPU, TPU)
  a `vmap`. A caller's own vmap (seeds) over any of them gets the same kernels.
  """
  if kernel_backend() != "cpu":
    return jax.vmap(fn)

  def loop(*args):
    return jax.lax.map(lambda a: fn(*a), args)

  if mesh is None or mesh.size == 1:
    return loop

  def per_device(*args):
    if jax.tree.leaves(args)[0].shape[0] % mesh.size:
      return loop(*args)  # uneven: the partitioner's way
    spec = PartitionSpec(CLIENTS)
    # check_vma off: the kernels' scans start from fresh zeros, which it would flag.
    return jax.shard_map(loop, mesh=mesh, in_specs=spec, out_specs=spec,
                         check_vma=False)(*args)

  return per_device
