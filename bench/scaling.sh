#!/usr/bin/env bash
# bench/scaling.sh: the whole-node scaling matrix in one call, for a machine with
# many cores (not part of make bench, whose machines have 2). For every layout
# ranks x threads with ranks x threads = CORES (1 x 16, 2 x 8, 4 x 4, 8 x 2,
# 16 x 1 on 16 cores), one GPT-2 small training step (bench/bench_step) of
#   dense, MoE 8 experts top-2 x 1536 at ep 2, 4 and 8 (where ep divides the
#   ranks), and ∞-MoE H 6144 keep 25% K 2 at ep 2 (ranks >= 2),
# printing ms/step, MFU against the peak measured on the same cores, and the
# exposed shares (gradient allreduce, all-to-all) of the slowest rank. Ranks are
# bound to their own cores (--map-by slot:PE=T --bind-to core) and threads to
# cores (OMP_PLACES=cores, OMP_PROC_BIND=close).
#
#   bash bench/scaling.sh [--cores N] [--batch B] [--seq T] [--steps S]
#                         [--precision fp32|bf16] [--out FILE.md] [--logs DIR]
#                         [--timeout S] [--bind core|none] [--deadline S] [--diagnose]
# Defaults: every core of the machine (nproc), global batch = cores sequences
# (so every layout has whole sequences per rank), T 1024, 2 timed steps, bf16
# where precision auto would pick it (AMX, or AVX-512 BF16 on AMD), each run
# stopped after 300 s. With SMT the CPUs are hardware threads (--use-hwthread-cpus,
# OMP_PLACES=threads). --deadline S: no run starts S seconds after the start (the
# table says which were skipped). The table is written as markdown to FILE.md
# too, every run's output to DIR/RANKSxTHREADS-{dense,moe-epE,inf}.log.
# --diagnose: instead of the matrix, where one rank's threads lose time (dense
# only): one rank at 1, 2, 4, ... CORES threads with as many sequences (equal work
# per thread: flat ms/step is perfect scaling), then 1 x CORES and 2 x CORES/2 as
# they are, with the GEMM row split off, and with OMP_WAIT_POLICY=active.
set -u
cd "$(dirname "$0")/.."
CORES=$(env -u OMP_NUM_THREADS nproc) BATCH="" SEQ=1024 STEPS=2 PREC="" OUTMD="" LOGS="" TMO=300 BIND=core DEADLINE=0 DIAG=0
while [ $# -gt 0 ]; do
    case $1 in
    --cores) CORES=$2; shift 2 ;;
    --batch) BATCH=$2; shift 2 ;;
    --seq) SEQ=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --precision) PREC=$2; shift 2 ;;
    --out) OUTMD=$2; shift 2 ;;
    --logs) LOGS=$2; shift 2 ;;
    --timeout) TMO=$2; shift 2 ;;
    --bind) BIND=$2; shift 2 ;;
    --deadline) DEADLINE=$2; shift 2 ;;
    --diagnose) DIAG=1; shift ;;
    -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "scaling.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
done
for v in "--cores $CORES" "--timeout $TMO" "--steps $STEPS" "--seq $SEQ"; do
    [[ ${v#* } =~ ^[1-9][0-9]*$ ]] || { echo "scaling.sh: ${v% *} must be a positive integer" >&2; exit 2; }
done
[[ $DEADLINE =~ ^[0-9]+$ ]] || { echo "scaling.sh: --deadline must be a number of seconds" >&2; exit 2; }
case $BIND in core | none) ;; *) echo "scaling.sh: --bind takes core or none" >&2; exit 2 ;; esac
BATCH=${BATCH:-$CORES}
if [ -z "$PREC" ]; then
    PREC=fp32
    if grep -qw amx_bf16 /proc/cpuinfo; then
        PREC=bf16
    elif grep -qw avx512_bf16 /proc/cpuinfo && grep -q AuthenticAMD /proc/cpuinfo; then
        PREC=bf16
    fi
fi
SMT=$(lscpu 2>/dev/null | sed -n 's/^Thread(s) per core:[[:space:]]*//p')
PLACES=cores HWT=() UNIT=core
if [ "${SMT:-1}" -gt 1 ]; then PLACES=threads HWT=(--use-hwthread-cpus) UNIT=hwthread; fi
[ -n "$LOGS" ] && { mkdir -p "$LOGS" || exit 2; }
[ -x build/bench/bench_step ] || { echo "scaling.sh: build/bench/bench_step missing (make all)" >&2; exit 2; }
MPIRUN=(mpirun)
[ "$(id -u)" = 0 ] && MPIRUN+=(--allow-run-as-root)
export OMP_WAIT_POLICY=passive
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
T0=$SECONDS

one() { # file, ranks, threads, bench args...
    local f=$1 p=$2 t=$3
    shift 3
    if [ "$DEADLINE" -gt 0 ] && [ $((SECONDS - T0)) -ge "$DEADLINE" ]; then
        echo "skipped (deadline)" >"$f"
        return
    fi
    local bind=("${HWT[@]}" --map-by "$UNIT" --bind-to "$UNIT")
    [ "$t" -gt 1 ] && bind=("${HWT[@]}" --map-by "slot:PE=$t" --bind-to "$UNIT" -x OMP_PLACES=$PLACES -x OMP_PROC_BIND=close)
    [ "$BIND" = none ] && bind=(--bind-to none)
    OMP_NUM_THREADS=$t timeout -k 10 "$TMO" "${MPIRUN[@]}" -np "$p" "${bind[@]}" -x OMP_NUM_THREADS -x OMP_WAIT_POLICY \
        build/bench/bench_step --seq "$SEQ" --batch "$BATCH" --steps "$STEPS" --precision "$PREC" "$@" \
        >"$f" 2>&1
    local rc=$?
    [ $rc -eq 124 ] && echo "timed out after $TMO s" >>"$f"
    [ -n "$LOGS" ] && cp "$f" "$LOGS/${p}x${t}-$(basename "$f").log"
}
ms_of() { sed -n 's/.*ms\/step \([0-9.]*\).*/\1/p' "$1"; } # file: the ms/step it printed
CPU=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
cell() { # file: "ms / mfu% / exposed% / threads busy%"
    local f=$1
    if grep -q 'skipped (deadline)' "$f"; then
        echo "skipped"
        return
    fi
    if grep -q 'timed out after' "$f"; then
        echo "timed out"
        return
    fi
    if ! grep -q 'ms/step' "$f"; then
        echo "failed"
        return
    fi
    local ms mfu ar a2a busy
    ms=$(ms_of "$f")
    mfu=$(sed -n 's/.*| mfu \([0-9.]*\)%.*/\1/p' "$f" | head -1)
    ar=$(sed -n 's/.*allreduce \([0-9.]*\)%.*/\1/p' "$f")
    a2a=$(sed -n 's/.*all-to-all \([0-9.]*\)%.*/\1/p' "$f" | head -1)
    busy=$(sed -n 's/.*threads busy \([0-9.]*\)%.*/\1/p' "$f")
    printf '%.0f ms, %s%% MFU, ar %s%%%s%s' "$ms" "$mfu" "$ar" "${a2a:+, a2a $a2a%}" "${busy:+, busy $busy%}"
}

if [ "$DIAG" = 1 ]; then
    [ $((CORES % 2)) -eq 0 ] || { echo "scaling.sh: --diagnose compares 1 x N with 2 x N/2: --cores must be even" >&2; exit 2; }
    echo "== one rank's threads: GPT-2 small dense, T $SEQ, $PREC, $CORES cores (SMT ${SMT:-?}), $STEPS timed steps, binding $BIND =="
    {
        echo "GPT-2 small dense, T $SEQ, $PREC, $CORES cores ($CPU)"
        echo
        echo "| one rank, threads = sequences | ms/step, MFU, ar, threads busy | ms/step against 1 thread |"
        echo "|---|---|---|"
        base=""
        for ((t = 1; t <= CORES; t *= 2)); do
            BATCH=$t one "$OUT/weak" 1 "$t"
            ms=$(ms_of "$OUT/weak")
            [ -z "$base" ] && base=$ms
            echo "| 1 x $t, batch $t | $(cell "$OUT/weak") | ${ms:+$(awk -v a="$ms" -v b="${base:-0}" 'BEGIN { if (b > 0) printf "%.3f", a / b }')} |"
        done
        echo
        echo "| batch $BATCH | 1 x $CORES | 2 x $((CORES / 2)) |"
        echo "|---|---|---|"
        for v in as-is row-split-off wait-active; do
            row="| $v |"
            for p in 1 2; do
                t=$((CORES / p))
                case $v in
                as-is) one "$OUT/$v" "$p" "$t" ;;
                row-split-off) one "$OUT/$v" "$p" "$t" --row-split off ;;
                wait-active) OMP_WAIT_POLICY=active one "$OUT/$v" "$p" "$t" ;;
                esac
                row+=" $(cell "$OUT/$v") |"
            done
            echo "$row"
        done
    } | tee "$OUT/table.md"
    [ -n "$OUTMD" ] && cp "$OUT/table.md" "$OUTMD"
    exit 0
fi
echo "== scaling matrix: GPT-2 small, global batch $BATCH x $SEQ, $PREC, $CORES cores (SMT ${SMT:-?}), $STEPS timed steps, binding $BIND =="
header="| ranks x threads | dense | MoE ep 2 | MoE ep 4 | MoE ep 8 | ∞-MoE ep 2 |"
rows=()
for ((p = 1; p <= CORES; p *= 2)); do
    [ $((CORES % p)) -eq 0 ] || continue
    t=$((CORES / p))
    if [ $((BATCH % p)) -ne 0 ]; then
        rows+=("| $p x $t | batch $BATCH not divisible by $p ranks | | | | |")
        continue
    fi
    echo "-- $p x $t --" >&2
    row="| $p x $t | "
    one "$OUT/dense" "$p" "$t"
    row+="$(cell "$OUT/dense") | "
    for ep in 2 4 8; do
        if [ "$p" -ge "$ep" ] && [ $((p % ep)) -eq 0 ]; then
            one "$OUT/moe-ep$ep" "$p" "$t" --experts 8 --k 2 --expert-hidden 1536 --ep "$ep"
            row+="$(cell "$OUT/moe-ep$ep") | "
        else
            row+="— | "
        fi
    done
    if [ "$p" -ge 2 ]; then
        one "$OUT/inf" "$p" "$t" --units 6144 --keep 0.25 --samples 2 --block 64 --ep 2
        row+="$(cell "$OUT/inf") |"
    else
        one "$OUT/inf" "$p" "$t" --units 6144 --keep 0.25 --samples 2 --block 64 --ep 1
        row+="$(cell "$OUT/inf") (ep 1) |"
    fi
    rows+=("$row")
    echo "$row"
done
{
    echo "GPT-2 small, global batch $BATCH x $SEQ, $PREC, $CORES cores ($CPU); cells: ms/step, MFU, exposed gradient allreduce (ar) and all-to-all (a2a) shares, slowest rank, and threads busy (the least busy rank's share of threads x wall on a core: below 100% where threads idle)"
    echo
    echo "$header"
    echo "|---|---|---|---|---|---|"
    printf '%s\n' "${rows[@]}"
} | tee "$OUT/table.md"
[ -n "$OUTMD" ] && cp "$OUT/table.md" "$OUTMD"
exit 0
