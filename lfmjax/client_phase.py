"""The clients' side of a parallel iteration (LocFedMix-SL, Oh et al., WWW 2022): each
client's forward through its lower, its local terms (Loc's decoder, an aux head's CE,
NoPeek) and, once the server's gradients are in, its update. Two phases, which
`RoundConfig.client_phase` chooses: every client with its own segments
(`make_per_client_phase`), or one copy for all where FedAvg after every iteration makes
that exact (`make_averaged_client_phase`). Both return `forward(clients, x_model, x01,
y, weights) -> (s, finish)`, `finish(g, head_grads=None)` taking the gradients the
clients received (and, in a U-shaped split, their heads' own gradients).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from lfmjax import components, privacy
from lfmjax.algorithms import RoundConfig
from lfmjax.lifting import apply_segment as _apply, map_clients
from lfmjax.models import SplitModel
from lfmjax.state import ClientState, client_optimizer, stack_clients


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
    new_stats = {**{name: v for name, v in stats.items() if name != "lower"}, **head_stats}
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
  `finish(g_CxBxS, head_grads_C=None)` applies the gradients the clients received (and
  a U-shaped split's heads' own gradients, d-weighted into the one copy) and returns (the next
  ClientState, still one copy; loss_local; loss_aux).
  """
  clients_terms = make_averaged_terms(cfg, model)
  opt_c = client_optimizer(cfg)

  def forward(clients: ClientState, x_model, x01, y_CxB, weights_C):
    check_single_copy(clients)
    params, stats, opt_state = jax.tree.map(lambda a: a[0], (clients.params, clients.stats,
                                                             clients.opt_state))
    num_clients = weights_C.shape[0]

    def update(grads, new_stats_C, losses, head_grads_C=None):
      if head_grads_C is not None:  # FedAvg of the heads' steps: one on the d-weighted sum
        grads = {**grads, "head": components.weighted_mean(head_grads_C, weights_C)}
      updates, new_opt = opt_c.update(grads, opt_state, params)
      new_params = optax.apply_updates(params, updates)
      # FedAvg of the statistics; heads whose term is unused keep theirs.
      new_stats = {name: (components.weighted_mean(new_stats_C[name], weights_C)
                          if name in new_stats_C else stats[name])
                   for name in stats}
      new_clients = ClientState(*(stack_clients(t, 1)
                                  for t in (new_params, new_stats, new_opt)))
      return new_clients, losses["decoder"], losses["aux_head"]

    # Groups are a loop over the client axis: one group when it is split over devices.
    group = num_clients if split else client_group_size(num_clients, cfg.batch_size)
    if group == num_clients:
      s_CxBxS, lower_vjp, ds_local, head_grads, new_stats_C, losses = clients_terms(
          params, stats, x_model, x01, y_CxB, weights_C)

      def finish(g_CxBxS, head_grads_C=None):
        # d-weighted: the cotangent of sum_k d_k (L_k + mu L^_k) w.r.t. every s_k.
        (lower_grad,) = lower_vjp(components.scale_clients(weights_C, g_CxBxS) + ds_local)
        return update({"lower": lower_grad, **head_grads}, new_stats_C, losses, head_grads_C)

      return s_CxBxS, finish

    s_CxBxS, grouped_gradients = averaged_groups(clients_terms, model, params, stats, group,
                                                 x_model, x01, y_CxB, weights_C)
    return s_CxBxS, lambda g_CxBxS, head_grads_C=None: update(
        *grouped_gradients(g_CxBxS), head_grads_C)

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


def make_client_update(cfg: RoundConfig):
  """Per client: opt_c(VJP_lower(g + dL_local/ds)) and the heads' own gradients."""
  opt_c = client_optimizer(cfg)

  def client_update(params, opt_state, lower_vjp, g, ds_local, head_grads):
    (lower_grad,) = lower_vjp(g + ds_local)
    grads = {"lower": lower_grad, **head_grads}
    updates, opt_state = opt_c.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return client_update


def head_extra(head_grads_C) -> dict:
  """A U-shaped split's head gradients as client-segment gradients ({} without)."""
  return {} if head_grads_C is None else {"head": head_grads_C}


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

  def clients_step(params, stats, opt_state, x_model, x01, y_CxB, g_CxBxS, extra_C):
    """Forward, local terms and update of some clients: (params, stats, opt_state,
    loss_local_C, loss_aux_C). `extra_C`: gradients from outside the client's own
    terms ({'head': ...} in a U-shaped split, else empty)."""
    def one(params, stats, opt_state, x_model, x01, y, g, extra):
      _, lower_vjp, ds_local, head_grads, new_stats, loss_local, loss_aux = client_forward(
          params, stats, x_model, x01, y)
      new_params, new_opt = client_update(params, opt_state, lower_vjp, g, ds_local,
                                          {**head_grads, **extra})
      return new_params, new_stats, new_opt, loss_local, loss_aux
    return map_clients(one, mesh)(params, stats, opt_state, x_model, x01, y_CxB, g_CxBxS,
                                  extra_C)

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

      def finish(g_CxBxS, head_grads_C=None):
        new_params, new_opt = map_clients(client_update, mesh)(
            clients.params, clients.opt_state, lower_vjp, g_CxBxS, ds_local,
            {**head_grads, **head_extra(head_grads_C)})
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

    def finish(g_CxBxS, head_grads_C=None):
      extra = jax.tree.map(to_groups, head_extra(head_grads_C))
      return result(weights_C, *jax.tree.map(from_groups, jax.lax.map(
          lambda a: clients_step(*a), (*grouped, to_groups(g_CxBxS), extra))))

    return s_CxBxS, finish

  return forward
