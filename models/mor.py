"""Mixture-of-Recursions (arXiv 2507.10524; ../shared/specs/grassmann-tokenformer-mor.md §3) and its baselines.

Three registered names share one Llama-style decoder (RMSNorm, RoPE, SwiGLU, optional GQA, tied
embeddings, no biases):
  llama      vanilla: every layer unique.
  recursive  `num_layers` unrolled layers drawn from a smaller pool by a sharing scheme; every token
             takes every recursion.
  mor        recursive + a router that picks, per token, how many recursions it takes.

Sharing (`layer_plan`): cycle uses pool[l mod (L/N_r)], sequence pool[l // N_r]; the middle_ variants
keep the first and last layer unique and share the L-2 between. One recursion is one pass through the
pool, so the routers need a cycle scheme.

Expert-choice router (`router=expert`, the paper's recipe): at recursion r a bias-free linear scorer
gives g = alpha·σ(θ_rᵀh) (alpha = 0.1); training keeps the top k_r = max(1, ⌊cap_r·T⌋) of the tokens
that survived recursion r-1 (cap_r = (N_r-r+1)/N_r), in causal order with their own positions, and
updates them h <- h + g·f(h), where f is the whole pool stack with its inner residuals. The auxiliary
BCE pushes σ towards the top-k membership (coefficient 1e-3), so that generation can decide causally
with σ > 0.5. Evaluation (`eval_routing`): `topk` (default), as in training and as the official code
evaluates, picks each recursion's top k_r of the whole window, so a token's depth depends on later
tokens' scores (not causal); `threshold` routes by σ > 0.5, causally, as decoding always does. Report
both: `python -m train.evaluate` gives top-k, `--config.model.eval_routing=threshold` the causal numbers
(experiments/mor.py evaluates both). A recursion at capacity 1 passes every candidate in both modes.

Token-choice router (`router=token`): one softmax over N_r at the first recursion; the token takes
i = argmax recursions, intermediate recursions pass f(h) on, the last gives h¹ + g_i·f(hⁱ) (alpha = 1).
Switch balancing loss (0.1), or the loss-free bias (`token_balancing=loss_free`), optional z-loss.

Attention at recursion r sees only the tokens active at r (recursion-wise caching); `kv_sharing`
instead takes every deeper recursion's keys and values from recursion 1 (all tokens), by feeding the
recursion-1 layer inputs as the attention's key/value inputs through the same shared weights.

Execution: training top-k gathers the k_r selected tokens and scatters the update back (`gather`); the
dense reference runs every token through every recursion with masks and is what threshold routing,
token-choice and cached decoding use (static shapes everywhere). Decoding keeps one KV cache (with the
keys' validity) per use of a shared layer.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from models import layers, stack
from models.registry import LanguageModel, register

SHARING = ('cycle', 'sequence', 'middle_cycle', 'middle_sequence')


def layer_plan(num_layers: int, num_recursions: int, sharing: str) -> list[str]:
  """The parameter set (module name) each of the `num_layers` unrolled layers uses."""
  middle = sharing.startswith('middle_')
  n = num_layers - 2 if middle else num_layers
  if sharing.endswith('cycle'):
    names = [f'block_{layer % (n // num_recursions)}' for layer in range(n)]
  else:
    names = [f'block_{layer // num_recursions}' for layer in range(n)]
  return ['first', *names, 'last'] if middle else names


def default_capacities(num_recursions: int) -> tuple[float, ...]:
  """Fraction of the sequence kept at each recursion: (N_r - r + 1) / N_r."""
  return tuple((num_recursions - r) / num_recursions for r in range(num_recursions))


def take(x: jax.Array, index: jax.Array) -> jax.Array:
  """x[b, index[b, j], ...] for x [batch, length, ...] and index [batch, k]."""
  return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


class RecursiveLM(LanguageModel):
  """The shared decoder; the registered subclasses below set its defaults."""
  state_collections = ('router_state',)   # the loss-free balancing bias (router=token)
  causal_evaluation = {'eval_routing': 'threshold'}   # expert choice's σ > 0.5, as decoding routes
  # paper: MoR 360M, N_r = 3, Middle-Cycle, expert choice (spec grassmann-tokenformer-mor.md §3.1, Table 3)
  presets = {'tiny': dict(d_model=32, num_layers=5, num_recursions=3, num_heads=2, d_ff=64, max_len=32),
             'paper': dict(d_model=960, num_layers=32, num_recursions=3, num_heads=15, num_kv_heads=5, d_ff=2560,
                           max_len=2048)}

  @classmethod
  def arena_layout(cls, *, d_model, depth, heads):
    """Middle-Cycle: unique first and last layers, `depth` - 2 unique blocks applied 3 times; SwiGLU at 8/3."""
    return dict(num_layers=2 + (depth - 2) * 3, num_recursions=3, num_heads=heads, d_ff=8 * d_model // 3)
  vocab_size: int = 256
  d_model: int = 256
  num_heads: int = 4
  num_kv_heads: int = 0            # 0: as many as num_heads
  d_ff: int = 683
  num_layers: int = 14             # unrolled (effective) layers: 1 + 4 x 3 + 1
  num_recursions: int = 3
  sharing: str = 'middle_cycle'
  router: str = 'expert'           # none | expert | token
  capacities: str = ''             # expert: comma-separated fractions per recursion; '' = (N_r - r + 1) / N_r
  expert_alpha: float = 0.1
  expert_aux_coef: float = 1e-3    # BCE of the router logits against their own top-k
  eval_routing: str = 'topk'       # expert at evaluation: topk (as in training, the official code) | threshold
  token_alpha: float = 1.0
  token_balancing: str = 'loss'    # loss (Switch, balance_coef) | loss_free (selection bias)
  balance_coef: float = 0.1
  bias_update_rate: float = 1e-3
  z_loss_coef: float = 0.0
  kv_sharing: bool = False
  gather: bool = True              # training top-k: gather the selected tokens (False: the dense reference)
  max_len: int = 2048              # only bounds train.seq_len (RoPE needs no table)
  dtype: str = 'float32'
  attention_impl: str = 'fused'    # layers.ATTENTION_IMPLS
  remat: str = 'none'              # stack.REMAT_POLICIES (no scan_layers: the plan shares and routes layers)

  def validate(self):
    super().validate()
    layers.check_attention_impl(self.attention_impl)
    stack.check_remat(self.remat)
    if self.sharing not in SHARING:
      raise ValueError(f'model.sharing={self.sharing!r} must be one of {", ".join(SHARING)}')
    if self.router not in ('none', 'expert', 'token'):
      raise ValueError(f"model.router={self.router!r} must be 'none', 'expert' or 'token'")
    shared = self.num_layers - 2 if self.sharing.startswith('middle_') else self.num_layers
    if self.num_recursions < 1 or shared < self.num_recursions or shared % self.num_recursions:
      raise ValueError(f'model.num_recursions={self.num_recursions} must divide the {shared} shared layers of '
                       f'model.num_layers={self.num_layers} ({self.sharing})')
    if self.router != 'none' and not self.sharing.endswith('cycle'):
      raise ValueError(f'model.router={self.router} needs a cycle sharing scheme (one recursion = one pass '
                       f'through the pool), not {self.sharing}')
    if self.num_heads % self.kv_heads:
      raise ValueError(f'model.num_kv_heads={self.num_kv_heads} must divide model.num_heads={self.num_heads}')
    caps = self.capacity_fractions
    if len(caps) != self.num_recursions or any(not 0 < c <= 1 for c in caps) or list(caps) != sorted(caps)[::-1]:
      raise ValueError(f'model.capacities={self.capacities!r} must give {self.num_recursions} non-increasing '
                       'fractions in (0, 1]')
    if self.kv_sharing and (self.router == 'none' or caps[0] < 1):
      raise ValueError('model.kv_sharing needs a router whose first recursion takes every token')
    if self.eval_routing not in ('threshold', 'topk'):
      raise ValueError(f"model.eval_routing={self.eval_routing!r} must be 'threshold' or 'topk'")
    if self.token_balancing not in ('loss', 'loss_free'):
      raise ValueError(f"model.token_balancing={self.token_balancing!r} must be 'loss' or 'loss_free'")

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def capacity_fractions(self) -> tuple[float, ...]:
    if self.capacities:
      return tuple(float(c) for c in self.capacities.split(','))
    return default_capacities(self.num_recursions)

  def capacity_tokens(self, recursion: int, length: int) -> int:
    return max(1, math.floor(self.capacity_fractions[recursion] * length))

  @property
  def prefix(self) -> int:
    return 1 if self.sharing.startswith('middle_') else 0

  @property
  def pool_size(self) -> int:
    return (self.num_layers - 2 * self.prefix) // self.num_recursions

  @nn.compact
  def __call__(self, tokens, *, train: bool = False, decode: bool = False):
    dtype = jnp.dtype(self.dtype)
    embed = layers.Embed(self.vocab_size, self.d_model, dtype=dtype, name='embed')
    x = embed(tokens)
    positions = jnp.broadcast_to(layers.sequence_positions(self, tokens.shape[1], decode), tokens.shape)
    plan = layer_plan(self.num_layers, self.num_recursions, self.sharing)
    # The layer loop is the recursion plan's (shared blocks, routed tokens), not `stack.apply_blocks`'s; the
    # blocks are the shared Llama blocks, rematerialised by the shared policy.
    block_cls = stack.remat(layers.Block, self.remat)
    blocks = {name: block_cls(d_model=self.d_model, num_heads=self.num_heads, d_ff=self.d_ff, norm='rmsnorm',
                              mlp='swiglu', use_rope=True, use_bias=False, dtype=dtype,
                              out_init=layers.residual_init(self.num_layers), num_kv_heads=self.num_kv_heads or None,
                              attention_impl=self.attention_impl, name=name)
              for name in dict.fromkeys(plan)}

    def run(name, use, h, pos, kv_inputs=None, kv_positions=None, kv_valid=None):
      """Block `name` at its `use`-th application (each use keeps its own decode cache)."""
      mask = None if decode else layers.causal_mask(pos, pos if kv_positions is None else kv_positions)
      context = stack.Context(mask=mask, positions=pos, kv_inputs=kv_inputs, kv_positions=kv_positions,
                              kv_valid=kv_valid, train=train, decode=decode, cache_slot=f'_{use}' if use else '')
      return blocks[name](h, context)

    aux = {}
    if self.router == 'none':
      uses = {}
      for name in plan:
        uses[name] = uses.get(name, -1) + 1
        x = run(name, uses[name], x, positions)
    else:
      x = run('first', 0, x, positions) if self.prefix else x
      if self.router == 'token':
        x, aux = self._token_choice(run, x, positions, train)
      # A decoded token cannot see the tokens after it: decoding routes by the threshold whatever eval_routing says.
      elif (self.gather and train) or (not train and not decode and self.eval_routing == 'topk'):
        x, aux = self._expert_gather(run, x, positions)
      else:
        x, aux = self._expert_dense(run, x, positions, topk=train)
      x = run('last', 0, x, positions) if self.prefix else x
    x = layers.norm('rmsnorm', dtype=dtype, name='final_norm')(x)
    return embed.attend(x).astype(jnp.float32), aux

  # ---- one recursion: the pool stack --------------------------------------------------------------

  def _recursion(self, run, r, h, pos, kv_first=None, **kw):
    """f(h): the pool's blocks in order at recursion r. Returns f(h) and each block's input (kept at
    recursion 1 for `kv_sharing`, whose deeper recursions take keys and values from them)."""
    inputs = []
    for j in range(self.pool_size):
      inputs.append(h)
      shared = {} if kv_first is None else {'kv_inputs': kv_first[j]}
      h = run(f'block_{j}', r, h, pos, **shared, **kw)
    return h, inputs

  def _shared_kv(self, r, kv_first, positions):
    """With kv_sharing, recursions after the first attend recursion 1's keys and values (every token)."""
    return dict(kv_first=kv_first, kv_positions=positions) if self.kv_sharing and r > 0 else {}

  def _masked_recursion(self, run, r, h, positions, active, kv_first):
    """f(h) for every token, attending only the keys `active` at r (or recursion 1's, shared); returns
    f(h) and the recursion-1 block inputs."""
    shared_kv = self._shared_kv(r, kv_first, positions)
    y, inputs = self._recursion(run, r, h, positions, kv_valid=jnp.ones_like(active) if shared_kv else active,
                                **shared_kv)
    return y, inputs if r == 0 else kv_first

  # ---- expert-choice ------------------------------------------------------------------------------

  def _routers(self):
    return [layers.dense(1, ('embed', None), use_bias=False, kernel_init=nn.initializers.normal(0.02),
                         dtype=jnp.dtype(self.dtype), name=f'router_{r}') for r in range(self.num_recursions)]

  def _expert_losses(self, logits_by_r, targets_by_r, candidates_by_r, selected_by_r):
    """Auxiliary BCE (each router against its own top-k, mean over its candidates, summed over
    recursions), the optional z-loss and the router statistics; sows the [recursion, batch, length]
    selection masks as intermediates 'selected'."""
    self.sow('intermediates', 'selected', jnp.stack(selected_by_r))
    aux = {f'mor/utilisation_r{r + 1}': selected.mean() for r, selected in enumerate(selected_by_r)}
    bce, z = 0.0, 0.0
    for r, (logits, targets, cand) in enumerate(zip(logits_by_r, targets_by_r, candidates_by_r)):
      logits = logits.astype(jnp.float32)
      n = jnp.maximum(cand.sum(), 1)
      per_token = optax.sigmoid_binary_cross_entropy(logits, targets.astype(jnp.float32))
      bce += jnp.where(cand, per_token, 0).sum() / n
      z += jnp.where(cand, logits ** 2, 0).sum() / n   # logsumexp over one logit is the logit
      aux[f'mor/sigma_above_half_r{r + 1}'] = jnp.where(cand, logits > 0, False).sum() / n
      aux[f'mor/agreement_r{r + 1}'] = jnp.where(cand, (logits > 0) == targets, False).sum() / n
    # Dead tokens: sequence positions that no row of the batch sends through the last recursion.
    aux['mor/dead_token_ratio'] = 1.0 - selected_by_r[-1].any(axis=0).mean()
    aux['loss/router_bce'] = self.expert_aux_coef * bce
    if self.z_loss_coef:
      aux['loss/router_z'] = self.z_loss_coef * z
    return aux

  def _expert_gather(self, run, x, positions):
    """Training top-k, compacted: the k_r selected tokens (sorted back into causal order) run the pool."""
    batch, length = positions.shape
    rows = jnp.arange(batch)[:, None]
    index = jnp.broadcast_to(jnp.arange(length), (batch, length))   # the candidates, in the full sequence
    logits_by_r, targets_by_r, candidates_by_r, selected_masks = [], [], [], []
    kv_first = None
    for r, router in enumerate(self._routers()):
      h = take(x, index)
      logits = router(h)[..., 0]
      k = self.capacity_tokens(r, length)
      chosen = (jnp.broadcast_to(jnp.arange(k), (batch, k)) if k == index.shape[1]
                else jnp.sort(jax.lax.top_k(logits, k)[1], axis=-1))
      targets = jnp.zeros(logits.shape, bool).at[rows, chosen].set(True)
      logits_by_r.append(logits), targets_by_r.append(targets)
      candidates_by_r.append(jnp.ones(logits.shape, bool))
      index, gate = take(index, chosen), self.expert_alpha * jax.nn.sigmoid(take(logits, chosen))
      selected = jnp.zeros((batch, length), bool).at[rows, index].set(True)
      selected_masks.append(selected)
      # The compacted sequence holds only active tokens: a causal mask over it is the whole restriction.
      y, inputs = self._recursion(run, r, take(h, chosen), take(positions, index),
                                  **self._shared_kv(r, kv_first, positions))
      kv_first = inputs if r == 0 else kv_first
      x = x.at[rows, index].add((gate[..., None] * y).astype(x.dtype))
    return x, self._expert_losses(logits_by_r, targets_by_r, candidates_by_r, selected_masks)

  def _expert_dense(self, run, x, positions, topk: bool):
    """Every token through every recursion, the update masked to the selected ones: the reference for
    the gathered top-k, and the causal σ > 0.5 routing of threshold evaluation and of decoding."""
    batch, length = positions.shape
    rows = jnp.arange(batch)[:, None]
    active = jnp.ones((batch, length), bool)
    logits_by_r, targets_by_r, candidates_by_r, selected_masks = [], [], [], []
    kv_first = None
    for r, router in enumerate(self._routers()):
      logits = router(x)[..., 0]
      if self.capacity_fractions[r] >= 1:
        selected = active
      elif topk:
        chosen = jax.lax.top_k(jnp.where(active, logits, -jnp.inf), self.capacity_tokens(r, length))[1]
        selected = jnp.zeros_like(active).at[rows, chosen].set(True)
      else:
        selected = active & (logits > 0)
      logits_by_r.append(logits), targets_by_r.append(selected), candidates_by_r.append(active)
      selected_masks.append(selected)
      y, kv_first = self._masked_recursion(run, r, x, positions, selected, kv_first)
      gate = self.expert_alpha * jax.nn.sigmoid(logits)
      x = x + jnp.where(selected[..., None], gate[..., None] * y, 0).astype(x.dtype)
      active = selected
    return x, self._expert_losses(logits_by_r, targets_by_r, candidates_by_r, selected_masks)

  # ---- token-choice -------------------------------------------------------------------------------

  def _token_choice(self, run, x, positions, train):
    n = self.num_recursions
    logits = layers.dense(n, ('embed', None), use_bias=False, kernel_init=nn.initializers.normal(0.02),
                          dtype=jnp.dtype(self.dtype), name='router')(x).astype(jnp.float32)
    probs = jax.nn.softmax(logits)
    loss_free = self.token_balancing == 'loss_free'
    bias = self.variable('router_state', 'bias', jnp.zeros, (n,), jnp.float32) if loss_free else None
    choice = jnp.argmax(probs + bias.value if loss_free else probs, axis=-1)   # the bias only selects
    depth = choice + 1
    gate = self.token_alpha * jnp.take_along_axis(probs, choice[..., None], axis=-1)
    load = jnp.stack([(choice == i).mean() for i in range(n)])     # fraction of tokens sent to depth i+1
    aux = {f'mor/depth_{i + 1}_fraction': load[i] for i in range(n)}
    aux['mor/max_violation'] = (load.max() - 1 / n) * n
    if self.token_balancing == 'loss':
      aux['loss/router_balance'] = self.balance_coef * (n * load * probs.mean(axis=(0, 1))).sum()
    elif train and self.is_mutable_collection('router_state') and not self.is_initializing():
      bias.value = bias.value + self.bias_update_rate * jnp.sign(load.mean() - load)
    if self.z_loss_coef:
      aux['loss/router_z'] = self.z_loss_coef * (jax.nn.logsumexp(logits, axis=-1) ** 2).mean()

    h, out, kv_first = x, x, None
    selected_masks = []
    for r in range(n):
      active = depth > r
      selected_masks.append(active)
      y, kv_first = self._masked_recursion(run, r, h, positions, active, kv_first)
      out = jnp.where((depth == r + 1)[..., None], x + (gate * y).astype(x.dtype), out)
      h = jnp.where(active[..., None], y, h)
    self.sow('intermediates', 'selected', jnp.stack(selected_masks))
    return out, aux

  # ---- accounting ---------------------------------------------------------------------------------

  def active_fractions(self) -> tuple[float, ...]:
    """Fraction of the tokens each recursion processes: the capacities (token-choice: perfect balance)."""
    if self.router == 'none':
      return (1.0,) * self.num_recursions
    if self.router == 'token':
      return default_capacities(self.num_recursions)
    return self.capacity_fractions

  def analytic_param_count(self) -> int:
    d = self.d_model
    unique_blocks = len(set(layer_plan(self.num_layers, self.num_recursions, self.sharing)))
    block = layers.block_param_count(d, self.num_heads, self.d_ff, norm='rmsnorm', mlp='swiglu', use_bias=False,
                                     num_kv_heads=self.num_kv_heads or None)
    routers = {'none': 0, 'expert': self.num_recursions * d, 'token': d * self.num_recursions}[self.router]
    return self.vocab_size * d + unique_blocks * block + routers + d

  def forward_flops_per_token(self, seq_len: int) -> float:
    """Per-layer linear FLOPs x c_r and attention x c_r² (c_r: the layer's active fraction); with
    kv_sharing, deeper recursions skip the key/value projections and attend every token (x c_r)."""
    head_dim = self.d_model // self.num_heads
    kv_proj = 2 * 2 * self.d_model * head_dim * self.kv_heads
    linear = 2 * (2 * self.d_model * head_dim * self.num_heads
                  + layers.mlp_matmul_params(self.d_model, self.d_ff, 'swiglu')) + kv_proj
    attention = 2 * self.num_heads * head_dim * seq_len   # QK^T and AV, causal: half of 4·d·T
    fractions = self.active_fractions()
    flops = 2 * self.d_model * self.vocab_size + 2 * self.prefix * (linear + attention)
    if self.router == 'none':
      return flops + (self.num_layers - 2 * self.prefix) * (linear + attention)
    for r, c in enumerate(fractions):
      if self.kv_sharing and r > 0:
        flops += self.pool_size * c * (linear - kv_proj + attention)
      else:
        flops += self.pool_size * (c * linear + c * c * attention)
    candidates = (1.0,) + fractions[:-1]
    flops += (2 * self.d_model * sum(candidates) if self.router == 'expert'
              else 2 * self.d_model * self.num_recursions)
    return flops


@register('mor')
class MixtureOfRecursions(RecursiveLM):
  pass


@register('recursive')
class Recursive(RecursiveLM):
  router: str = 'none'


@register('llama')
class Llama(RecursiveLM):
  # paper: MoR's vanilla 360M (Table 3)
  presets = {'tiny': dict(d_model=32, num_layers=2, num_heads=2, d_ff=64, max_len=32),
             'paper': dict(d_model=960, num_layers=32, num_heads=15, num_kv_heads=5, d_ff=2560, max_len=2048)}
  num_layers: int = 6
  num_recursions: int = 1
  sharing: str = 'cycle'
  router: str = 'none'

  @classmethod
  def arena_layout(cls, *, d_model, depth, heads):
    return dict(num_layers=depth, num_heads=heads, d_ff=8 * d_model // 3)

