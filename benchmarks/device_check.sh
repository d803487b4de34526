#!/usr/bin/env bash
# Issue 15's accelerator check on one NVIDIA GPU, within about 8 minutes: the parity tests on the
# GPU, then train_step.py and sampler.py (every cache mode) at the `llada_1b` preset in bf16,
# with tokens/s, MFU against the GPU's stated bf16 peak and the update's speed-up over the
# reference's batch-1 loop.
#
# Usage (from anywhere; it runs in the repository root)
#   bash benchmarks/device_check.sh            every stage, on the GPU machine
#   DRY_RUN=1 bash benchmarks/device_check.sh  print each stage's command, run nothing
#   bash benchmarks/device_check.sh fetch      on a machine with a package index: download the
#                                              wheels the GPU image lacks into WHEELS
#   bash benchmarks/device_check.sh summary DIR  the summary of the stage outputs DIR/<stage>.out
#
# Output: stdout, and $OUT/device_check.log plus $OUT/device_check.json (every stage's RESULT
# line) when OUT is set. Each stage runs under `timeout` (the T_* seconds below); a stage that
# fails or times out is named and the next one runs; the exit status is 1 if any did, and the
# script stops at once if no GPU is visible to JAX.
#
# JAX: the pinned jax (requirements/constraints.txt) with its CUDA plugin when a package index
# is reachable; otherwise the jax already installed there (reported as a deviation: jaxlib and
# the CUDA plugin are ~217 MB of wheels, too large to carry to a machine without an index).
#
# Environment (default in brackets)
#   PYTHON [python3]  WHEELS [.device_wheels]  SITE, where WHEELS install [/tmp/egspo_site]
#   GPU_NAME  [nvidia-smi's]  PEAK_TFLOPS  [the table below, by GPU_NAME]
#   T_PARITY [85] (each test file, run side by side)  T_TRAIN [150]  T_SAMPLER [150]
#   T_SMALL [25] (each small shape)  SMALL_SHAPES [short long long_b1]
#   TRAIN_ARGS, SAMPLER_ARGS: extra flags for the 1B stages (later flags win)
#   FETCH_PACKAGES [ml_collections tensorboardX]
# Worst case with these timeouts: ~20 s of set-up + 85 + 150 + 150 + 3 x 25 = 480 s.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.device_wheels}
SITE=${SITE:-/tmp/egspo_site}
T_PARITY=${T_PARITY:-85}
T_TRAIN=${T_TRAIN:-150}
T_SAMPLER=${T_SAMPLER:-150}
T_SMALL=${T_SMALL:-25}
SMALL_SHAPES=${SMALL_SHAPES:-short long long_b1}
JAX_PIN=$(sed -n 's/^jax==//p' requirements/constraints.txt)
# `fetch`: packages the GPU image lacks (pure Python; their needs are there), at the pinned
# versions; FETCH_PACKAGES replaces the list (e.g. adding flax optax chex to pin those too).
read -ra FETCH <<< "${FETCH_PACKAGES:-ml_collections tensorboardX}"

# Dense bf16 tensor-core peak in TFLOP/s by `nvidia-smi` name, from NVIDIA's datasheets (the
# sparsity figures halved): H100/H200 SXM 989 (1,979 sparse), H100 PCIe 756, H100/H200 NVL 835,
# A100 312 (624 sparse), L4 121 (242 sparse).
bf16_peak_tflops() {
  case "$1" in
    *H100*NVL* | *H200*NVL*) echo 835 ;;
    *H100*PCIe*) echo 756 ;;
    *H100* | *H200*) echo 989 ;;
    *A100*) echo 312 ;;
    *" L4") echo 121 ;;
    *) echo "" ;;
  esac
}

show() {  # a command as the shell would read it back
  printf '+'
  printf ' %q' "$@"
  echo
}

x() {  # print a command; run it unless DRY_RUN
  show "$@"
  [[ -n "${DRY_RUN:-}" ]] || "$@"
}

STATUS=()
record() {  # name status
  STATUS+=("$1: $2")
  echo "=== stage $1: $2"
}

stage() {  # name seconds command...: in the foreground, output also to $TMP/<name>.out
  local name=$1 secs=$2 rc=0 t0=$SECONDS
  shift 2
  echo
  echo "=== stage $name (timeout ${secs}s)"
  show "$@"
  if [[ -n "${DRY_RUN:-}" ]]; then record "$name" "dry run"; return 0; fi
  { timeout -k 10 "$secs" "$@" 2>&1 | tee "$TMP/$name.out"; } || rc=$?
  conclude "$name" "$secs" "$rc" $((SECONDS - t0))
}

stage_bg() {  # name seconds command...: in the background, output to $TMP/<name>.out
  local name=$1 secs=$2
  shift 2
  echo "[$name, timeout ${secs}s]"
  show "$@"
  [[ -z "${DRY_RUN:-}" ]] || return 0
  ( rc=0; t0=$SECONDS
    timeout -k 10 "$secs" "$@" > "$TMP/$name.out" 2>&1 || rc=$?
    echo "$rc $((SECONDS - t0))" > "$TMP/$name.rc" ) &
}

finish_bg() {  # name seconds: after `wait`, its output and status
  local name=$1 secs=$2 rc took
  if [[ -n "${DRY_RUN:-}" ]]; then record "$name" "dry run"; return 0; fi
  echo
  echo "=== stage $name (background)"
  cat "$TMP/$name.out"
  [[ -f "$TMP/$name.rc" ]] || echo "137 $secs" > "$TMP/$name.rc"
  read -r rc took < "$TMP/$name.rc"
  conclude "$name" "$secs" "$rc" "$took"
}

conclude() {  # name seconds rc took
  if [[ $3 == 0 ]]; then
    record "$1" "ok in $4 s"
  elif [[ $3 == 124 || $3 == 137 ]]; then
    record "$1" "TIMED OUT after $2 s"
  else
    record "$1" "FAILED (exit $3) after $4 s"
  fi
}

setup() {  # the CUDA jax, the project and the packages the image lacks; exits if no GPU
  echo "=== setup"
  x nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  local cuda=13
  if [[ -z "${DRY_RUN:-}" ]]; then
    cuda=$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p' | head -1)
    [[ ${cuda:-0} -ge 13 ]] && cuda=13 || cuda=12
  fi
  if compgen -G "$WHEELS/*.whl" > /dev/null; then
    x "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  fi
  local have=""
  if [[ -z "${DRY_RUN:-}" ]]; then
    have=$("$PY" -c 'import jax; print(jax.__version__)' 2>/dev/null || true)
  fi
  if [[ "$have" != "$JAX_PIN" ]]; then
    if [[ -z "${DRY_RUN:-}" ]] && ! timeout 30 "$PY" -m pip download -q --no-deps --retries 0 \
        --timeout 5 -d "$TMP/probe" "jax==$JAX_PIN" > /dev/null 2>&1; then
      echo "WARNING: no package index reachable: jax ${have:-(none)} as installed, not the" \
           "pinned $JAX_PIN (its jaxlib and CUDA plugin, ~217 MB, are too large to carry)"
    else
      x timeout 300 "$PY" -m pip install -q -c requirements/constraints.txt \
        "jax[cuda$cuda]==$JAX_PIN" -e ".[test]"
    fi
  fi
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  # A compilation cache local to this run: programs compiled twice (train_step.py's cost
  # analysis of the update) compile once.
  export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR="$TMP/jax_cache"
  echo "+ export PYTHONPATH=$PYTHONPATH JAX_PLATFORMS=$JAX_PLATFORMS PYTHONUNBUFFERED=1" \
    "JAX_COMPILATION_CACHE_DIR=$JAX_COMPILATION_CACHE_DIR"
  show timeout 120 "$PY" - "(the import check below)"
  [[ -n "${DRY_RUN:-}" ]] || timeout 120 "$PY" - <<'EOF' ||
import importlib, jax
print("python", __import__("sys").version.split()[0], "| backend", jax.default_backend(),
      "| devices", jax.devices())
for m in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "chex", "torch",
          "ml_collections", "numpy"):
  print(" ", m, getattr(importlib.import_module(m), "__version__", "?"))
import egspo.train  # noqa: F401  (the project and its imports)
assert jax.default_backend() == "gpu", "JAX sees no GPU"
EOF
    { echo "=== setup FAILED: no usable JAX on a GPU; nothing else runs"; exit 1; }
}

run_all() {
  TMP=$(mktemp -d /tmp/device_check.XXXXXX)
  local gpu=${GPU_NAME:-}
  if [[ -z "$gpu" && -z "${DRY_RUN:-}" ]]; then
    gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
  fi
  local peak=${PEAK_TFLOPS:-$(bf16_peak_tflops "$gpu")}
  local peak_flag=()
  if [[ -n "$peak" ]]; then
    peak_flag=(--peak_tflops "$peak")
  else
    echo "WARNING: no bf16 peak known for '$gpu' (set PEAK_TFLOPS): MFU is not printed"
  fi
  echo "device_check $(date -u +%Y-%m-%dT%H:%MZ) commit $(git rev-parse --short HEAD 2>/dev/null \
    || echo '?') gpu='$gpu' bf16 peak ${peak:-?} TFLOP/s"
  setup

  echo
  echo "=== parity tests on the GPU (f32 matmuls at full precision), side by side"
  local pytest=(env JAX_DEFAULT_MATMUL_PRECISION=highest XLA_PYTHON_CLIENT_PREALLOCATE=false
                "$PY" -m pytest -p no:xdist -v -m "not slow")
  stage_bg parity_model "$T_PARITY" "${pytest[@]}" tests/test_model.py
  stage_bg parity_golden "$T_PARITY" "${pytest[@]}" tests/test_golden_reference.py
  # (its CPU smoke test of benchmarks/sampler.py left out)
  stage_bg parity_cache "$T_PARITY" "${pytest[@]}" tests/test_sampler_cache.py -k "not benchmark"
  wait
  finish_bg parity_model "$T_PARITY"
  finish_bg parity_golden "$T_PARITY"
  finish_bg parity_cache "$T_PARITY"

  local peak_mm=(--threads 0 --matmul_n 8192 --matmul_dtype bfloat16 "${peak_flag[@]}")
  # One EGSPO-SA iteration (Countdown :tiny's task) at 0.87B in bf16, layers scanned as the 8B
  # config does: B 64 = 8 prompts x 8, prompt 32, gen 64, T 32 (2 blocks), K 4; then the same
  # update as the reference's 256 batch-1 grad calls.
  # shellcheck disable=SC2086  # TRAIN_ARGS / SAMPLER_ARGS are word lists
  stage train_step "$T_TRAIN" "$PY" benchmarks/train_step.py --preset llada_1b --dtype bfloat16 \
    --scan_layers --batch 64 --gen_length 64 --block_length 32 --steps 32 --k 4 --iters 2 \
    "${peak_mm[@]}" ${TRAIN_ARGS:-}
  # d1's proportions (prompt 200, gen 256, block 32, 128 steps) at 1B with LLaDA's vocabulary.
  # shellcheck disable=SC2086
  stage sampler_1b "$T_SAMPLER" "$PY" benchmarks/sampler.py --shape d1 --preset llada_1b \
    --vocab_size 126464 --batch 8 --cache none,prefix,dual --no_torch --runs 2 "${peak_mm[@]}" \
    ${SAMPLER_ARGS:-}
  local shape
  for shape in $SMALL_SHAPES; do  # the issue's CPU shapes, bf16 on the GPU
    stage "sampler_$shape" "$T_SMALL" "$PY" benchmarks/sampler.py --shape "$shape" \
      --dtype bfloat16 --cache none,prefix,dual --no_torch --runs 3 --threads 0 \
      --matmul_n 4096 --matmul_dtype bfloat16 "${peak_flag[@]}"
  done

  echo
  [[ -n "${DRY_RUN:-}" ]] || summary "$TMP"
  echo
  echo "=== stages"
  local s failed=0
  for s in "${STATUS[@]}"; do
    echo "  $s"
    [[ "$s" == *": ok"* || "$s" == *": dry run" ]] || failed=1
  done
  return "$failed"
}

summary() {  # DIR: the figures of DIR/<stage>.out, and $OUT/device_check.json
  "$PY" - "$1" "${OUT:-}" <<'EOF'
import json, pathlib, re, sys
src, out = pathlib.Path(sys.argv[1]), sys.argv[2]
results = {}
for f in sorted(src.glob("*.out")):
  text = f.read_text(errors="replace")
  line = next((l for l in text.splitlines()[::-1] if l.startswith("RESULT ")), None)
  if line:
    results[f.stem] = json.loads(line[len("RESULT "):])
  elif f.stem.startswith("parity_"):
    m = (re.findall(r"^=+ (.*) in [\d.]+s", text, re.M)
         or re.findall(r"^(\d+ (?:passed|failed).*)$", text, re.M))
    results[f.stem] = {"pytest": m[-1] if m else "no pytest summary (timed out?)"}
  else:
    results[f.stem] = {"missing": "no RESULT line (timed out or failed; its output is above)"}
pct = lambda v: "-" if v is None else f"{v:.1%}"
print("=== summary")
for name, r in results.items():
  if "pytest" in r or "missing" in r:
    print(f"{name}: {r.get('pytest', r.get('missing'))}")
  elif "update_speedup" in r:
    print(f"{name}: {r.get('device')} {r['params']:,} params {r.get('dtype')}, B={r['B']} "
          f"P={r['P']} G={r['G']} T={r['T']} K={r['K']}: rollout "
          f"{r['rollout_tokens_per_s']:,.0f} tok/s (MFU {pct(r.get('rollout_mfu'))}), update "
          f"{r['update_tokens_per_s']:,.0f} tok/s (MFU {pct(r.get('update_mfu'))}); batched "
          f"update {r['update_speedup']:.2f}x the batch-1 loop, reference forward "
          f"{r['ref_speedup']:.2f}x, both {r['combined_speedup']:.2f}x; gradient check "
          f"{r['grad_max_abs_diff']:.1e} of {r['grad_max_abs']:.1e}")
  elif "modes" in r:
    modes = ", ".join(
        f"{m} {v['tokens_per_s']:,.0f} tok/s (MFU {pct(v.get('mfu'))}, "
        f"agree {v.get('token_agreement_with_none', float('nan')):.0%})"
        for m, v in r["modes"].items())
    print(f"{name}: {r.get('device')} d{r['d_model']} L{r['n_layers']} V{r['vocab_size']} "
          f"{r.get('dtype')} batch {r['batch']} prompt {r['p']} gen {r['g']} steps "
          f"{r['steps']} block {r['block']}: {modes}")
if out:
  pathlib.Path(out, "device_check.json").write_text(json.dumps(results, indent=1))
EOF
}

fetch() {  # here, with a package index: the pinned wheels of FETCH into WHEELS
  local pins=() p v
  for p in "${FETCH[@]}"; do
    v=$(sed -n "s/^$p==//Ip" requirements/constraints.txt)
    [[ -n "$v" ]] || { echo "no pin for $p in requirements/constraints.txt"; exit 1; }
    pins+=("$p==$v")
  done
  mkdir -p .git/info "$WHEELS"
  grep -qxF "/$WHEELS/" .git/info/exclude 2>/dev/null || echo "/$WHEELS/" >> .git/info/exclude
  x "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 -d "$WHEELS" "${pins[@]}"
  ls -l "$WHEELS"
}

case "${1:-}" in
  fetch) fetch ;;
  summary) summary "${2:?usage: device_check.sh summary DIR}" ;;
  "")
    if [[ -n "${OUT:-}" ]]; then
      mkdir -p "$OUT"
      run_all 2>&1 | tee "$OUT/device_check.log"
    else
      run_all
    fi ;;
  *) echo "usage: device_check.sh [fetch | summary DIR] (DRY_RUN=1: print the commands)"; exit 2 ;;
esac
