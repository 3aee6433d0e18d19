"""The base configuration every file in `configs/` starts from.

One field a line; `None` (a placeholder) means "derived": the algorithm's switch, the
client's optimiser or learning rate, the run's seed. Override any field on the command
line with `--config.FIELD=VALUE`.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  _algorithm_fields(c)
  _data_fields(c)
  _model_fields(c)
  _component_fields(c)
  _participation_fields(c)
  _optimisation_fields(c)
  _privacy_fields(c)
  _latency_fields(c)
  _run_fields(c)
  _device_fields(c)
  return c


def _algorithm_fields(c: ml_collections.ConfigDict) -> None:
  """Algorithm (see `python -m lfmjax.main --list`)."""
  c.algorithm = "locfedmix"          # sl|psl|sfl_v1|sfl_v2|locsplitfed|locfedmix|sglr|mix2sfl
  c.local_loss = config_dict.placeholder(bool)  # Loc, local MI loss; None: the algorithm's
  c.fedavg = config_dict.placeholder(bool)    # Fed, FedAvg of client segments; None: algorithm's
  c.smashmix = config_dict.placeholder(bool)  # Mix, SmashMix; None: the algorithm's
  c.gradmix = config_dict.placeholder(bool)   # GradMix (SGLR); None: the algorithm's


def _data_fields(c: ml_collections.ConfigDict) -> None:
  """Data."""
  c.dataset = "fashion_mnist"        # fashion_mnist | cifar10 | kjv (text, by book) | kjv_public
  c.data_dir = config_dict.placeholder(str)  # else $LFMJAX_DATA_DIR, system dirs, cache
  c.data_download = True             # try the official download if no local copy
  c.data_verify = True               # check the official checksums and counts (False: subsets)
  c.partition = "iid"                # iid | dirichlet | shards | fixed | groups (text: books)
  c.dirichlet_alpha = 0.5            # Dirichlet concentration (partition=dirichlet)
  c.classes_per_client = 2           # classes a client sees (partition=shards)
  c.samples_per_client = 1000        # samples a client holds (partition=fixed, SGLR)
  c.partition_seed = config_dict.placeholder(int)  # None: seed
  c.validation_size = 0              # train images held out for validation (SGLR: 10,000)
  c.input = ml_collections.ConfigDict()
  c.input.resize_to = config_dict.placeholder(int)  # square side; None: as stored
  c.input.channels = config_dict.placeholder(int)   # repeat grey to 3; None: as stored
  c.input.normalize = "none"         # none: [0,1] | pm1: [-1,1] | standard: (x-mean)/std
  c.input.mean = config_dict.placeholder(tuple)     # per-channel, normalize=standard
  c.input.std = config_dict.placeholder(tuple)      # per-channel, normalize=standard
  c.input.seq_len = 128              # text datasets: byte tokens a sample (its targets: the next)


def _model_fields(c: ml_collections.ConfigDict) -> None:
  """Model."""
  c.model = "bench_cnn"              # bench_cnn | resnet16 | vgg | tiny_cnn | mlp | vit | lm
  c.model_overrides = ml_collections.ConfigDict()  # None: the model's default
  o = c.model_overrides  # each model takes some of these (`--config.model_overrides.cut=1`)
  o.cut_stage = config_dict.placeholder(int)       # resnet16: stages on the client (1-3)
  o.cut = config_dict.placeholder(int)             # vgg: conv blocks on the client
  o.widths = config_dict.placeholder(tuple)        # vgg: channels per block
  o.hidden = config_dict.placeholder(int)          # vgg, mlp: hidden units of the dense layer
  o.batch_norm = config_dict.placeholder(bool)     # vgg: BatchNorm after each conv
  o.width = config_dict.placeholder(int)           # tiny_cnn: channels; vit, lm: token width
  o.decoder_hidden = config_dict.placeholder(int)  # conv models, vit: the Loc decoder's width
  o.patch = config_dict.placeholder(int)           # vit: patch side in pixels
  o.depth = config_dict.placeholder(int)           # vit, lm: encoder blocks in all
  o.heads = config_dict.placeholder(int)           # vit, lm: attention heads
  o.mlp_dim = config_dict.placeholder(int)         # vit, lm: hidden units of a block's MLP
  o.pool = config_dict.placeholder(str)            # vit: mean | cls (a class token)
  # (vit, lm: `cut` is the blocks on the client)
  _finetune_fields(c)


def _finetune_fields(c: ml_collections.ConfigDict) -> None:
  """Fine-tuning a pretrained backbone with LoRA adapters (`lfmjax.finetune`; vit, lm)."""
  c.pretrained = config_dict.placeholder(str)  # a pretraining run's --workdir; None: from scratch
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0                    # r of the adapters B A; 0: no adapters, train everything
  c.lora.alpha = 16.0                # the adapters' scale is alpha / r
  c.lora.targets = ("query", "key", "value", "out")  # dense layers adapted (also mlp1, mlp2)
  c.lora.segments = "both"           # client | server | both: where adapters train; rest frozen


def _component_fields(c: ml_collections.ConfigDict) -> None:
  """Clients and components."""
  c.num_clients = 10                 # C
  c.batch_size = 32                  # B, per client per iteration
  c.local_loss_weight = 1.0          # mu, weight of the local MI loss in the client update
  c.local_loss_kind = "bce"          # R: bce (InfoPro) | mse
  c.local_ce_weight = config_dict.placeholder(float)  # aux-head CE weight; None: algorithm's
  c.num_mixed = 1                    # n_s, SmashMix batches per client
  c.mixup_alpha = 2.0                # lambda ~ Beta(alpha, alpha)
  c.mix_grad_to_clients = False      # let mixed samples' gradients reach the lowers
  c.fedavg_every = 1                 # T_c, iterations between FedAvgs
  c.fedavg_opt_state = False         # average client optimiser states too
  c.averaged_clients = True          # one shared client copy where exact (linear opt, T_c=1)
  c.gradmix_fraction = 0.5           # phi, fraction of clients whose gradients are mixed
  c.sl_turn_steps = config_dict.placeholder(int)  # sl: mini-batches a turn; None: one local epoch
  c.client_head = False              # U-shaped split: clients hold the last layer and the loss


def _participation_fields(c: ml_collections.ConfigDict) -> None:
  """Participation: clients that come and go (`lfmjax.participation`)."""
  c.clients_per_round = config_dict.placeholder(int)  # K participants an iteration; None: all C
  c.participant_sampling = "uniform"  # uniform | by_size (in proportion to |D_k|)
  c.dropout_prob = 0.0               # a participant drops out of an iteration with this p
  c.deadline_s = config_dict.placeholder(float)  # participants slower (simulated s) are dropped


def _optimisation_fields(c: ml_collections.ConfigDict) -> None:
  """Optimisation."""
  c.client_optimizer = "sgd"         # sgd | momentum | adam | adamw
  c.client_lr = 0.01                 # eta_c, the peak of the schedule
  c.client_schedule = "constant"     # constant | cosine | warmup_cosine | step
  c.server_optimizer = config_dict.placeholder(str)  # None: client_optimizer
  c.server_lr = config_dict.placeholder(float)  # None: client_lr * C ** server_lr_exponent
  c.server_lr_exponent = config_dict.placeholder(float)  # SplitLr alpha_lr; None: algorithm's (sglr 0.5)
  c.server_schedule = config_dict.placeholder(str)  # None: client_schedule
  c.momentum = 0.0                   # SGD momentum, both sides (momentum: 0 means 0.9)
  c.weight_decay = 0.0               # decoupled for adamw, added to the gradient else
  c.grad_clip_norm = config_dict.placeholder(float)  # clip by global norm; None: off
  c.warmup_fraction = 0.05           # warmup_cosine: share of the run warming up
  c.decay_fractions = (0.8,)         # step: where the rate drops (fractions of the run)
  c.decay_factor = 0.1               # step: the factor at each drop


def _privacy_fields(c: ml_collections.ConfigDict) -> None:
  """Privacy: defences on the smashed data, and the leakage measured at evaluations."""
  c.privacy = ml_collections.ConfigDict()
  p = c.privacy
  p.noise_std = 0.0                  # Gaussian noise sigma on every upload of s (0: off)
  p.noise_snr_db = config_dict.placeholder(float)  # or sigma for this SNR per batch (dB)
  p.quantize_bits = 0                # k-bit quantisation of s, per sample (0: off)
  p.nopeek_weight = 0.0              # NoPeek: weight of dCor(x, s) in each client's loss
  p.probe_size = 64                  # samples per client for dCor(x, s) at evaluations (0: off)
  p.grad_noise_std = 0.0             # label holder's gradient + N(0, sigma^2) (0: off)
  p.grad_max_norm = False            # Li et al.'s max-norm noise on that gradient
  p.grad_keep_fraction = 1.0         # top-k sparsification of it: the share kept (1: off)
  p.grad_quantize_bits = 0           # k-bit quantisation of it, per sample (0: off)
  p.label_rr_epsilon = config_dict.placeholder(float)  # randomised response on server labels


def _latency_fields(c: ml_collections.ConfigDict) -> None:
  """Simulated latency (SPEC: communication and latency)."""
  c.client_flops_per_s = 1e10        # a client's compute rate (10 GFLOP/s)
  c.server_flops_per_s = 1e13        # the server's compute rate (10 TFLOP/s)
  c.uplink_bytes_per_s = 1.25e6      # client -> server (10 Mbit/s)
  c.downlink_bytes_per_s = 6.25e6    # server -> client (50 Mbit/s)
  c.devices = ml_collections.ConfigDict()  # per-client rates (`lfmjax.devices`)
  c.devices.distribution = "homogeneous"  # homogeneous | lognormal | trace
  c.devices.spread = 1.0             # lognormal: sigma of log-rate; the rates above are medians
  c.devices.trace = config_dict.placeholder(str)  # CSV: client,flops_per_s,up_bytes_per_s,down_bytes_per_s
  c.devices.seed = config_dict.placeholder(int)   # the draw's seed; None: seed


def _run_fields(c: ml_collections.ConfigDict) -> None:
  """Run."""
  c.seed = 0                         # model init, batches, mixup draws
  c.num_seeds = 1                    # S replicas (seeds seed..seed+S-1) in one vmapped program
  c.num_iterations = 1000            # iterations (every client one mini-batch each)
  c.steps_per_dispatch = 10          # iterations fused into one lax.scan dispatch
  c.eval_every = 100                 # iterations between test evaluations
  c.eval_clients = 20                # clients evaluated when lowers differ (0: all)
  c.eval_chunk = 1000                # test samples per evaluation batch
  c.eval_samples = 0                 # samples of each split evaluated (0: all; N: a fixed subset)


def _device_fields(c: ml_collections.ConfigDict) -> None:
  """Devices and hosts (clients are spread over every device; BUILD.md: Scale-out)."""
  c.distributed = ml_collections.ConfigDict()
  c.num_devices = 0                  # devices the clients are spread over (0: all of them)
  c.distributed.enabled = False      # call jax.distributed.initialize (multi-host)
  c.distributed.coordinator_address = config_dict.placeholder(str)  # host:port; None: env
  c.distributed.num_processes = config_dict.placeholder(int)  # None: from the environment
  c.distributed.process_id = config_dict.placeholder(int)     # None: from the environment
  c.distributed.local_device_count = config_dict.placeholder(int)  # CPU devices per process
  c.checkpoint_every = 500           # iterations between checkpoints in --workdir (0: none)
  c.keep_checkpoints = 3             # checkpoints kept (the newest)
