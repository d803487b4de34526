"""Reward throughput: Countdown / Sudoku / GSM8K / MATH500 rewards per second (one core), problem
generators per second, and sandboxed code programs per second with N workers.

    python benchmarks/rewards.py                     # all
    python benchmarks/rewards.py --only code --workers 1,2 --programs 64

Completions are realistic mixes (correct, wrong, malformed, ~300 characters of reasoning).
Prints one JSON object per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

from egspo.tasks import get_task, sandbox

REASONING = "<reasoning>\n" + "Let me try combining the numbers step by step. " * 6 + "\n</reasoning>\n"


def _rate(fn, items, min_seconds=1.0):
  n, t0 = 0, time.perf_counter()
  while True:
    for it in items:
      fn(*it)
    n += len(items)
    dt = time.perf_counter() - t0
    if dt >= min_seconds:
      return n / dt, n, dt


def _report(name, rate, n, dt, **extra):
  print(json.dumps({"benchmark": name, "per_second": round(rate, 1), "count": n,
                    "seconds": round(dt, 3), **extra}), flush=True)


def bench_countdown():
  task = get_task("countdown", num_numbers=(3, 4), number_range=(1, 99), target_range=(1, 99))
  exs = [task.sample_example(np.random.default_rng(i)) for i in range(64)]
  comps = []
  for i, e in enumerate(exs):
    kind = i % 4
    if kind == 0:
      comps.append(REASONING + f"<answer>\n{e['solution']}\n</answer>")
    elif kind == 1:
      comps.append(REASONING + f"<answer>\n{'+'.join(map(str, e['numbers']))}\n</answer>")
    elif kind == 2:
      comps.append(REASONING + "<answer>\nI think it is 42 = 40 + 2\n</answer>")
    else:
      comps.append(REASONING + "no answer tag")
  items = list(zip(comps, exs))
  _report("countdown_reward", *_rate(task.reward, items))
  from egspo.tasks.countdown import reachable_targets
  reachable_targets.cache_clear()  # cold: one pass over distinct seeds, no memoised number sets
  rng_items = [(np.random.default_rng(10_000 + i),) for i in range(300)]
  _report("countdown_generate(3-4 numbers <=99, cold)", *_rate(task.sample_example, rng_items, 0))


def bench_sudoku():
  task = get_task("sudoku")
  exs = [task.sample_example(np.random.default_rng(i)) for i in range(64)]
  comps = [REASONING + f"<answer>\n{e['solution'] if i % 2 else e['puzzle']}\n</answer>"
           for i, e in enumerate(exs)]
  _report("sudoku_reward", *_rate(task.reward, list(zip(comps, exs))))
  _report("sudoku_generate(unique)", *_rate(task.sample_example,
                                           [(np.random.default_rng(10_000 + i),) for i in range(1000)], 0))


def bench_math():
  g = get_task("gsm8k")
  ex = {"question": "q", "answer": "72"}
  comps = [REASONING + "<answer>\n72\n</answer>\n", REASONING + "<answer>\n71\n</answer>\n", "junk"]
  _report("gsm8k_reward", *_rate(g.reward, [(c, ex) for c in comps]))
  m = get_task("math500")
  ex = {"problem": "p", "answer": "\\frac{1}{2}"}
  m.reward(REASONING + "<answer>\\boxed{0.5}</answer>", ex)  # warm-up: imports sympy (~1 s)
  # Distinct answers, one pass: no memoised equivalences. Half go through math-verify.
  items = []
  for k in range(1, 201):
    items.append((REASONING + f"<answer>\\boxed{{\\frac{{{k}}}{{{2 * k}}}}}</answer>", ex))  # CAS, equal
    items.append((REASONING + f"<answer>\\boxed{{{k}}}</answer>", ex))                       # CAS, not equal
  _report("math500_reward(distinct answers, math-verify, cold)", *_rate(m.reward, items, 0))
  _report("math500_reward(repeated answers, memoised)", *_rate(m.reward, items[:20]))


def bench_code(workers_list, n_programs):
  task = get_task("humaneval", cache_size=0)  # no memoised verdicts: every program runs
  exs = task.load_examples()[:n_programs]
  comps = []
  for i, e in enumerate(exs):
    if i % 4 == 3:  # a wrong program: every test fails quickly
      comps.append("<answer>\n```python\ndef f(*a):\n  return None\n```\n</answer>")
    else:
      comps.append(f"<answer>\n```python\n{e['solution']}\n```\n</answer>")
  n_tests = sum(len(e["tests"]) for e in exs)
  for w in workers_list:
    task.workers = w
    t0 = time.perf_counter()
    r = task.rewards(comps, exs)
    dt = time.perf_counter() - t0
    _report(f"code_programs(humaneval, workers={w})", len(exs) / dt, len(exs), dt,
            tests=n_tests, tests_per_second=round(n_tests / dt, 1), mean_reward=round(float(r.mean()), 3),
            mode=sandbox.isolation_mode())


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--only", default="countdown,sudoku,math,code")
  p.add_argument("--workers", default="1,2")
  p.add_argument("--programs", type=int, default=64)
  args = p.parse_args()
  print(json.dumps({"machine": platform.processor() or platform.machine(),
                    "cpus": len(os.sched_getaffinity(0))}), flush=True)
  only = set(args.only.split(","))
  if "countdown" in only:
    bench_countdown()
  if "sudoku" in only:
    bench_sudoku()
  if "math" in only:
    bench_math()
  if "code" in only:
    bench_code([int(w) for w in args.workers.split(",")], args.programs)


if __name__ == "__main__":
  main()
