"""`:reference`: the released trainer's run (vishnutez/egspo-dllm-rl: egspo/train.sh, which
overrides egspo/slurm_scripts/train.yaml, over egspo_config.py's defaults), field by field, each
value beside the release's name for it. `egspo.config.base_config(task, "reference")` applies both
dicts. Its model is `LLaDA-sft-s1k-merged` (LLaDA-8B-Instruct after d1's masked SFT on s1K,
merged): `model.checkpoint` must name it (validate refuses to start without a checkpoint). The
differences that remain are listed in the README ("The ':reference' recipe").
"""

# What the loss and the advantages depend on (tests/test_golden_reference.py applies these to a
# small model and checks one update against a PyTorch reading of the release).
RELEASE_ALGORITHM = {
    "algorithm": "egspo_sa",  # train.sh LAMBDA1=0.5 > 0 with high_entropy: "egspo_lambda1_…"
    "egspo.selection": "entropy",  # LOGPS_EVAL_TIME_STEPS_MODE=high_entropy
    "egspo.pairing": "entropy_rank",  # columns in torch.topk order
    "egspo.num_selected_steps": 8,  # LOGPS_EVAL_NUM_STEPS=8
    "egspo.lam": 0.5,  # LAMBDA1=0.5
    "egspo.normalize_returns": True,  # NORMALIZE_RETURNS=true
    "egspo.baseline": "returns",  # standard_grpo_returns: False (default)
    "egspo.pred_state": "next",  # pred_state: 'next' (default)
    "egspo.terminate_at_last_non_eos": False,  # default
    "egspo.correctness_step_reward_only": False,  # default
    "egspo.dynamic_lambda1": False,  # default
    "egspo.random_replace": False,  # random selection is not used (high_entropy)
    "loss.eps": 0.2,  # EPSILON=0.2 (train.yaml's epsilon 0.5 is overridden by train.sh)
    "loss.eps_high": 0.5,  # EPSILON_HIGH=0.5
    "loss.beta": 0.04,  # train.yaml beta
    "loss.scale": "tokens_per_step",  # compute_loss: / (max_completion_length // diffusion_steps)
    "loss.use_exact_kl": False,  # default
    "train.update_schedule": "reference",  # _prepare_inputs / compute_loss step counter
    "train.columns_per_update": 2,  # GRAD_ACCUMULATION_STEPS=2
}

RELEASE_RUN = {
    "seed": 42,  # train.yaml seed
    "lora.enabled": True,  # use_peft
    "lora.rank": 128,  # lora_r
    "lora.alpha": 64.0,  # lora_alpha
    "lora.dropout": 0.05,  # lora_dropout
    "lora.targets": "reference",  # what its PEFT target_modules match in LLaDA
    "rollout.gen_length": 256,  # max_completion_length
    "rollout.block_length": 32,  # block_length
    "rollout.steps": 128,  # diffusion_steps
    "rollout.temperature": 0.9,  # TEMPERATURE=0.9
    "rollout.remasking": "low_confidence",  # remasking
    "rollout.cfg_scale": 0.0,  # cfg_scale: 0 (default)
    "rollout.cache": "none",  # the release has no K/V cache
    "rollout.max_prompt_length": 200,  # max_prompt_length
    "task.prompt_truncation": "left",  # prompt_ids[:, -max_prompt_length:]
    "task.options.reference_rewards": True,  # reward_func.py / math500_utils.py as released
    # 8 processes (4 nodes × 2 GPUs) × PER_DEVICE_TRAIN_BATCH_SIZE=6 = 48 completions, one rollout
    # of 6 prompts × NUM_GENERATIONS=8 per K=8 micro-steps; 2 micro-steps per optimizer step.
    "batch.num_prompts": 6,
    "batch.group_size": 8,
    "batch.micro_batch_size": 48,
    "optim.learning_rate": 3e-5,  # LEARNING_RATE=3e-5
    "optim.b1": 0.9,  # adam_beta1
    "optim.b2": 0.99,  # adam_beta2
    "optim.weight_decay": 0.1,  # weight_decay
    "optim.max_grad_norm": 0.2,  # max_grad_norm (train.yaml; README: DeepSpeed's gradient_clip)
    "optim.schedule": "constant",  # constant_with_warmup
    # warmup_ratio 1e-4: transformers takes ceil(1e-4 × the run's optimizer steps), a handful
    # (e.g. 4 at 50 GSM8K epochs); here one optimizer step.
    "optim.warmup_steps": 1,
    "sft.steps": 0,  # RL starts from the SFT-merged checkpoint
}
