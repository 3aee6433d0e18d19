"""One iteration of every client as a single jitted XLA program, for all SL algorithms.

`make_round_step(cfg, model)` returns `round_step(state, data) -> (state, metrics)`
computing, per SPEC.md and Oh et al. (LocFedMix-SL, WWW 2022):

  1. each client's mini-batch, sampled on the device from (key, step);
  2. client forward s_k = lower(w_c,k, x_k), vmapped over clients;
  3. the local losses (Loc's MI decoder, an aux head's CE) and their gradients;
  4. the server phase (`cfg.server_mode`): one step of a single server on
     sum_k delta_k (L_k + L~_k) with SmashMix (Mix), per-client server copies (SFL-V1),
     or a scan of per-client steps in a random order (SFL-V2);
  5. the gradients to the clients: g_k = dL_k/ds_k, GradMix's mean for a fraction of clients, or nothing;
  6. the client update opt_c(VJP_lower(g_k) + local gradients);
  7. FedAvg of the client segments every T_c iterations (Fed).

PSL is the single-server round with every switch off. The clients' side is one of three
named phases, which `cfg.client_phase` chooses:
  per_client  every client with its own segments (`make_per_client_phase`);
  averaged    where FedAvg follows every iteration and the client optimiser is linear,
              every client holds the same segments at the start of each iteration and
              FedAvg of their steps is one step on the delta-weighted gradient: steps 2,
              3, 6 and 7 run as one model over all clients' data, and the state holds
              one copy of the client segments (`make_averaged_client_phase`);
  relay       vanilla SL, a scan over clients of steps 2-6 carrying the lower model
              (`make_relay_round`).
The convolutions choose their kernels from what is batched (`models.patch_conv`), so
none of this code sets a flag for them.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec

from lfmjax import components, finetune, participation, privacy
from lfmjax.algorithms import RoundConfig
from lfmjax.data import batch_indices, client_batch_indices
from lfmjax.models import SplitModel, apply_module, has_stem
from lfmjax.models.patch_conv import compiler_options, kernel_backend
from lfmjax.optim import learning_rate_at
from lfmjax.state import (ClientState, RoundData, RoundState, ServerState,
                          client_optimizer, server_optimizer, stack_clients,
                          with_optimizers)

CLIENTS = "clients"  # the mesh axis the clients are split over (lfmjax.mesh)

# fold_in tags: one independent stream of randomness per purpose.
TAG_BATCH, TAG_MIX, TAG_ORDER, TAG_GRADMIX = 0, 1, 2, 3


def _apply(module, params, stats, x, train: bool, method: str | None = None):
  """Applies a flax module; returns (output, updated non-param collections)."""
  out, variables = apply_module(module, {"params": params, **stats}, x, train=train,
                                method=method)
  new_stats = {k: v for k, v in variables.items() if k != "params"}
  return out, new_stats


def sample_batch(cfg: RoundConfig, state: RoundState, data: RoundData):
  """Every client's mini-batch for this step: (x_model, x01, y), each C x B x ...."""
  idx_CxB = batch_indices(jax.random.fold_in(state.key, TAG_BATCH), state.step,
                          data.idx_CxM, data.sizes_C, cfg.batch_size, ids_C=data.ids_C)
  x_model, x01 = cfg.preprocess(data.train_x[idx_CxB])
  return x_model, x01, data.train_y[idx_CxB]


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


def make_local_losses(cfg: RoundConfig, model: SplitModel):
  """The local terms in use: InfoPro's reconstruction loss through the decoder (Loc)
  and the aux head's CE. Returns {name: (module, loss(outputs, target), weight on
  d/ds, target 'x01' | 'y')}, one client's loss on its head's outputs."""

  def rec(logits, x01):
    return components.reconstruction_loss(logits, x01, cfg.reconstruction_kind)

  terms = {}
  if cfg.uses_decoder:
    terms["decoder"] = (model.decoder, rec, cfg.local_loss_weight, "x01")
  if cfg.uses_aux_head:
    terms["aux_head"] = (model.aux_head, components.cross_entropy, cfg.local_ce_weight, "y")
  return terms


HEADS = ("decoder", "aux_head")


def local_term_gradients(terms: dict, s, params, stats, targets: dict, term_loss):
  """Every local term's loss and gradients, accumulated as the client update needs.

  `term_loss(module, loss_fn, s, head_params, head_stats, target) -> (loss, stats)` is
  one term's loss (one client's, or the d-weighted sum over clients). Returns
  (ds = sum_t weight_t dL_t/ds, each head's gradient (zeros if unused), the used heads'
  new stats, the used heads' losses).
  """
  ds = jnp.zeros_like(s)
  grads = {name: jax.tree.map(jnp.zeros_like, params[name]) for name in HEADS}
  new_stats, losses = {}, {}
  for name, (module, loss_fn, weight, target) in terms.items():
    def loss(s, p, module=module, loss_fn=loss_fn, name=name, target=target):
      return term_loss(module, loss_fn, s, p, stats[name], targets[target])
    (losses[name], new_stats[name]), (ds_term, grads[name]) = jax.value_and_grad(
        loss, argnums=(0, 1), has_aux=True)(s, params[name])
    ds = ds + weight * ds_term
  return ds, grads, new_stats, losses


def apply_to_clients(module, params, stats, x_CxBx):
  """One segment with one set of weights applied to every client's batch.

  Without batch statistics the clients' batches are one batch (every convolution one
  large one); with them (BatchNorm) the segment is
  vmapped over clients so each batch is normalised by itself, as on its own client.
  Returns (out_CxBx..., new stats with a leading client axis).
  """
  num_clients, batch = x_CxBx.shape[:2]
  if jax.tree.leaves(stats):
    return jax.vmap(lambda x: _apply(module, params, stats, x, train=True))(x_CxBx)
  out, new_stats = _apply(module, params, stats,
                          x_CxBx.reshape((num_clients * batch,) + x_CxBx.shape[2:]),
                          train=True)
  return out.reshape((num_clients, batch) + out.shape[1:]), new_stats


def _local_metrics(losses: dict, zero):
  return losses.get("decoder", zero), losses.get("aux_head", zero)


def make_client_forward(cfg: RoundConfig, model: SplitModel):
  """Per client: s, the VJP of the lower, and the local losses with their gradients."""
  terms = make_local_losses(cfg, model)

  def one_client_loss(module, loss_fn, s, p, stats, target):
    out, new_stats = _apply(module, p, stats, s, train=True)
    return loss_fn(out, target), new_stats

  def local_losses(s, params, stats, x01, y):
    """Gradients of the local terms w.r.t. s and the client-side heads."""
    ds, grads, head_stats, losses = local_term_gradients(
        terms, s, params, stats, {"x01": x01, "y": y}, one_client_loss)
    if cfg.nopeek_weight:
      ds = ds + cfg.nopeek_weight * jax.grad(
          lambda s: privacy.distance_correlation(x01, s))(s)
    new_stats = {**{name: stats[name] for name in HEADS}, **head_stats}
    return (ds, grads, new_stats) + _local_metrics(losses, jnp.zeros(()))

  def client_forward(params, stats, x_model, x01, y):
    def lower(p):
      return _apply(model.lower, p, stats["lower"], x_model, train=True)
    s, lower_vjp, lower_stats = jax.vjp(lower, params["lower"], has_aux=True)
    ds_local, head_grads, head_stats, loss_local, loss_aux = local_losses(
        jax.lax.stop_gradient(s), params, stats, x01, y)
    new_stats = {"lower": lower_stats, **head_stats}
    return s, lower_vjp, ds_local, head_grads, new_stats, loss_local, loss_aux

  return client_forward


# Samples a group of clients holds in the shared phase's backward pass (below).
GROUP_SAMPLES = 512


def client_group_size(num_clients: int, batch_size: int) -> int:
  """Clients per group of the shared phase's backward: about GROUP_SAMPLES samples,
  dividing the number of clients; all of them when they hold fewer samples than twice
  that."""
  if num_clients * batch_size < 2 * GROUP_SAMPLES:
    return num_clients
  target = max(1, GROUP_SAMPLES // batch_size)
  return max(d for d in range(1, target + 1) if num_clients % d == 0)


class ClientCopiesError(ValueError):
  """A state whose client segments do not have the copies the round's phase holds."""


def check_single_copy(clients: ClientState) -> None:
  """The averaged phase holds one copy of the client segments; it refuses C copies, which
  may differ, instead of silently reading one of them (a trace-time shape check)."""
  copies = jax.tree.leaves(clients.params)[0].shape[0]
  if copies != 1:
    raise ClientCopiesError(
        f"the averaged client phase holds one copy of the client segments, and this "
        f"state has {copies}: build the state with init_state for this RoundConfig, or "
        f"set averaged_clients=False to keep one copy per client")


def make_averaged_client_phase(cfg: RoundConfig, model: SplitModel, split: bool = False):
  """The clients' side of an iteration computed with one copy of their segments.

  Exact when `cfg.clients_averaged` (see there): FedAvg of every client's SGD step equals
  one step of the common segments on sum_k d_k g_k, so every client's data goes
  through one set of weights (`apply_to_clients`) and each gradient is taken once, of
  the d-weighted sum of the clients' losses. BatchNorm still normalises each client's
  batch by itself, and the running statistics are averaged as FedAvg would. The state
  holds that one copy (leading client axis 1).

  With many samples in all (1000 clients x 8), the backward runs as a `lax.scan` over
  groups of clients (`client_group_size`) that recomputes each group's lower forward:
  one more forward of the lower, but every group's activations stay in cache and the
  program's temporary memory is one group's, not all clients'.

  Returns `forward(clients, x_model, x01, y, weights_C) -> (s_CxBxS, finish)`;
  `finish(g_CxBxS)` applies the gradients the clients received and returns (the next
  ClientState, still one copy; loss_local; loss_aux).
  """
  clients_terms = make_averaged_terms(cfg, model)
  opt_c = client_optimizer(cfg)

  def forward(clients: ClientState, x_model, x01, y_CxB, weights_C):
    check_single_copy(clients)
    params, stats, opt_state = jax.tree.map(lambda a: a[0], (clients.params, clients.stats,
                                                             clients.opt_state))
    num_clients = weights_C.shape[0]

    def update(grads, new_stats_C, losses):
      updates, new_opt = opt_c.update(grads, opt_state, params)
      new_params = optax.apply_updates(params, updates)
      # FedAvg of the statistics; heads whose term is unused keep theirs.
      new_stats = {name: (components.weighted_mean(new_stats_C[name], weights_C)
                          if name in new_stats_C else stats[name])
                   for name in ("lower",) + HEADS}
      new_clients = ClientState(*(stack_clients(t, 1)
                                  for t in (new_params, new_stats, new_opt)))
      return new_clients, losses["decoder"], losses["aux_head"]

    # Groups are a loop over the client axis: one group when it is split over devices.
    group = num_clients if split else client_group_size(num_clients, cfg.batch_size)
    if group == num_clients:
      s_CxBxS, lower_vjp, ds_local, head_grads, new_stats_C, losses = clients_terms(
          params, stats, x_model, x01, y_CxB, weights_C)

      def finish(g_CxBxS):
        # d-weighted: the cotangent of sum_k d_k (L_k + mu L^_k) w.r.t. every s_k.
        (lower_grad,) = lower_vjp(components.scale_clients(weights_C, g_CxBxS) + ds_local)
        return update({"lower": lower_grad, **head_grads}, new_stats_C, losses)

      return s_CxBxS, finish

    s_CxBxS, grouped_gradients = averaged_groups(clients_terms, model, params, stats, group,
                                                 x_model, x01, y_CxB, weights_C)
    return s_CxBxS, lambda g_CxBxS: update(*grouped_gradients(g_CxBxS))

  return forward


def make_averaged_terms(cfg: RoundConfig, model: SplitModel):
  """`terms(params, stats, x_model, x01, y_CxB, weights_C)`: s, the lower's VJP, and the
  local terms' d-weighted gradients for some clients, through one set of weights."""
  terms = make_local_losses(cfg, model)

  def clients_terms(params, stats, x_model, x01, y_CxB, weights_C):
    def lower_all(p):
      return apply_to_clients(model.lower, p, stats["lower"], x_model)
    s_CxBxS, lower_vjp, lower_stats_C = jax.vjp(lower_all, params["lower"], has_aux=True)

    def weighted_loss(module, loss_fn, s_C, p, head_stats, target_C):
      out_C, stats_C = apply_to_clients(module, p, head_stats, s_C)
      return components.weighted_sum(weights_C, jax.vmap(loss_fn)(out_C, target_C)), stats_C

    ds_local, head_grads, head_stats_C, used = local_term_gradients(
        terms, jax.lax.stop_gradient(s_CxBxS), params, stats, {"x01": x01, "y": y_CxB},
        weighted_loss)
    if cfg.nopeek_weight:  # d-weighted, as the other terms: sum_k d_k dCor(x_k, s_k)
      ds_local = ds_local + cfg.nopeek_weight * jax.grad(
          lambda s_C: components.weighted_sum(
              weights_C, jax.vmap(privacy.distance_correlation)(x01, s_C)))(
                  jax.lax.stop_gradient(s_CxBxS))
    losses = {name: used.get(name, jnp.zeros(())) for name in HEADS}
    return (s_CxBxS, lower_vjp, ds_local, head_grads, {"lower": lower_stats_C, **head_stats_C},
            losses)

  return clients_terms


def averaged_groups(clients_terms, model, params, stats, group, x_model, x01, y_CxB,
                    weights_C):
  """The averaged phase over groups of `group` clients: s from a forward-only loop, and
  `gradients(g_CxBxS) -> (summed grads, the clients' new stats, summed losses)` from a
  scan that recomputes each group's forward."""
  num_clients = weights_C.shape[0]
  to_groups = lambda a: a.reshape((num_clients // group, group) + a.shape[1:])
  from_groups = lambda a: a.reshape((num_clients,) + a.shape[2:])
  x_G, x01_G, y_G, w_G = map(to_groups, (x_model, x01, y_CxB, weights_C))
  s_CxBxS = from_groups(jax.lax.map(
      lambda x: apply_to_clients(model.lower, params["lower"], stats["lower"], x)[0], x_G))

  def gradients(g_CxBxS):
    def one_group(grads, inputs):
      x, x01_g, y, w, g = inputs
      _, lower_vjp, ds_local, head_grads, new_stats_C, losses = clients_terms(
          params, stats, x, x01_g, y, w)
      (lower_grad,) = lower_vjp(components.scale_clients(w, g) + ds_local)
      grads = jax.tree.map(jnp.add, grads, {"lower": lower_grad, **head_grads})
      return grads, (new_stats_C, losses)

    zeros = jax.tree.map(jnp.zeros_like, {"lower": params["lower"],
                                          **{n: params[n] for n in HEADS}})
    grads, (new_stats_G, losses_G) = jax.lax.scan(
        one_group, zeros, (x_G, x01_G, y_G, w_G, to_groups(g_CxBxS)))
    return (grads, jax.tree.map(from_groups, new_stats_G),
            jax.tree.map(jnp.sum, losses_G))

  return s_CxBxS, gradients


def stem_twice(stem_apply, params, stats, s):
  """(z, z) with z = stem_apply(params, stats, s), computed once; the cotangent of the
  second copy (SmashMix's, whose s is detached) reaches the parameters but not s.
  The parameter gradient of both copies is one VJP of their summed cotangents."""

  @jax.custom_vjp
  def twice(params, stats, s):
    z = stem_apply(params, stats, s)
    return z, z

  def fwd(params, stats, s):
    z, vjp = jax.vjp(stem_apply, params, stats, s)
    return (z, z), (vjp, stats)

  def bwd(residuals, cotangents):
    vjp, stats = residuals
    dz, dz_mix = cotangents
    dparams, _, _ = vjp(dz + dz_mix)
    _, _, ds = vjp(dz)
    return dparams, jax.tree.map(jnp.zeros_like, stats), ds

  twice.defvjp(fwd, bwd)
  return twice(params, stats, s)


def make_server_loss(cfg: RoundConfig, model: SplitModel):
  """sum_k delta_k (L_k + L~_k) as a function of (upper params, s_CxBxS).

  When the upper is split as head(stem(s)) with an affine stem (`models.has_stem`),
  the mixed batches are formed from the stem outputs (lam stem(s_k) + (1 - lam)
  stem(s_j) = stem(lam s_k + (1 - lam) s_j)), so the stem's forward and weight
  gradient run once over the real batches instead of twice.
  """
  mix_after_stem = cfg.smashmix and has_stem(model.upper)

  def mixed_loss(key_mix, params, stats, a_CxBx, y_CxB, weights_C, method):
    num_clients, batch = y_CxB.shape[:2]
    a_mix, y_mix = components.smashmix(key_mix, a_CxBx, y_CxB, cfg.num_classes,
                                       cfg.mixup_alpha, cfg.num_mixed,
                                       weights_C > 0 if cfg.may_drop else None)
    # Mixed batches are normalised by their own statistics; the running statistics
    # follow the real batch alone.
    mix_logits, _ = _apply(model.upper, params, stats,
                           a_mix.reshape((-1,) + a_CxBx.shape[2:]), train=True,
                           method=method)
    mix_loss_CxN = jax.vmap(jax.vmap(components.soft_cross_entropy))(
        mix_logits.reshape(y_mix.shape), y_mix)
    return components.weighted_sum(weights_C, mix_loss_CxN.mean(axis=1))

  def server_loss(params, stats, s_CxBxS, y_CxB, weights_C, key_mix):
    num_clients, batch = y_CxB.shape[:2]
    flat_s = s_CxBxS.reshape((num_clients * batch,) + s_CxBxS.shape[2:])
    # The server normalises over the concatenated batch it receives (BatchNorm).
    if mix_after_stem:
      def stem(p, st, s):
        return _apply(model.upper, p, st, s, train=True, method="stem")[0]
      if cfg.mix_grad_to_clients:
        z = z_for_mix = stem(params, stats, flat_s)
      else:
        z, z_for_mix = stem_twice(stem, params, stats, flat_s)
      logits, new_stats = _apply(model.upper, params, stats, z, train=True, method="head")
    else:
      logits, new_stats = _apply(model.upper, params, stats, flat_s, train=True)
    logits_CxBxK = logits.reshape((num_clients, batch) + logits.shape[1:])
    loss_C = jax.vmap(components.cross_entropy)(logits_CxBxK, y_CxB)
    loss_real = components.weighted_sum(weights_C, loss_C)
    correct = jnp.mean(jnp.argmax(logits_CxBxK, -1) == y_CxB)
    loss_mix = jnp.zeros(())
    if mix_after_stem:
      loss_mix = mixed_loss(key_mix, params, stats,
                            z_for_mix.reshape((num_clients, batch) + z.shape[1:]),
                            y_CxB, weights_C, "head")
    elif cfg.smashmix:
      s_src = s_CxBxS if cfg.mix_grad_to_clients else jax.lax.stop_gradient(s_CxBxS)
      loss_mix = mixed_loss(key_mix, params, stats, s_src, y_CxB, weights_C, None)
    total = loss_real + loss_mix
    return total, (new_stats, loss_real, loss_mix, correct)

  return server_loss


def make_server_step_one(cfg: RoundConfig, model: SplitModel):
  """One server step on one client's batch: (server, s_BxS, y_B) -> (server, g, L, acc).

  The step of SFL-V1's per-client copies, SFL-V2's sequential server and vanilla SL;
  g = dL_k/ds_k is computed with the server weights before the step.
  """
  opt_s = server_optimizer(cfg)

  def loss(params, stats, s_BxS, y_B):
    logits, new_stats = _apply(model.upper, params, stats, s_BxS, train=True)
    correct = jnp.mean(jnp.argmax(logits, -1) == y_B)
    return components.cross_entropy(logits, y_B), (new_stats, correct)

  def step(server: ServerState, s_BxS, y_B):
    (loss_k, (stats, acc)), (grads, g_BxS) = jax.value_and_grad(
        loss, argnums=(0, 2), has_aux=True)(server.params, server.stats, s_BxS, y_B)
    updates, opt_state = opt_s.update(grads, server.opt_state, server.params)
    return ServerState(optax.apply_updates(server.params, updates), stats, opt_state), (
        g_BxS, loss_k, acc)

  return step


def make_server_phase(cfg: RoundConfig, model: SplitModel, mesh: Mesh | None = None):
  """The server's part of a parallel iteration, by `cfg.server_mode`.

  Returns `phase(server, s_CxBxS, y_CxB, weights_C, key, step) -> (server, g_CxBxS,
  {loss_real, loss_mix, train_accuracy})`, g_k being the gradient of client k's own loss.
  """
  opt_s = server_optimizer(cfg)
  server_loss = make_server_loss(cfg, model)
  step_one = make_server_step_one(cfg, model)

  def single(server, s_CxBxS, y_CxB, weights_C, key, step):
    key_mix = jax.random.fold_in(jax.random.fold_in(key, TAG_MIX), step)
    (_, (stats, loss_real, loss_mix, acc)), (grads, ds_CxBxS) = jax.value_and_grad(
        server_loss, argnums=(0, 2), has_aux=True)(
            server.params, server.stats, s_CxBxS, y_CxB, weights_C, key_mix)
    updates, opt_state = opt_s.update(grads, server.opt_state, server.params)
    new_server = ServerState(optax.apply_updates(server.params, updates), stats, opt_state)
    # d(sum_j delta_j L_j)/ds_k / delta_k: the gradient of client k's own mean loss.
    g = components.per_weight(weights_C, ds_CxBxS)
    return new_server, g, {"loss_real": loss_real, "loss_mix": loss_mix,
                           "train_accuracy": acc}

  def per_client(server, s_CxBxS, y_CxB, weights_C, key, step):
    new_server, (g, loss_C, acc_C) = map_clients(step_one, mesh)(server, s_CxBxS, y_CxB)
    return new_server, g, {"loss_real": components.weighted_sum(weights_C, loss_C),
                           "loss_mix": jnp.zeros(()), "train_accuracy": jnp.mean(acc_C)}

  def sequential(server, s_CxBxS, y_CxB, weights_C, key, step):
    order_C = client_order(key, step, y_CxB.shape[0])

    def body(server, k):
      stepped, out = step_one(server, s_CxBxS[k], y_CxB[k])
      return components.select_tree(weights_C[k] > 0, stepped, server), out

    new_server, (g_in_order, loss_in_order, acc) = jax.lax.scan(body, server, order_C)
    g = jnp.zeros_like(g_in_order).at[order_C].set(g_in_order)
    return new_server, g, {"loss_real": components.weighted_sum(weights_C[order_C], loss_in_order),
                           "loss_mix": jnp.zeros(()), "train_accuracy": jnp.mean(acc)}

  return {"single": single, "per_client": per_client, "sequential": sequential}[
      cfg.server_mode]


def client_order(key, step, num_clients: int) -> jax.Array:
  """SFL-V2's random order of clients at this step."""
  return jax.random.permutation(
      jax.random.fold_in(jax.random.fold_in(key, TAG_ORDER), step), num_clients)


def gradmix_clients(key, step, num_clients: int, num_mixed: int) -> jax.Array:
  """The clients whose gradients GradMix averages at this step (bool mask C)."""
  chosen = jax.random.permutation(
      jax.random.fold_in(jax.random.fold_in(key, TAG_GRADMIX), step), num_clients)[:num_mixed]
  return jnp.zeros((num_clients,), bool).at[chosen].set(True)


def upload_key(key, stream_step, client):
  """The key of client `client`'s defence noise at its stream step (the iteration, or
  in vanilla SL's turns the client's mini-batch count)."""
  return jax.random.fold_in(jax.random.fold_in(
      jax.random.fold_in(key, privacy.TAG_NOISE), stream_step), client)


def defend_uploads(cfg: RoundConfig, s_CxBxS, key, step, ids_C):
  """What the server receives from every client (`ids_C`): `cfg.defend` of each upload."""
  if not cfg.defends_upload:
    return s_CxBxS
  return jax.vmap(lambda s, k: cfg.defend(upload_key(key, step, k), s))(s_CxBxS, ids_C)


def gradients_to_clients(cfg: RoundConfig, g_CxBxS, key, step):
  """What each client receives: its own gradient, GradMix's mean for the chosen, or none."""
  if cfg.client_gradient == "none":
    return jnp.zeros_like(g_CxBxS)
  if cfg.num_gradmix:
    mask_C = gradmix_clients(key, step, g_CxBxS.shape[0], cfg.num_gradmix)
    mask = mask_C.reshape((-1,) + (1,) * (g_CxBxS.ndim - 1))
    mean = jnp.sum(jnp.where(mask, g_CxBxS, 0.0), axis=0) / cfg.num_gradmix
    return jnp.where(mask, mean, g_CxBxS)
  return g_CxBxS


def make_client_update(cfg: RoundConfig):
  """Per client: opt_c(VJP_lower(g + dL_local/ds)) and the heads' own gradients."""
  opt_c = client_optimizer(cfg)

  def client_update(params, opt_state, lower_vjp, g, ds_local, head_grads):
    (lower_grad,) = lower_vjp(g + ds_local)
    grads = {"lower": lower_grad, **head_grads}
    updates, opt_state = opt_c.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return client_update


def learning_rates(cfg: RoundConfig, step, client_steps=1, server_steps=None
                   ) -> dict[str, jax.Array]:
  """The scheduled rates this iteration applies (at its first update), for the sides
  whose optimiser is a spec (a user's optax transformation declares none): `lr_client`,
  `lr_server`. `client_steps`/`server_steps`: updates per iteration (vanilla SL's turns)."""
  if server_steps is None:
    server_steps = cfg.server_updates_per_iteration
  rates = {}
  if cfg.client_tx is None:
    rates["lr_client"] = learning_rate_at(cfg.client_opt, step * client_steps)
  if cfg.server_tx is None:
    rates["lr_server"] = learning_rate_at(cfg.server_spec, step * server_steps)
  return rates


def make_round_step(cfg: RoundConfig, model: SplitModel, *, jit: bool = True,
                    mesh: Mesh | None = None,
                    client_tx: optax.GradientTransformation | None = None,
                    server_tx: optax.GradientTransformation | None = None
                    ) -> Callable[[RoundState, RoundData], tuple[RoundState, dict]]:
  """Returns `round_step(state, data) -> (state, metrics)`: one iteration, all clients.

  With `jit=True` (default) the function is jitted with the state donated; it is
  traced once for a run, since nothing in it depends on Python values of the state.
  `mesh`: the devices the clients are split over (`lfmjax.mesh`), if several; on the
  CPU the per-client loops then run per device (`map_clients`).
  `client_tx`/`server_tx`: optax transformations in place of the config's optimiser
  specs (pass the same to `init_state`).
  The clients' phase is the one `cfg.client_phase` names, chosen there alone. With
  `clients_per_round` K < C, dropouts or a deadline, it runs on the K participants it
  draws (`lfmjax.participation`).
  """
  cfg = with_optimizers(cfg, client_tx, server_tx)
  if cfg.samples_clients:  # K participants, or dropouts: the round of K, gathered
    round_step = participation.make_participation_round(
        cfg, make_all_clients_round(cfg.participants_config(), model, mesh))
  else:
    round_step = make_all_clients_round(cfg, model, mesh)
  if jit:
    return jax.jit(round_step, donate_argnums=0, compiler_options=compiler_options())
  return round_step


def make_all_clients_round(cfg: RoundConfig, model: SplitModel, mesh: Mesh | None = None):
  """The round in which every client of `cfg` takes part (weight 0: absent). A frozen
  backbone in the state (`RoundState.frozen`) is bound to the model's segments at
  trace time (`finetune.bind_frozen`): an argument of the program, held once."""

  def build(model: SplitModel):
    if cfg.client_phase == "relay":
      return make_relay_round(cfg, model)
    split = mesh is not None and mesh.size > 1  # no loops over groups of split clients
    phase = (make_averaged_client_phase(cfg, model, split)
             if cfg.client_phase == "averaged" else make_per_client_phase(cfg, model, mesh))
    return make_parallel_round(cfg, model, phase, mesh)

  def round_step(state: RoundState, data: RoundData):
    return build(finetune.bind_frozen(model, state.frozen))(state, data)

  return round_step


def average_clients(cfg: RoundConfig, clients: ClientState, weights_C) -> ClientState:
  """FedAvg of the clients' segments (and, if configured, of their optimiser states)."""
  params = components.fedavg(clients.params, weights_C)
  stats = components.fedavg(clients.stats, weights_C)
  opt_state = (components.fedavg(clients.opt_state, weights_C)
               if cfg.fedavg_opt_state else clients.opt_state)
  return ClientState(params, stats, opt_state)


def average_server(server: ServerState, weights_C) -> ServerState:
  """SFL-V1: the server's per-client copies averaged (optimiser states stay)."""
  return ServerState(components.fedavg(server.params, weights_C),
                     components.fedavg(server.stats, weights_C), server.opt_state)


def make_per_client_phase(cfg: RoundConfig, model: SplitModel, mesh: Mesh | None = None):
  """The clients' side of an iteration with every client's own segments (`map_clients`);
  returns `forward` as `make_averaged_client_phase` does (C copies in, C copies out).

  With many samples in all (1000 clients x 8), the lower's residuals of every client
  would be held from the forward to the server's gradients: instead the forward keeps s
  alone, and `finish` runs a `lax.map` over groups of clients (`client_group_size`) that
  recomputes each group's forward, then its local terms and update. One more forward
  of the lower; the program's temporary memory is one group's.
  """
  client_forward = make_client_forward(cfg, model)
  client_update = make_client_update(cfg)
  split = mesh is not None and mesh.size > 1

  def clients_step(params, stats, opt_state, x_model, x01, y_CxB, g_CxBxS):
    """Forward, local terms and update of some clients: (params, stats, opt_state,
    loss_local_C, loss_aux_C)."""
    def one(params, stats, opt_state, x_model, x01, y, g):
      _, lower_vjp, ds_local, head_grads, new_stats, loss_local, loss_aux = client_forward(
          params, stats, x_model, x01, y)
      new_params, new_opt = client_update(params, opt_state, lower_vjp, g, ds_local,
                                          head_grads)
      return new_params, new_stats, new_opt, loss_local, loss_aux
    return map_clients(one, mesh)(params, stats, opt_state, x_model, x01, y_CxB, g_CxBxS)

  def result(weights_C, new_params, new_stats, new_opt, loss_local_C, loss_aux_C):
    return (ClientState(new_params, new_stats, new_opt),
            components.weighted_sum(weights_C, loss_local_C),
            components.weighted_sum(weights_C, loss_aux_C))

  def forward(clients: ClientState, x_model, x01, y_CxB, weights_C):
    num_clients = weights_C.shape[0]
    group = num_clients if split else client_group_size(num_clients, cfg.batch_size)
    if group == num_clients:
      s_CxBxS, lower_vjp, ds_local, head_grads, new_stats, loss_local_C, loss_aux_C = (
          map_clients(client_forward, mesh)(clients.params, clients.stats, x_model, x01,
                                            y_CxB))

      def finish(g_CxBxS):
        new_params, new_opt = map_clients(client_update, mesh)(
            clients.params, clients.opt_state, lower_vjp, g_CxBxS, ds_local, head_grads)
        return result(weights_C, new_params, new_stats, new_opt, loss_local_C, loss_aux_C)

      return s_CxBxS, finish

    to_groups = lambda a: a.reshape((num_clients // group, group) + a.shape[1:])
    from_groups = lambda a: a.reshape((num_clients,) + a.shape[2:])
    grouped = jax.tree.map(to_groups, (clients.params, clients.stats, clients.opt_state,
                                       x_model, x01, y_CxB))

    def lower_forward(params, stats, x):
      return _apply(model.lower, params["lower"], stats["lower"], x, train=True)[0]

    s_CxBxS = from_groups(jax.lax.map(lambda a: map_clients(lower_forward)(*a),
                                      (grouped[0], grouped[1], grouped[3])))

    def finish(g_CxBxS):
      return result(weights_C, *jax.tree.map(from_groups, jax.lax.map(
          lambda a: clients_step(*a), (*grouped, to_groups(g_CxBxS)))))

    return s_CxBxS, finish

  return forward


def make_parallel_round(cfg: RoundConfig, model: SplitModel, clients_forward,
                        mesh: Mesh | None = None):
  """Every algorithm whose clients compute at the same time (all but vanilla SL), with
  the clients' side `clients_forward` (the averaged or the per-client phase)."""
  server_phase = make_server_phase(cfg, model, mesh)

  def fedavg(new_clients, new_server, step, weights_C):
    do_average = (step + 1) % cfg.fedavg_every == 0
    if cfg.client_phase == "per_client":  # the averaged phase has averaged already
      new_clients = jax.lax.cond(do_average, functools.partial(average_clients, cfg),
                                 lambda c, w: c, new_clients, weights_C)
    if cfg.server_mode == "per_client":
      new_server = jax.lax.cond(do_average, average_server, lambda c, w: c,
                                new_server, weights_C)
    return new_clients, new_server

  def round_step(state: RoundState, data: RoundData):
    x_model, x01, y_CxB = sample_batch(cfg, state, data)
    s_CxBxS, finish = clients_forward(state.clients, x_model, x01, y_CxB, data.weights_C)
    s_CxBxS = components.only_present(data.weights_C, s_CxBxS)
    u_CxBxS = defend_uploads(cfg, s_CxBxS, state.key, state.step, data.client_ids())
    new_server, g_true_CxBxS, server_metrics = server_phase(
        state.server, u_CxBxS, y_CxB, data.weights_C, state.key, state.step)
    # The gradient with respect to the upload goes back as the gradient for s.
    g_CxBxS = gradients_to_clients(cfg, g_true_CxBxS, state.key, state.step)
    new_clients, loss_local, loss_aux = finish(g_CxBxS)
    if cfg.fedavg:
      new_clients, new_server = fedavg(new_clients, new_server, state.step, data.weights_C)
    metrics = {**server_metrics, "loss_local": loss_local, "loss_aux": loss_aux,
               **learning_rates(cfg, state.step),
               "grad_cosine_clients": jax.vmap(privacy.gradient_cosine)(g_true_CxBxS,
                                                                        g_CxBxS)}
    new_state = state.replace(step=state.step + 1, clients=new_clients, server=new_server)
    return new_state, metrics

  return round_step


def make_relay_round(cfg: RoundConfig, model: SplitModel):
  """Vanilla sequential SL by turns: a scan over clients in order, and inside each
  client's turn a scan over its mini-batches, all in the one program.

  Client k starts its turn from the lower that client k-1 handed on (client 0 from the
  last client's of the previous iteration), processes `cfg.turn_steps` mini-batches (one
  local epoch by default) from its own stream, the server stepping on each L_k and the
  client updating with dL_k/ds_k, then hands the lower on. Decoders, heads and optimiser
  states stay with their clients. One iteration is one turn of every client.
  """
  client_forward = make_client_forward(cfg, model)
  server_step = make_server_step_one(cfg, model)
  client_update = make_client_update(cfg)

  def round_step(state: RoundState, data: RoundData):
    clients = state.clients
    steps_per_turn = cfg.turn_length(data.idx_CxM.shape[1])
    turns_C = cfg.turn_steps(data.sizes_C, data.weights_C)
    key_batch = jax.random.fold_in(state.key, TAG_BATCH)
    last = lambda tree: jax.tree.map(lambda a: a[-1], tree)

    def turn(carry, inputs):
      lower_params, lower_stats, server = carry
      k, own_params, own_stats, own_opt, row_M, size, n = inputs

      def batch_step(inner, t):
        params, stats, opt_state, server, sums = inner
        # Client k's stream goes on where its last turn stopped: n batches a turn.
        idx_B = client_batch_indices(key_batch, k, state.step * n + t, row_M, size,
                                     cfg.batch_size)
        x, x01 = cfg.preprocess(data.train_x[idx_B])
        y = data.train_y[idx_B]
        s, lower_vjp, ds_local, head_grads, new_stats, loss_local, loss_aux = client_forward(
            params, stats, x, x01, y)
        u = cfg.defend(upload_key(state.key, state.step * n + t, k), s)
        new_server, (g, loss, acc) = server_step(server, u, y)
        new_params, new_opt = client_update(params, opt_state, lower_vjp, g, ds_local,
                                            head_grads)
        done = (new_params, new_stats, new_opt, new_server,
                sums + jnp.stack([loss, acc, loss_local, loss_aux]))
        # Steps past the client's turn (a shorter client, or weight 0) change nothing.
        return components.select_tree(t < n, done, inner), None

      inner = ({**own_params, "lower": lower_params}, {**own_stats, "lower": lower_stats},
               own_opt, server, jnp.zeros((4,), jnp.float32))
      (params, stats, opt_state, server, sums), _ = jax.lax.scan(
          batch_step, inner, jnp.arange(steps_per_turn, dtype=jnp.int32))
      # The lower handed on is recorded in the client's slot too, so the last slot
      # always holds the latest lower (a client of weight 0 passes it on unchanged).
      return ((params["lower"], stats["lower"], server),
              (params, stats, opt_state, sums / jnp.maximum(n, 1)))

    carry = (last(clients.params["lower"]), last(clients.stats["lower"]), state.server)
    ids_C = data.client_ids()
    (_, _, new_server), (params, stats, opt_state, means_Cx4) = jax.lax.scan(
        turn, carry, (ids_C, clients.params, clients.stats, clients.opt_state,
                      data.idx_CxM, data.sizes_C, turns_C))
    w = data.weights_C
    loss_C, acc_C, local_C, aux_C = means_Cx4.T
    metrics = {"loss_real": components.weighted_sum(w, loss_C), "loss_mix": jnp.zeros(()),
               "train_accuracy": components.weighted_sum(w, acc_C),
               "loss_local": components.weighted_sum(w, local_C),
               "loss_aux": components.weighted_sum(w, aux_C),
               **learning_rates(cfg, state.step, client_steps=steps_per_turn,
                                server_steps=jnp.sum(turns_C))}
    new_state = state.replace(step=state.step + 1,
                              clients=ClientState(params, stats, opt_state), server=new_server)
    return new_state, metrics

  return round_step


def make_multi_step(round_step, num_steps: int, *, jit: bool = True):
  """`num_steps` iterations in one dispatch (lax.scan); metrics stacked on axis 0."""

  def multi_step(state: RoundState, data: RoundData):
    def body(state, _):
      return round_step(state, data)
    return jax.lax.scan(body, state, None, length=num_steps)

  if jit:
    return jax.jit(multi_step, donate_argnums=0, compiler_options=compiler_options())
  return multi_step
