"""The released EGSPO trainer's loss and advantage computation, re-implemented in PyTorch for the
golden test (tests/test_golden_reference.py).

Written from reading `vishnutez/egspo-dllm-rl` (`egspo/egspo_trainer.py` at a7d618b, with the
settings of `egspo/train.sh` and `slurm_scripts/train.yaml`), not from the JAX code, and kept in
the release's shapes and loops: per-sample Python loops, batch-1 forwards, `torch.topk` order.
The settings covered are the released run's:

    logps_eval_mode 'unbiased', logps_eval_time_steps_mode 'high_entropy', logps_eval_num_steps K,
    logps_aggregation_mode 'sum', pred_state 'next', lambda1 λ, normalize_returns True,
    standard_grpo_returns False, use_exact_kl False, correctness_step_reward_only False,
    terminate_at_last_non_eos False, num_gradient_steps 1.

Pieces, each named after the release function it follows:
  replay_metadata        `generate(..., return_metadata=True)`: for a given trajectory, each step's
                         log-probs and full distributions at the committed positions and the greedy
                         completion (argmax everywhere, decoded tokens kept);
  high_entropy_steps     `_get_high_entropy_time_steps`;
  old_step_logps         the `old_per_token_logps` loop of `_generate_and_score_completions`;
  step_logps             `_get_per_token_logps_unbiased` (2-D `eval_time_steps`);
  stepwise_advantages    `rewards_per_step` → returns → group mean per column;
  micro_step_loss        `compute_loss` for one column;
  optimizer_step_loss    the gradient-accumulated loss of one optimizer step;
  micro_step_columns     `_prepare_inputs`' counter with gradient accumulation: the columns each
                         optimizer step trains and the rollout each came from.
The model forward is tests/torch_llada.py (no attention mask: the release passes none; prompts
here are unpadded).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import torch_llada

# torch_llada.forward is decorated with torch.no_grad(); the training forward needs the gradient.
_forward_with_grad = torch_llada.forward.__wrapped__


def model_logits(sd: dict, cfg: dict, ids: torch.Tensor, grad: bool = False) -> torch.Tensor:
  """`model(ids).logits` of LLaDA with weights `sd`: ids [N, L] → [N, L, V] float32."""
  return _forward_with_grad(sd, cfg, ids) if grad else torch_llada.forward(sd, cfg, ids)


@torch.no_grad()
def replay_metadata(sd: dict, cfg: dict, trajectory: torch.Tensor, mask_id: int):
  """What the release's `generate(..., return_metadata=True)` records, for a given trajectory.

  trajectory: [T+1, B, L] canvases (prompt + completion), state t before step t. Per step:
  one forward on the whole canvas, p = softmax(logits); the committed positions are those that
  change from state t to t+1. Returns
    logps [B, T, n] (log p of each committed token), dists [B, T, n, V] (p at those positions),
    greedy [B, T+1, L] (argmax(logits) with decoded tokens kept; the final state last).
  """
  steps, bs, _ = trajectory.shape
  steps -= 1
  logps, dists, greedy = [], [], []
  for t in range(steps):
    x, x_next = trajectory[t], trajectory[t + 1]
    logits = model_logits(sd, cfg, x)
    x0_greedy = torch.argmax(logits, dim=-1)
    mask_index = x == mask_id
    x0_greedy[~mask_index] = x[~mask_index]
    greedy.append(x0_greedy)
    p = F.softmax(logits, dim=-1)
    transfer = x != x_next
    step_dists, step_logps = [], []
    for j in range(bs):
      idx = torch.where(transfer[j])[0]
      d = p[j, idx]
      step_dists.append(d)
      step_logps.append(torch.log(d.gather(1, x_next[j, idx].unsqueeze(1)).squeeze(1)))
    dists.append(torch.stack(step_dists))
    logps.append(torch.stack(step_logps))
  greedy.append(trajectory[-1])
  return (torch.stack(logps).permute(1, 0, 2), torch.stack(dists).permute(1, 0, 2, 3),
          torch.stack(greedy).permute(1, 0, 2))


def high_entropy_steps(dists: torch.Tensor, k: int) -> torch.Tensor:
  """Per sample the K steps of largest mean token entropy, in `torch.topk` order: [B, K]."""
  out = torch.zeros((dists.shape[0], k), dtype=torch.long)
  for b in range(dists.shape[0]):
    entropy = -torch.sum(dists[b] * torch.log(dists[b] + 1e-8), dim=-1).mean(dim=-1)  # [T]
    out[b] = torch.topk(entropy, k=k, dim=0).indices
  return out


def old_step_logps(logps: torch.Tensor, eval_steps: torch.Tensor) -> torch.Tensor:
  """Rollout-time step log-probs (sum over the step's tokens): [K, B]."""
  out = torch.zeros((eval_steps.shape[1], logps.shape[0]))
  for b in range(logps.shape[0]):
    out[:, b] = logps[b, eval_steps[b]].sum(dim=-1)
  return out


def step_logps(sd: dict, cfg: dict, trajectory: torch.Tensor, eval_steps: torch.Tensor,
               grad: bool = False) -> torch.Tensor:
  """log π(a_t | s_t) at each sample's selected steps, one batch-1 forward each: [K, B].

  pred_state 'next': the targets are the tokens committed at the step (state t → t+1); the sum
  of −cross-entropy over them.
  """
  bs, k = eval_steps.shape
  rows = []
  for i in range(k):
    col = []
    for b in range(bs):
      t = int(eval_steps[b, i])
      curr, nxt = trajectory[t, b].unsqueeze(0), trajectory[t + 1, b].unsqueeze(0)
      positions = curr != nxt
      if positions.sum() == 0:
        col.append(torch.zeros(()))
        continue
      logits = model_logits(sd, cfg, curr, grad=grad)[positions]
      col.append(-F.cross_entropy(logits, nxt[positions], reduction="none").sum())
    rows.append(torch.stack(col))
  return torch.stack(rows)


def stepwise_advantages(step_rewards: torch.Tensor, num_generations: int, lam: float):
  """rewards_per_step [B, K+1] (the K selected one-step guesses, then the final completion) →
  advantages_per_step [B, K]: R = (r + λ (r − V)) / (1 + λ), minus its group mean per column."""
  final = step_rewards[:, -1]
  stepwise = final.unsqueeze(1) - step_rewards[:, :-1]
  returns = (final.unsqueeze(1) + lam * stepwise) / (1 + lam)
  bs, k = returns.shape
  grouped = returns.view(-1, num_generations, k)
  return (grouped - grouped.mean(dim=1, keepdim=True)).view(bs, k)


def micro_step_loss(logp, logp_old, logp_ref, adv, *, epsilon: float, epsilon_high: float,
                    beta: float, tokens_per_step: int) -> torch.Tensor:
  """`compute_loss` for one column: [B] step log-probs (current, rollout, reference), [B] A."""
  coef_1 = torch.exp(logp - logp_old)
  coef_2 = torch.clamp(coef_1, 1 - epsilon, 1 + epsilon_high)
  per = -torch.min(coef_1 * adv, coef_2 * adv)
  k3 = torch.exp(logp_ref - logp) - (logp_ref - logp) - 1
  per = per + beta * k3
  return per.mean() / tokens_per_step


def optimizer_step_loss(micro_losses: list) -> torch.Tensor:
  """The loss one optimizer step descends: the HF Trainer's `training_step` divides each
  micro-step's loss by gradient_accumulation_steps before `backward` (transformers 4.57.1, with
  DeepSpeed's own scaling switched off), so the accumulated gradient is that of their mean."""
  return sum(loss / len(micro_losses) for loss in micro_losses)


def micro_step_columns(k: int, grad_accum: int, num_micro_steps: int,
                       num_gradient_steps: int = 1):
  """The release's loop: `_prepare_inputs` rolls out when its counter is a multiple of
  K · num_gradient_steps (else reuses the cached rollout) and increments the counter before
  `compute_loss` reads column `counter mod K`; the HF Trainer steps the optimizer after
  `grad_accum` micro-steps. → per optimizer step, [(rollout index, column), …]."""
  counter, rollout, micro = 0, -1, []
  for _ in range(num_micro_steps):
    if counter % (k * num_gradient_steps) == 0:
      rollout += 1
    counter += 1
    micro.append((rollout, counter % k))
  return [micro[i:i + grad_accum] for i in range(0, num_micro_steps, grad_accum)]
