"""The experiment configuration: one `ml_collections.ConfigDict` shared by every task config.

`configs/<task>.py:get_config(arg)` calls `base_config(task, variant)`: variant '' is the paper's
LLaDA-8B setting (REFERENCE §3.8), 'tiny' runs the whole pipeline (SFT warm start, then RL) on a
2-core CPU with a ~0.1M-parameter model over the built-in character tokenizer. `validate` checks
every field the code reads and names the bad one.
"""

from __future__ import annotations

from typing import Any

import ml_collections

ALGORITHMS = ("egspo", "egspo_sa", "diffu_grpo", "espo", "gdpo", "stabledrl", "wd1")
ELBO_ESTIMATORS = ("double_mc", "espo", "gauss_legendre")  # egspo.diffusion.masking.ESTIMATORS
SEQ_NORMALIZATIONS = ("inside", "outside", "none")  # egspo.rl.losses.NORMALIZATIONS
SELECTIONS = ("entropy", "uniform", "random", "adaptive")


def base_config(task: str, variant: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.variant = variant

  c.task = ml_collections.ConfigDict()
  c.task.name = task
  c.task.prompt_style = "chat"  # 'chat' (instruct template) | 'plain' (CPU presets)
  c.task.options = ml_collections.ConfigDict()  # passed to egspo.tasks.get_task
  c.task.train_file = ""  # local data file for tasks without a generator (gsm8k, math500, code)
  c.task.eval_file = ""
  c.task.num_eval_examples = 256
  # 'file': the task's test file (REFERENCE §5); 'generated': held-out generated problems
  # (generator tasks), excluded from the training stream.
  c.task.eval_source = "file"

  c.model = ml_collections.ConfigDict()
  c.model.preset = "llada_8b"
  c.model.checkpoint = ""  # HF directory or converted orbax directory ('' = random init)
  c.model.param_dtype = "bfloat16"
  c.model.dtype = "bfloat16"
  c.model.remat = True
  c.model.scan_layers = True  # one compiled block: short compiles at 32 layers
  c.tokenizer = ""  # '' = the checkpoint directory; 'char' = built-in character tokenizer

  c.lora = ml_collections.ConfigDict()
  c.lora.enabled = True
  c.lora.rank = 128
  c.lora.alpha = 64.0
  c.lora.targets = "q_proj|k_proj|v_proj|attn_out|ff_proj|up_proj|ff_out"

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

  c.loss = ml_collections.ConfigDict()
  c.loss.eps = 0.2
  c.loss.eps_high = 0.5
  c.loss.beta = 0.04

  _baseline_sections(c, task)

  c.rollout = ml_collections.ConfigDict()
  c.rollout.gen_length = 256
  c.rollout.block_length = 32
  c.rollout.steps = 128
  c.rollout.temperature = 0.9
  c.rollout.remasking = "low_confidence"
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
  c.optim.warmup_steps = 0
  c.optim.schedule = "constant"

  c.sft = ml_collections.ConfigDict()
  c.sft.steps = 0  # masked-diffusion SFT warm start (0 = skip; the 8B model is already instruct)
  c.sft.batch_size = 64
  c.sft.learning_rate = 1e-3
  c.sft.warmup_steps = 50
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
  # 'per_step': the reference schedule, one rollout reused for K optimizer steps, the k-th on
  # the k-th selected step of every sample. 'joint': one optimizer step over all K steps.
  c.train.update_schedule = "per_step"
  c.train.time_budget_s = 0.0  # >0: stop the RL stage after this many seconds
  c.train.log_every = 1
  c.train.eval_every = 100
  c.train.checkpoint_every = 50
  c.train.keep_checkpoints = 3

  c.eval = ml_collections.ConfigDict()
  c.eval.gen_length = 256
  c.eval.block_length = 32
  c.eval.steps = 128  # d1 protocol: gen_length / 2
  c.eval.batch_size = 64
  c.eval.before_training = True

  if variant == "tiny":
    _tiny(c)
  elif variant not in ("", "8b"):
    raise ValueError(f"unknown config variant {variant!r}; known: '' (LLaDA-8B), 'tiny'")
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
  c.stabledrl.estimator = "espo"  # any of ELBO_ESTIMATORS
  c.stabledrl.num_mc = 2  # draws for 'espo'/'double_mc' (released: num_mc_samples 2)
  c.stabledrl.num_nodes = 3  # for 'gauss_legendre'
  c.stabledrl.clip_iw = 5.0  # unconditional clip of the importance weight (released: 5.0)
  # 'group': self-normalise over each prompt's G completions; 'micro_batch': over the whole
  # micro-batch (the released code normalises over the per-device batch).
  c.stabledrl.normalize_over = "group"
  c.stabledrl.log_iw_scale = 1.0  # 1/L gives a per-token importance weight; released: 1

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


def _check(cond: bool, field: str, value: Any, why: str) -> None:
  if not cond:
    raise ValueError(f"bad config field {field}={value!r}: {why}")


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad field."""
  _check(c.algorithm in ALGORITHMS, "algorithm", c.algorithm, f"must be one of {ALGORITHMS}")
  _check(c.task.eval_source in ("file", "generated"), "task.eval_source", c.task.eval_source,
         "must be 'file' or 'generated'")
  _check(c.task.prompt_style in ("chat", "plain"), "task.prompt_style", c.task.prompt_style,
         "must be 'chat' or 'plain'")
  _check(c.egspo.selection in SELECTIONS, "egspo.selection", c.egspo.selection,
         f"must be one of {SELECTIONS}")
  _check(c.egspo.num_selected_steps >= 1, "egspo.num_selected_steps", c.egspo.num_selected_steps,
         "must be >= 1")
  _check(c.egspo.num_selected_steps <= c.rollout.steps, "egspo.num_selected_steps",
         c.egspo.num_selected_steps, f"must be <= rollout.steps={c.rollout.steps}")
  _check(0.0 < c.egspo.adaptive_alpha <= 1.0, "egspo.adaptive_alpha", c.egspo.adaptive_alpha,
         "must be in (0, 1]")
  _check(c.egspo.lam >= 0.0, "egspo.lam", c.egspo.lam, "must be >= 0")
  for name in ("gen_length", "block_length", "steps", "max_prompt_length"):
    _check(c.rollout[name] > 0, f"rollout.{name}", c.rollout[name], "must be positive")
  _check(c.rollout.gen_length % c.rollout.block_length == 0, "rollout.gen_length",
         c.rollout.gen_length, f"must be divisible by rollout.block_length={c.rollout.block_length}")
  blocks = c.rollout.gen_length // c.rollout.block_length
  _check(c.rollout.steps % blocks == 0, "rollout.steps", c.rollout.steps,
         f"must be divisible by the number of blocks ({blocks})")
  _check(c.rollout.temperature >= 0, "rollout.temperature", c.rollout.temperature, "must be >= 0")
  _check(c.rollout.remasking in ("low_confidence", "random"), "rollout.remasking",
         c.rollout.remasking, "must be 'low_confidence' or 'random'")
  _check(c.batch.group_size >= 2, "batch.group_size", c.batch.group_size,
         "must be >= 2 (advantages are relative to the group)")
  _check(c.batch.num_prompts >= 1, "batch.num_prompts", c.batch.num_prompts, "must be >= 1")
  total = c.batch.num_prompts * c.batch.group_size
  _check(c.batch.micro_batch_size >= 1 and total % c.batch.micro_batch_size == 0,
         "batch.micro_batch_size", c.batch.micro_batch_size,
         f"must divide num_prompts*group_size={total}")
  _check(c.train.update_schedule in ("per_step", "joint"), "train.update_schedule",
         c.train.update_schedule,
         "must be 'per_step' or 'joint'")
  _check(c.optim.learning_rate > 0, "optim.learning_rate", c.optim.learning_rate, "must be > 0")
  _check(c.optim.schedule in ("constant", "cosine"), "optim.schedule", c.optim.schedule,
         "must be 'constant' or 'cosine'")
  _check(c.loss.eps > 0 and c.loss.eps_high > 0, "loss.eps", c.loss.eps, "eps and eps_high > 0")
  _check(c.loss.beta >= 0, "loss.beta", c.loss.beta, "must be >= 0")
  _check(c.sft.steps >= 0, "sft.steps", c.sft.steps, "must be >= 0")
  _check(c.sft.schedule in ("constant", "wsd"), "sft.schedule", c.sft.schedule,
         "must be 'constant' or 'wsd'")
  _check(0.0 < c.sft.decay_fraction <= 1.0, "sft.decay_fraction", c.sft.decay_fraction,
         "must be in (0, 1]")
  if c.sft.schedule == "wsd" and c.sft.steps:
    span = c.sft.schedule_steps or c.sft.steps
    _check(span > c.sft.warmup_steps, "sft.warmup_steps", c.sft.warmup_steps,
           f"must be < the {span} steps of the 'wsd' schedule")
  _check(0.0 <= c.sft.final_lr_fraction <= 1.0, "sft.final_lr_fraction", c.sft.final_lr_fraction,
         "must be in [0, 1]")
  _check(c.sft.checkpoint_every >= 1, "sft.checkpoint_every", c.sft.checkpoint_every,
         "must be >= 1")
  _check(c.train.num_iterations >= 0, "train.num_iterations", c.train.num_iterations, ">= 0")
  _check(c.train.checkpoint_every >= 1, "train.checkpoint_every", c.train.checkpoint_every,
         "must be >= 1")
  _check(c.lora.rank >= 1, "lora.rank", c.lora.rank, "must be >= 1")
  e_blocks = c.eval.gen_length // c.eval.block_length if c.eval.block_length else 0
  _check(c.eval.block_length > 0 and c.eval.gen_length % c.eval.block_length == 0,
         "eval.gen_length", c.eval.gen_length, "must be divisible by eval.block_length")
  _check(e_blocks and c.eval.steps % e_blocks == 0, "eval.steps", c.eval.steps,
         f"must be divisible by the number of eval blocks ({e_blocks})")
  _validate_baselines(c)
  if c.model.preset == "llada_8b" and not c.model.checkpoint:
    raise ValueError("bad config field model.checkpoint='': the llada_8b preset needs the "
                     "converted or HF checkpoint directory (--config.model.checkpoint=DIR); "
                     "random 8B weights would only waste a pod")


def _validate_baselines(c: ml_collections.ConfigDict) -> None:
  for sec in ("diffu_grpo", "espo", "gdpo", "stabledrl", "wd1"):
    _check(c[sec].num_iterations >= 1, f"{sec}.num_iterations", c[sec].num_iterations,
           "must be >= 1")
  d = c.diffu_grpo
  _check(0.0 <= d.p_mask_prompt < 1.0, "diffu_grpo.p_mask_prompt", d.p_mask_prompt,
         "must be in [0, 1)")
  _check(d.reduction in ("token", "sequence"), "diffu_grpo.reduction", d.reduction,
         "must be 'token' or 'sequence'")
  _check(c.espo.num_mc >= 1, "espo.num_mc", c.espo.num_mc, "must be >= 1")
  _check(c.gdpo.num_nodes >= 1, "gdpo.num_nodes", c.gdpo.num_nodes, "must be >= 1")
  _check(c.gdpo.normalize in SEQ_NORMALIZATIONS, "gdpo.normalize", c.gdpo.normalize,
         f"must be one of {SEQ_NORMALIZATIONS}")
  for sec in ("diffu_grpo", "espo", "gdpo"):
    _check(c[sec].eps > 0, f"{sec}.eps", c[sec].eps, "must be > 0")
    _check(c[sec].beta >= 0, f"{sec}.beta", c[sec].beta, "must be >= 0")
  for sec in ("stabledrl", "wd1"):
    _check(c[sec].estimator in ELBO_ESTIMATORS, f"{sec}.estimator", c[sec].estimator,
           f"must be one of {ELBO_ESTIMATORS}")
    _check(c[sec].num_mc >= 1, f"{sec}.num_mc", c[sec].num_mc, "must be >= 1")
    _check(c[sec].num_nodes >= 1, f"{sec}.num_nodes", c[sec].num_nodes, "must be >= 1")
  s = c.stabledrl
  _check(s.clip_iw > 0, "stabledrl.clip_iw", s.clip_iw, "must be > 0")
  _check(s.normalize_over in ("group", "micro_batch"), "stabledrl.normalize_over",
         s.normalize_over, "must be 'group' or 'micro_batch'")
  _check(c.wd1.temperature > 0, "wd1.temperature", c.wd1.temperature, "must be > 0")
  if c.algorithm in ("stabledrl", "wd1"):
    # Their losses normalise over whole groups, so a micro-batch must not split a group.
    _check(c.batch.micro_batch_size % c.batch.group_size == 0, "batch.micro_batch_size",
           c.batch.micro_batch_size,
           f"{c.algorithm} needs whole groups per micro-batch: a multiple of batch.group_size="
           f"{c.batch.group_size}")
