"""The forward (noising) process, LLaDA's SFT loss, and sequence-likelihood estimators (REFERENCE §4).

Masked diffusion ELBO of a completion y (length L) given a prompt q. With y_t the completion after
masking each token independently with probability t,

    ELBO(y | q) = ∫_0^1 f(t) dt,   f(t) = E_{y_t}[ (1/t) Σ_{i masked} log p_θ(y_i | y_t, q) ]
                = Σ_{k=1}^{L} S_k / k,

where S_k = E over uniformly random k-subsets M of Σ_{i∈M} log p_θ(y_i | y with M masked, q).
f is a polynomial of degree L−1 in t. Every estimator below is a function of a `logits_fn`:

    logits_fn(ids [N, P+L] int32, attention_mask [N, P+L] bool) → logits [N, P+L, V]

(the prompt-then-completion canvas; the model of `egspo.model.llada` with its parameters closed
over; only the last L positions are read, so a logits_fn may return just those, [N, L, V], to save
the LM-head work on the prompt), and an explicit `jax.random` key: the same key gives the same masks, so current / old /
reference policies are evaluated with common random numbers by passing the same key.

Estimators (all return [N] float32; each forward evaluates all draws in one batched call of
draws·N rows, so the caller bounds memory through the micro-batch size N):
  elbo_double_mc         t ~ U(ε, 1) per draw, Bernoulli(t) masks, weight 1/t       (plain MC)
  elbo_espo              stratified mask counts + coupled complement draw          (ESPO)
  elbo_gauss_legendre    Gauss–Legendre nodes in t, one Bernoulli(t_n) mask each   (GDPO)
and the token-level estimate of diffu-GRPO (`one_step_token_logprobs`). The prompt is never masked
except by diffu-GRPO's prompt perturbation. Padding positions of the prompt (prompt_mask False)
are never masked and never attended.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def forward_noise(key, ids, p, mask_token_id: int, maskable=None):
  """Mask each maskable position independently with probability p.

  ids: [N, L] int; p: scalar, [N] or [N, L] probabilities; maskable: optional [N, L] bool.
  Returns (noisy ids [N, L], is_masked [N, L] bool).
  """
  p = jnp.asarray(p, jnp.float32)
  if p.ndim == 1:
    p = p[:, None]
  is_masked = jax.random.uniform(key, ids.shape) < p
  if maskable is not None:
    is_masked = is_masked & maskable
  return jnp.where(is_masked, mask_token_id, ids).astype(ids.dtype), is_masked


def _canvas(prompt_ids, prompt_mask, completion):
  ids = jnp.concatenate([prompt_ids, completion.astype(prompt_ids.dtype)], axis=-1)
  attn = jnp.concatenate([prompt_mask.astype(bool), jnp.ones(completion.shape, bool)], axis=-1)
  return ids, attn


def _completion_logprobs(logits_fn, prompt_ids, prompt_mask, noisy_completion, completion_ids):
  """log p_θ(y_i | canvas) at every completion position: [..., N, L] float32.

  Leading axes of `noisy_completion` (draws) are flattened into one batched forward.
  """
  lead = noisy_completion.shape[:-2]
  n, l = completion_ids.shape
  s = int(np.prod(lead)) if lead else 1
  comp = noisy_completion.reshape(s * n, l)
  pids = jnp.broadcast_to(prompt_ids, (s,) + prompt_ids.shape).reshape(s * n, -1)
  pmask = jnp.broadcast_to(prompt_mask, (s,) + prompt_mask.shape).reshape(s * n, -1)
  ids, attn = _canvas(pids, pmask, comp)
  logits = logits_fn(ids, attn)[:, -l:, :].astype(jnp.float32)
  tgt = jnp.broadcast_to(completion_ids, (s, n, l)).reshape(s * n, l)
  picked = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
  logp = picked - jax.nn.logsumexp(logits, axis=-1)
  return logp.reshape(lead + (n, l))


def _check_inputs(prompt_ids, prompt_mask, completion_ids):
  if prompt_ids.ndim != 2 or completion_ids.ndim != 2 or prompt_ids.shape[0] != completion_ids.shape[0]:
    raise ValueError(f"need prompt_ids [N, P] and completion_ids [N, L]; got {prompt_ids.shape} "
                     f"and {completion_ids.shape}")
  if prompt_mask.shape != prompt_ids.shape:
    raise ValueError(f"prompt_mask {prompt_mask.shape} must match prompt_ids {prompt_ids.shape}")


def _weighted_masked_sum(logits_fn, prompt_ids, prompt_mask, completion_ids, is_masked, weight,
                         mask_token_id):
  """Σ_i is_masked · weight · log p(y_i | masked canvas), draws on leading axes: [..., N]."""
  noisy = jnp.where(is_masked, mask_token_id, completion_ids)
  logp = _completion_logprobs(logits_fn, prompt_ids, prompt_mask, noisy, completion_ids)
  return jnp.sum(jnp.where(is_masked, weight * logp, 0.0), axis=-1)


# ----------------------------------------------------------------------------------------------
# LLaDA SFT loss.

def sft_loss(logits_fn, key, prompt_ids, prompt_mask, completion_ids, completion_mask=None, *,
             mask_token_id: int, eps: float = 1e-3):
  """LLaDA's masked-diffusion SFT loss (the negative ELBO per answer token).

  Per row: t ~ U(0, 1), p = (1 − ε) t + ε; each answer token (completion_mask, default all
  completion positions, EOS padding included as in LLaDA) is masked with probability p; the prompt
  is never masked. Row loss = Σ_{masked} CE / p / answer_length.
  Returns (Σ_rows loss, N, metrics {"loss", "mask_frac"}).
  """
  _check_inputs(prompt_ids, prompt_mask, completion_ids)
  n, l = completion_ids.shape
  completion_mask = (jnp.ones((n, l), bool) if completion_mask is None
                     else completion_mask.astype(bool))
  k_t, k_m = jax.random.split(key)
  p = (1.0 - eps) * jax.random.uniform(k_t, (n,)) + eps
  _, is_masked = forward_noise(k_m, completion_ids, p, mask_token_id, completion_mask)
  ll = _weighted_masked_sum(logits_fn, prompt_ids, prompt_mask, completion_ids, is_masked,
                            1.0 / p[:, None], mask_token_id)
  answer_len = jnp.maximum(completion_mask.sum(-1), 1).astype(jnp.float32)
  per_row = -ll / answer_len
  denom = jnp.asarray(n, jnp.float32)
  metrics = {"loss": per_row.mean(),
             "mask_frac": is_masked.sum() / jnp.maximum(completion_mask.sum(), 1)}
  return per_row.sum(), denom, metrics


# ----------------------------------------------------------------------------------------------
# diffu-GRPO (d1): one-step token log-probs with prompt perturbation.

def one_step_noised_inputs(key, prompt_ids, prompt_mask, completion_ids, *, mask_token_id: int,
                           p_mask_prompt: float = 0.15):
  """d1's perturbed canvas: every completion token masked, each real prompt token w.p. p.

  Returns (ids [N, P+L], attention_mask [N, P+L]); a function of the key only, so current, old
  and reference policies see the same input when given the same key (REFERENCE §4).
  """
  _check_inputs(prompt_ids, prompt_mask, completion_ids)
  noisy_prompt, _ = forward_noise(key, prompt_ids, p_mask_prompt, mask_token_id,
                                  prompt_mask.astype(bool))
  return _canvas(noisy_prompt, prompt_mask, jnp.full_like(completion_ids, mask_token_id))


def one_step_token_logprobs(logits_fn, key, prompt_ids, prompt_mask, completion_ids, *,
                            mask_token_id: int, p_mask_prompt: float = 0.15):
  """log π̂(o_k) = −CE(logits_k, o_k) from one forward of the fully masked completion: [N, L]."""
  ids, attn = one_step_noised_inputs(key, prompt_ids, prompt_mask, completion_ids,
                                     mask_token_id=mask_token_id, p_mask_prompt=p_mask_prompt)
  l = completion_ids.shape[-1]
  logits = logits_fn(ids, attn)[:, -l:, :].astype(jnp.float32)
  picked = jnp.take_along_axis(logits, completion_ids[..., None], axis=-1)[..., 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)


# ----------------------------------------------------------------------------------------------
# Sequence ELBO estimators.

def elbo_double_mc(logits_fn, key, prompt_ids, prompt_mask, completion_ids, *, mask_token_id: int,
                   num_samples: int = 1, eps: float = 0.0):
  """Plain double Monte Carlo ELBO: mean over draws of (1/p) Σ_{masked} log p_θ(y_i | y_p).

  Per draw and row: t ~ U(0, 1), p = ε + (1 − ε) t, each completion token masked w.p. p.
  ε = 0 is unbiased for the ELBO but has infinite variance (a draw with small t masks one token
  with weight 1/t); ε > 0 estimates (1/(1−ε)) ∫_ε^1 f(p) dp instead (LLaDA trains with ε = 1e-3).
  num_samples forwards (one batched call). Returns [N].
  """
  _check_inputs(prompt_ids, prompt_mask, completion_ids)
  n, l = completion_ids.shape
  k_t, k_m = jax.random.split(key)
  p = eps + (1.0 - eps) * jax.random.uniform(k_t, (num_samples, n, 1))
  is_masked = jax.random.uniform(k_m, (num_samples, n, l)) < p
  est = _weighted_masked_sum(logits_fn, prompt_ids, prompt_mask, completion_ids, is_masked,
                             1.0 / p, mask_token_id)
  return est.mean(0)


def _exact_k_masks(key, k, n, l):
  """[N, L] bool masks with exactly k[n] positions masked, uniformly at random."""
  u = jax.random.uniform(key, (n, l))
  rank = jnp.argsort(jnp.argsort(u, axis=-1), axis=-1)  # a uniform random permutation per row
  return rank < k[:, None]


def espo_mask_counts(key, n: int, l: int):
  """ESPO's stratified counts k_b = round(k0 + b (L+1)/N) mod (L+1), k0 ~ U{0 … L}: [N] int32.

  Each k_b is marginally uniform on {0 … L}; across the micro-batch they are spread evenly.
  """
  k0 = jax.random.randint(key, (), 0, l + 1)
  k = jnp.round(k0 + jnp.arange(n) * ((l + 1) / n)).astype(jnp.int32)
  return k % (l + 1)


def elbo_espo(logits_fn, key, prompt_ids, prompt_mask, completion_ids, *, mask_token_id: int,
              num_mc: int = 2, coupled: bool = True):
  """ESPO's stratified ELBO with the coupled complement draw (REFERENCE §4).

  Per draw: counts k_b from `espo_mask_counts` across the N rows; k_b completion positions masked
  uniformly, each masked term weighted 1/p = (L+1)/k_b. Coupled draw: the complement (the other
  L − k_b positions) masked, weight (L+1)/(L − k_b); the two are averaged. Both are unbiased
  because k_b and L − k_b are uniform on {0 … L}: E = Σ_k (1/(L+1)) · ((L+1)/k) · S_k = Σ_k S_k/k.
  L is the full completion length (padding after EOS included, as in ESPO).
  Forwards: num_mc · (2 if coupled else 1), in one batched call. Returns [N].
  """
  _check_inputs(prompt_ids, prompt_mask, completion_ids)
  n, l = completion_ids.shape
  keys = jax.random.split(key, num_mc)

  def draw(k):
    k_count, k_perm = jax.random.split(k)
    counts = espo_mask_counts(k_count, n, l)
    return counts, _exact_k_masks(k_perm, counts, n, l)

  counts, masks = jax.vmap(draw)(keys)  # [S, N], [S, N, L]
  cnt = counts[..., None].astype(jnp.float32)
  w_main = (l + 1) / jnp.maximum(cnt, 1.0)
  if not coupled:
    est = _weighted_masked_sum(logits_fn, prompt_ids, prompt_mask, completion_ids, masks,
                               w_main, mask_token_id)
    return est.mean(0)
  w_comp = (l + 1) / jnp.maximum(l - cnt, 1.0)
  both_masks = jnp.concatenate([masks, ~masks], axis=0)  # [2S, N, L]
  both_w = jnp.concatenate([jnp.broadcast_to(w_main, masks.shape),
                            jnp.broadcast_to(w_comp, masks.shape)], axis=0)
  est = _weighted_masked_sum(logits_fn, prompt_ids, prompt_mask, completion_ids, both_masks,
                             both_w, mask_token_id)
  return 0.5 * (est[:num_mc] + est[num_mc:]).mean(0)


def gauss_legendre_nodes(num_nodes: int):
  """Nodes t_n = (x_n + 1)/2 and weights w_n = ω_n/2 of N-point Gauss–Legendre on [0, 1]."""
  if num_nodes < 1:
    raise ValueError(f"num_nodes must be ≥ 1, got {num_nodes}")
  x, w = np.polynomial.legendre.leggauss(num_nodes)
  return (x + 1.0) / 2.0, w / 2.0


def elbo_gauss_legendre(logits_fn, key, prompt_ids, prompt_mask, completion_ids, *,
                        mask_token_id: int, num_nodes: int = 3):
  """GDPO's semi-deterministic ELBO: Σ_n w_n (1/t_n) Σ_i 1[masked at t_n] log p_θ(y_i | y_{t_n}).

  One Bernoulli(t_n) mask draw per node (REFERENCE §4). The quadrature integrates f exactly when
  2N − 1 ≥ L − 1, so the estimate is unbiased for L ≤ 2N; for longer completions its bias is the
  (deterministic) quadrature error, traded for much lower variance than t ~ U(0, 1).
  num_nodes forwards, in one batched call. Returns [N].
  """
  _check_inputs(prompt_ids, prompt_mask, completion_ids)
  n, l = completion_ids.shape
  t, w = gauss_legendre_nodes(num_nodes)
  t = jnp.asarray(t, jnp.float32)[:, None, None]
  w = jnp.asarray(w, jnp.float32)
  is_masked = jax.random.uniform(key, (num_nodes, n, l)) < t
  est = _weighted_masked_sum(logits_fn, prompt_ids, prompt_mask, completion_ids, is_masked,
                             1.0 / t, mask_token_id)  # [N_nodes, N]
  return jnp.einsum("s,sn->n", w, est)


ESTIMATORS = {
    "double_mc": elbo_double_mc,
    "espo": elbo_espo,
    "gauss_legendre": elbo_gauss_legendre,
}
