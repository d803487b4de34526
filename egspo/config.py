"""The experiment configuration: one `ml_collections.ConfigDict` shared by every task config.

`configs/<task>.py:get_config(arg)` calls `base_config(task, variant)`: variant '' is the paper's
LLaDA-8B setting (REFERENCE §3.8), 'reference' the released trainer's run exactly (`RELEASE_*`,
each value beside the release's name for it), 'tiny' runs the whole pipeline (SFT warm start, then RL) on a
2-core CPU with a ~0.1M-parameter model over the built-in character tokenizer. `validate` checks
every field the code reads (type, range, finiteness, choices) and raises `ConfigError` naming the
bad one (the checks live in `egspo/config_checks.py`). `load_config` and
`check_field` give `egspo.main` one-line errors for a broken config file or an unknown override.
"""

from __future__ import annotations

import difflib
import importlib.util
import os

import ml_collections

# Re-exported: `config.validate(c)`, `config.ConfigError` are the public names.
from egspo.config_checks import (  # pylint: disable=unused-import
    RANDOM_INIT, VARIANTS, ConfigError, Fields, validate)
from egspo.config_release import RELEASE_ALGORITHM, RELEASE_RUN  # ':reference'; re-exported


def base_config(task: str, variant: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.variant = variant

  c.task = ml_collections.ConfigDict()
  c.task.name = task
  c.task.prompt_style = "chat"  # 'chat' (instruct template) | 'plain' (CPU presets)
  c.task.options = ml_collections.ConfigDict()  # passed to egspo.tasks.get_task
  # True: the released code's prompts, decoding, rewards and metrics, defects included (README
  # "Graders: default vs reference").
  c.task.options.reference_rewards = False
  # Local data files in the Hugging Face layout, read by the task's converter (a generator task
  # trains on the file instead of generated problems).
  c.task.train_file = ""
  c.task.eval_file = ""
  c.task.num_eval_examples = 256
  # 'file': the task's test file (REFERENCE §5); 'generated': held-out generated problems
  # (generator tasks), excluded from the training stream.
  c.task.eval_source = "file"
  # A training prompt longer than rollout.max_prompt_length: 'error' (say so), 'left' (the
  # release: keep its last max_prompt_length tokens) or 'middle' (keep its start and end).
  # Applies to training prompts (rollouts, SFT); egspo.tasks.data.fit_prompt.
  c.task.prompt_truncation = "error"

  c.model = ml_collections.ConfigDict()
  c.model.preset = "llada_8b"
  # HF or converted orbax directory; 'random' = the preset with seeded random weights ('' means
  # the same for the CPU presets; for llada_8b validate insists on a checkpoint or 'random').
  c.model.checkpoint = ""
  c.model.param_dtype = "bfloat16"
  c.model.dtype = "bfloat16"
  c.model.remat = True
  c.model.scan_layers = True  # one compiled block: short compiles at 32 layers
  # 'auto' = 'head_major' on the CPU backend, else 'xla'; 'xla' | 'cudnn' | 'head_major'
  # (egspo.model.llada.attention).
  c.model.attention_impl = "auto"
  c.tokenizer = ""  # '' = the checkpoint directory; 'char' = built-in character tokenizer

  c.lora = ml_collections.ConfigDict()
  c.lora.enabled = True
  c.lora.rank = 128
  c.lora.alpha = 64.0
  # Adapted projections (egspo.model.lora.target_pattern): 'reference' = q_proj, k_proj, v_proj,
  # up_proj (what the released trainer's PEFT targets match in LLaDA; the default), 'all_linear' =
  # every block projection, '|'-joined block projection names, or 're:<regex>' over module paths.
  # Only a raw regex can reach the LM head `ff_out`.
  c.lora.targets = "reference"
  c.lora.dropout = 0.05  # adapter input dropout in training forwards only (the release's 0.05)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.num_devices = -1  # use the first N devices (-1 = all)
  # FSDP over every device, LoRA ranks sharded too: fits v5p-8 … v5e-16 and 8×H100
  # (benchmarks/memory_plan.py; pure data parallelism needs ~55 GiB per chip and does not).
  c.mesh.data = 1
  c.mesh.fsdp = -1  # -1 = all remaining devices
  c.mesh.tensor = 1
  # extra (logical_axis, mesh_axes) pairs overriding egspo.sharding's defaults
  c.mesh.rules = (("lora_rank", "fsdp"),)

  c.algorithm = "egspo_sa"
  c.egspo = ml_collections.ConfigDict()
  c.egspo.num_selected_steps = 8  # K
  c.egspo.selection = "entropy"  # entropy | uniform | random | adaptive
  c.egspo.adaptive_alpha = 0.7
  c.egspo.lam = 0.5  # λ of the stepwise advantage; egspo (no SA) forces 0
  # Which selected steps share a group-mean column (entropy/adaptive selection): 'entropy_rank'
  # (the release: column k = each sample's k-th highest-entropy step) | 'time' (k-th earliest).
  c.egspo.pairing = "entropy_rank"
  # Released-trainer options (vishnutez/egspo-dllm-rl egspo_config.py), each off by default:
  # the step log-prob's positions: 'next' (the tokens committed at t) | 'final' (every position
  # still masked in x_t, scored as its final token; rl.step_variants).
  c.egspo.pred_state = "next"
  # Select only among steps up to the last one that committed a non-EOS token (rl.termination).
  c.egspo.terminate_at_last_non_eos = False
  # Score the one-step guesses x̂0 with the task's correctness term only (Task.correctness_rewards).
  c.egspo.correctness_step_reward_only = False
  # Halve λ at every rollout whose optimizer step is a multiple of lambda1_update_steps.
  c.egspo.dynamic_lambda1 = False
  c.egspo.lambda1_update_steps = 1000
  c.egspo.random_replace = False  # 'random' selection with replacement (the release's randint)
  c.egspo.normalize_returns = True  # R_t / (1 + λ) (the release's train.sh: true)
  # 'returns': A = R_t − mean_G R_t | 'standard_grpo': (r − mean_G r + λ (r − V)) / (1 + λ).
  c.egspo.baseline = "returns"

  c.loss = ml_collections.ConfigDict()
  c.loss.eps = 0.2
  c.loss.eps_high = 0.5
  c.loss.beta = 0.04
  # Factor on each per-step loss: 'tokens_per_step' (the release: 1 / (gen_length // steps)),
  # 'none' (1), or a positive number (rl.losses.step_loss_scale).
  c.loss.scale = "tokens_per_step"
  # The KL term: k3 of the step log-probs (False) | the full-vocabulary KL at the committed
  # positions (True, the release's use_exact_kl; rl.step_variants.exact_step_kl).
  c.loss.use_exact_kl = False

  _baseline_sections(c, task)

  c.rollout = ml_collections.ConfigDict()
  c.rollout.gen_length = 256
  c.rollout.block_length = 32
  c.rollout.steps = 128
  c.rollout.temperature = 0.9
  c.rollout.remasking = "low_confidence"
  c.rollout.cfg_scale = 0.0  # classifier-free guidance of the rollout sampler (0 = none)
  # Block K/V cache of the sampler (egspo.diffusion.cache, after Fast-dLLM): 'none' | 'prefix' |
  # 'dual'. A cache samples from an approximation μ of the full-attention policy; the recorded
  # log-probs and entropies are μ's.
  c.rollout.cache = "none"
  c.rollout.cache_refresh = 0  # with a cache: refill it every N steps of a block (0: block start)
  # With a cache, RL recomputes π_old of the selected steps with full attention and weights each
  # step's surrogate by min(π_old/μ, tis_cap) (truncated importance sampling, egspo.rl.tis).
  c.rollout.tis_cap = 2.0
  c.rollout.max_prompt_length = 200

  c.batch = ml_collections.ConfigDict()
  c.batch.num_prompts = 12  # prompts per RL iteration (global)
  c.batch.group_size = 8  # G completions per prompt
  c.batch.micro_batch_size = 48  # completions per gradient-accumulation micro-batch (global)


  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 3e-5
  c.optim.b1 = 0.9
  c.optim.b2 = 0.99
  c.optim.weight_decay = 0.1
  c.optim.max_grad_norm = 0.2
  # The RL learning-rate schedule counts optimizer steps, not iterations: the RL stage takes
  # train.num_iterations × (steps per iteration: EGSPO one per column group of
  # train.update_schedule, K for 'per_step'; baselines μ = <method>.num_iterations) of them
  # (train.rl_optimizer_steps). warmup_steps: linear warm-up over this many optimizer steps.
  c.optim.warmup_steps = 0
  c.optim.schedule = "constant"  # 'constant' | 'cosine' (to 0 at the last optimizer step)

  c.sft = ml_collections.ConfigDict()
  c.sft.steps = 0  # masked-diffusion SFT warm start (0 = skip; the 8B model is already instruct)
  c.sft.batch_size = 64
  c.sft.learning_rate = 1e-3
  c.sft.warmup_steps = 50
  c.sft.log_every = 50  # metrics every N SFT steps (and at the last)
  c.sft.checkpoint_every = 500
  c.sft.time_budget_s = 0.0  # >0: end SFT after this many seconds (continued-SFT control runs)
  # Learning-rate schedule (rl.update.make_schedule): 'constant' or 'wsd' (warmup-stable-decay:
  # linear decay over the last `decay_fraction` of `schedule_steps` to final_lr_fraction × lr,
  # then held). schedule_steps 0 = sft.steps; a continued-SFT control sets it to the original run's
  # sft.steps, so it trains on at the rate that run ended with.
  c.sft.schedule = "constant"
  c.sft.schedule_steps = 0
  c.sft.decay_fraction = 0.25
  c.sft.final_lr_fraction = 0.1

  c.train = ml_collections.ConfigDict()
  c.train.num_iterations = 1000
  # How one rollout's K selected-step columns become optimizer steps (rl.algorithms.column_groups):
  # 'per_step': K optimizer steps, the k-th on column k of every sample; 'joint': one optimizer
  # step on all K columns; 'reference': the released trainer's loop, columns 1, 2, …, K-1, 0,
  # `columns_per_update` consecutive ones per optimizer step (K/2 steps at its accumulation 2).
  c.train.update_schedule = "per_step"
  c.train.columns_per_update = 2  # 'reference' only: the release's gradient_accumulation_steps
  c.train.time_budget_s = 0.0  # >0: stop the RL stage after this many seconds
  c.train.log_every = 1
  c.train.eval_every = 100
  c.train.checkpoint_every = 50
  c.train.keep_checkpoints = 3
  # Stop the run (SFT or RL) with an error after this many non-finite updates refused in a row.
  c.train.max_refused_updates = 10

  c.eval = ml_collections.ConfigDict()
  c.eval.gen_length = 256
  c.eval.block_length = 32
  c.eval.steps = 128  # d1 protocol: gen_length / 2
  c.eval.cache = "none"  # the evaluation sampler's block K/V cache: 'none' | 'prefix' | 'dual'
  c.eval.cache_refresh = 0  # with a cache: refill it every N steps of a block (0: block start)
  c.eval.batch_size = 64
  c.eval.before_training = True

  if variant == "tiny":
    _tiny(c)
  elif variant == "reference":
    apply_settings(c, RELEASE_ALGORITHM)
    apply_settings(c, RELEASE_RUN)
  elif variant not in VARIANTS:
    raise ConfigError(f"unknown config variant {variant!r}; known: '' or '8b' (LLaDA-8B), "
                      "'reference' (LLaDA-8B as the released trainer), 'tiny' (CPU)")
  return c


def apply_settings(c: ml_collections.ConfigDict, settings: dict) -> ml_collections.ConfigDict:
  """Sets each dotted field of `settings` on `c` (which must have it) → `c`."""
  for field, value in settings.items():
    check_field(c, field)
    *parents, last = field.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[last] = value
  return c


def _baseline_sections(c: ml_collections.ConfigDict, task: str) -> None:
  """The baselines' sections (REFERENCE §4; egspo/rl/baselines.py), published values where known.

  `num_iterations` is μ, the number of optimizer steps taken on one rollout, each with its own
  masking key (old/reference likelihoods are computed at rollout time for every one of them).
  """
  c.diffu_grpo = ml_collections.ConfigDict()
  c.diffu_grpo.num_iterations = 12  # μ (d1: 8-12)
  c.diffu_grpo.p_mask_prompt = 0.15  # prompt-token masking probability, a fresh key per μ step
  c.diffu_grpo.eps = 0.5  # d1's released runs
  c.diffu_grpo.beta = 0.04  # k3 KL to the reference
  c.diffu_grpo.reduction = "token"  # 'token' (d1) | 'sequence'

  c.espo = ml_collections.ConfigDict()
  c.espo.num_iterations = 8  # ESPO recipes: NUM_ITER=8
  c.espo.num_mc = 2  # stratified draws (each with its coupled complement)
  c.espo.coupled = True
  c.espo.eps = 0.2  # recipes/train.yaml
  c.espo.beta = 3e-3 if task == "countdown" else 0.01  # k2 KL; Countdown script overrides to 3e-3

  c.gdpo = ml_collections.ConfigDict()
  c.gdpo.num_iterations = 1
  c.gdpo.num_nodes = 3  # Gauss-Legendre nodes (GDPO: 2-3), one mask draw per node
  c.gdpo.normalize = "inside"  # length normalisation: inside | outside the exponent | none
  c.gdpo.eps = 0.2
  c.gdpo.beta = 0.0  # GDPO trains without a KL term by default

  c.stabledrl = ml_collections.ConfigDict()
  c.stabledrl.num_iterations = 2  # released configs: num_iterations 2
  # any of egspo.diffusion.masking.ESTIMATORS, or 'spg': the release's SPG estimator (block-random
  # masks from rollout.block_length, per-token-mean ELBO and EUBO; egspo.diffusion.spg)
  c.stabledrl.estimator = "espo"
  # What carries the gradient: 'elbo' (the estimator's ELBO) | 'spg' (the release: ELBO if A > 0,
  # else mix_weight·EUBO + (1 − mix_weight)·ELBO; needs estimator 'spg').
  c.stabledrl.bound = "elbo"
  c.stabledrl.eubo_beta = 1.5  # released spg_beta
  c.stabledrl.mix_weight = 0.5  # released spg_omega
  c.stabledrl.p_mask_prompt = 0.15  # 'spg' estimator's prompt masking (released p_mask_perturb)
  # The importance weight's two ELBOs: 'common' (the same masks: old recomputed with each
  # iteration's key) | 'independent' (the release: old once per rollout from its own masks).
  c.stabledrl.iw_masks = "common"
  c.stabledrl.num_mc = 2  # draws for 'espo'/'double_mc'/'spg' (released: num_mc_samples 2)
  c.stabledrl.num_nodes = 3  # for 'gauss_legendre'
  c.stabledrl.clip_iw = 5.0  # unconditional clip of the importance weight (released: 5.0)
  # 'group': self-normalise over each prompt's G completions; 'micro_batch': over the whole
  # micro-batch. The release normalises over its per-device batch, which at its configs (one
  # prompt per device, 8 × 2 completions) is one group: 'group' with batch.group_size=16.
  c.stabledrl.normalize_over = "group"
  # Factor on log w: 1 (the release, whose SPG ELBO is a per-token mean); 1/L turns a summed
  # ELBO (espo, double_mc, gauss_legendre) into a per-token weight.
  c.stabledrl.log_iw_scale = 1.0

  c.wd1 = ml_collections.ConfigDict()
  c.wd1.num_iterations = 1
  c.wd1.estimator = "espo"
  c.wd1.num_mc = 2
  c.wd1.num_nodes = 3
  c.wd1.temperature = 1.0  # softmax(A / τ) weights


def _tiny(c: ml_collections.ConfigDict) -> None:
  """The embedded CPU default: small model, char tokenizer, SFT then RL on a 2-core CPU.

  Completions of Countdown answers over the character tokenizer fit in 16 tokens (one block,
  8 steps of 2 tokens). SFT runs 6000 steps at lr 3e-3 with a warmup-stable-decay schedule (linear
  decay to 3e-4 over the last 1500 steps). With a constant rate, or only 3000 steps, the SFT
  model was still improving fast, and simply continuing SFT for the RL stage's time did as well
  as RL (README, "The tiny run").
  """
  c.task.prompt_style = "plain"
  if c.task.name == "countdown":  # small numbers: learnable by a ~0.1M-parameter model
    c.task.options.num_numbers = 3
    c.task.options.number_range = (1, 12)
    c.task.options.target_range = (1, 150)
  c.task.eval_source = "generated"
  # 1024 held-out problems: one problem is 0.1 point, the sampling error of a ~7% accuracy
  # ~0.8 points; greedy evaluation of 1024 problems takes a few seconds here.
  c.task.num_eval_examples = 1024
  c.model.preset = "tiny"
  c.model.param_dtype = "float32"
  c.model.dtype = "float32"
  c.model.remat = False
  c.model.scan_layers = False
  c.mesh.data, c.mesh.fsdp, c.mesh.rules = -1, 1, ()
  c.tokenizer = "char"
  c.lora.enabled = False
  c.rollout.gen_length = 16
  c.rollout.block_length = 16
  c.rollout.steps = 8
  c.rollout.temperature = 1.0
  c.rollout.max_prompt_length = 32
  c.egspo.num_selected_steps = 4
  c.egspo.pairing = "time"  # the tiny run's published figures were made with these two
  c.loss.scale = "none"
  c.batch.num_prompts = 16
  c.batch.group_size = 8
  c.batch.micro_batch_size = 16  # cache-sized micro-batches halve the CPU update time
  c.optim.learning_rate = 1e-4
  c.optim.max_grad_norm = 1.0
  c.sft.steps = 6000
  c.sft.batch_size = 64
  c.sft.learning_rate = 3e-3
  c.sft.schedule = "wsd"
  c.sft.decay_fraction = 0.25  # the last 1500 of 6000 steps
  c.sft.final_lr_fraction = 0.1
  c.train.num_iterations = 450  # ~0.45 s each on 2 cores (README, "The tiny run")
  c.train.eval_every = 75
  c.train.checkpoint_every = 25
  c.eval.gen_length = 16
  c.eval.block_length = 16
  c.eval.steps = 8
  c.eval.batch_size = 256
  if c.task.name == "sudoku":  # '<answer>' + 16 digits + '</answer>': 18 char tokens, not 16
    c.rollout.gen_length = c.rollout.block_length = c.eval.gen_length = c.eval.block_length = 24
    c.rollout.steps = c.eval.steps = 12  # 2 tokens per step, as Countdown's 16 in 8


# ----------------------------------------------------------------------------------------------
# Loading a config file and checking override names (egspo.main's one-line errors).


def load_config(spec: str) -> ml_collections.ConfigDict:
  """`path.py[:arg]` → `get_config(arg)` of that file, as `--config=` loads it; `ConfigError`
  with one line naming the file on a missing or broken file or a bad variant."""
  path, sep, arg = spec.partition(":")
  full = os.path.abspath(os.path.expanduser(path))
  if not os.path.isfile(full):
    raise ConfigError(f"config file {path} not found (looked for {full})")
  try:
    module_spec = importlib.util.spec_from_file_location("_egspo_config_file", full)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except  (the user's file: any error)
    raise ConfigError(f"config file {path} failed to load: {_one_line(e)}") from e
  if not callable(getattr(module, "get_config", None)):
    raise ConfigError(f"config file {path} defines no get_config()")
  try:
    config = module.get_config(*([arg] if sep else []))
  except ConfigError as e:
    raise ConfigError(f"config {spec}: {e}") from e
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f"config {spec}: get_config({arg!r}) failed: {_one_line(e)}") from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"config {spec}: get_config returned a {type(config).__name__}, not a "
                      "ConfigDict")
  return config


def check_field(c: ml_collections.ConfigDict, field: str) -> None:
  """Raises `ConfigError` unless the dotted `field` exists (an override may only set those)."""
  node, parts = c, field.split(".")
  for i, part in enumerate(parts):
    if not isinstance(node, (ml_collections.ConfigDict, dict)):
      return  # inside a leaf value (e.g. a tuple): its own parser reports the error
    if part not in node:
      parent = ".".join(parts[:i])
      known = sorted(node.keys())
      close = difflib.get_close_matches(part, known, n=1)
      hint = f"; did you mean {'.'.join(parts[:i] + close)}?" if close else ""
      where = f"of {parent}" if parent else "at the top level"
      raise ConfigError(f"unknown config field {'.'.join(parts[:i + 1])} (known fields {where}: "
                        f"{', '.join(known)}){hint}")
    node = node[part]


def _one_line(e: BaseException) -> str:
  if isinstance(e, SyntaxError):
    return f"SyntaxError: {e.msg} (line {e.lineno})"
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return f"{type(e).__name__}: {lines[-1] if lines else ''}".rstrip(": ")
