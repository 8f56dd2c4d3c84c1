#!/usr/bin/env bash
# bf16 precision (train.precision bf16), run by tests/run.sh from the repo root:
# one PASS/FAIL line per test. Against fp32: 300-step training of dense, topk and
# infinite ends within 0.02 nats of validation loss; 1, 2 and 4 ranks give the
# same losses within 1e-4 relative (fp32: 1e-5); resume is bit-exact; a bf16
# checkpoint resumes in fp32 and the reverse. With oneDNN held below AVX-512
# BF16 (ONEDNN_MAX_CPU_ISA), bf16 is refused in one line and auto falls back to
# fp32. The kernels and the gradients are tests/test_gemm.c and
# tests/test_bf16.c. One rank on 2 threads (heads and experts in parallel, one
# thread each) gives the 1-thread losses.
. tests/lib.sh
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
losses() { grep '^step ' "$1" | sed 's/.*| loss \([0-9.]*\) |.*/\1/'; }
max_rel_diff() {
    paste <(echo "$1") <(echo "$2") |
        awk -v n="$(echo "$1" | wc -l)" 'BEGIN{w=0} {d=$1-$2; if(d<0)d=-d; r=d/$1; if(r>w)w=r} END{if(NR!=n || $2=="")w=1; printf "%.2e", w}'
}
run() { # log, ranks, config, args...
    local log=$1 p=$2
    shift 2
    "${MPIRUN[@]}" -np "$p" $INFMOE train "$@" > "$log" 2>&1
}

# ---- a CPU without AVX-512 BF16 (forced): bf16 refused in one line, auto is fp32 ----
for isa in AVX512_CORE AVX2; do
    out=$(ONEDNN_MAX_CPU_ISA=$isa $INFMOE train tests/configs/tiny.yaml --set train.precision=bf16 \
        --set output.dir="$TMP/isa" 2>&1)
    rc=$?
    if [ $rc -ne 0 ] && [ "$(printf '%s\n' "$out" | wc -l)" -eq 1 ] &&
        printf '%s\n' "$out" | grep -q "train.precision bf16 needs a CPU with AVX-512 BF16"; then
        pass "bf16: refused in one line where oneDNN is held to $isa"
    else
        fail "bf16: refused in one line where oneDNN is held to $isa (exit $rc)" "$out"
    fi
    if ONEDNN_MAX_CPU_ISA=$isa $INFMOE train tests/configs/tiny.yaml --set train.precision=auto \
        --set train.steps=5 --set output.dir="$TMP/isa-auto" > "$TMP/auto.log" 2>&1 &&
        grep -q "precision fp32 (auto: no AVX-512 BF16 here)" "$TMP/auto.log"; then
        pass "bf16: auto trains in fp32 where oneDNN is held to $isa, and the log says so"
    else
        fail "bf16: auto falls back to fp32 under $isa" "$(cat "$TMP/auto.log")"
    fi
done

if ! grep -qw avx512_bf16 /proc/cpuinfo; then
    pass "bf16: the training tests below are skipped: this CPU has no AVX-512 BF16"
    exit 0
fi
# auto: bf16 where its products run at >= 1.25x the fp32 rate (or AMX), fp32 where
# they are slower (Intel cores without AMX issue vdpbf16ps at half the FMA rate)
if $INFMOE train tests/configs/tiny.yaml --set train.precision=auto --set train.steps=5 \
    --set output.dir="$TMP/auto" > "$TMP/auto.log" 2>&1; then
    head=$(grep -m1 '^infmoe train' "$TMP/auto.log")
    rate=$(printf '%s\n' "$head" | sed -n 's/.*products at \(only \)\{0,1\}\([0-9.]*\)x the fp32 rate.*/\2/p')
    want=fp32
    if printf '%s\n' "$head" | grep -q "(auto: AMX)" ||
        { [ -n "$rate" ] && awk -v r="$rate" 'BEGIN{exit !(r >= 1.25)}'; }; then
        want=bf16
    fi
    if { [ -n "$rate" ] || [ $want = bf16 ]; } &&
        printf '%s\n' "$head" | grep -q "precision $want (auto: .*) | peak [0-9]* GFLOP/s $want"; then
        pass "bf16: auto picks $want on this CPU (bf16 products at ${rate:-AMX}x the fp32 rate); MFU is against the $want peak"
    else
        fail "bf16: auto's choice follows the measured bf16 rate" "$head"
    fi
else
    fail "bf16: auto trains" "$(cat "$TMP/auto.log")"
fi

# ---- 300 steps: bf16 ends within 0.02 nats of fp32 ----
# Compared on the final validation loss over 32 batches, not on step 300's
# training loss: one batch of 256 tokens moves by a few hundredths from CPU to CPU
# (the ∞-MoE windows start at floor of the sampled index, so rounding moves them),
# while the validation mean is what "ends within" means and varies far less.
val_loss() { sed -n 's/^done .*| val_loss \([0-9.]*\) |.*/\1/p' "$1"; }
for name in tiny tiny-topk tiny-infinite; do
    cfg=tests/configs/$name.yaml
    for p in fp32 bf16; do
        run "$TMP/$name-300-$p.log" 1 "$cfg" --set train.steps=300 --set train.log_every=50 \
            --set train.eval_every=300 --set train.eval_batches=32 \
            --set train.precision=$p --set output.dir="$TMP/$name-300-$p"
    done
    a=$(val_loss "$TMP/$name-300-fp32.log")
    b=$(val_loss "$TMP/$name-300-bf16.log")
    if [ -n "$a" ] && [ -n "$b" ] && awk -v a="$a" -v b="$b" 'BEGIN{d=a-b; if(d<0)d=-d; exit !(d <= 0.02)}'; then
        pass "bf16: $name, 300 steps: final val loss (32 batches) $b vs fp32 $a (within 0.02)"
    else
        fail "bf16: $name, 300 steps: final val loss ${b:-none} vs fp32 ${a:-none}" "$(tail -3 "$TMP/$name-300-bf16.log")"
    fi
done

# ---- 1, 2 and 4 ranks in bf16: the same losses within 1e-4 relative ----
for spec in "tiny 1:1 2:1 4:1" "tiny-topk 1:1 2:2 4:2" "tiny-infinite 1:1 2:2 4:4"; do
    set -- $spec
    name=$1
    shift
    ref=""
    for layout in "$@"; do
        p=${layout%:*} ep=${layout#*:}
        log="$TMP/$name-eq-$p-$ep.log"
        run "$log" "$p" tests/configs/$name.yaml --set train.precision=bf16 --set parallel.ep="$ep" \
            --set output.dir="$TMP/$name-eq-$p-$ep"
        if [ -z "$ref" ]; then
            ref=$(losses "$log")
            continue
        fi
        worst=$(max_rel_diff "$ref" "$(losses "$log")")
        if awk -v w="$worst" 'BEGIN{exit !(w <= 1e-4)}'; then
            pass "bf16: $name, 20 steps at P=$p ep=$ep equal P=1 (max rel diff $worst <= 1e-4)"
        else
            fail "bf16: $name, 20 steps at P=$p ep=$ep equal P=1 (max rel diff $worst)" "$(paste <(echo "$ref") <(losses "$log"))"
        fi
    done
done

# ---- resume: bit-exact in bf16; a bf16 checkpoint resumes in fp32 and the reverse ----
for name in tiny-topk tiny-infinite; do
    cfg=tests/configs/$name.yaml
    run "$TMP/$name-straight.log" 2 "$cfg" --set train.precision=bf16 --set train.steps=40 \
        --set parallel.ep=2 --set output.dir="$TMP/$name-straight"
    run "$TMP/$name-first.log" 2 "$cfg" --set train.precision=bf16 --set train.steps=40 \
        --set train.ckpt_every=20 --set parallel.ep=2 --set output.dir="$TMP/$name-first"
    run "$TMP/$name-resumed.log" 2 "$cfg" --set train.precision=bf16 --set train.steps=40 \
        --set parallel.ep=2 --set output.dir="$TMP/$name-resumed" --resume "$TMP/$name-first/step_000020"
    if grep -q "resumed from .*step_000020" "$TMP/$name-resumed.log" &&
        [ "$(steps_from "$TMP/$name-resumed.log" 21 | wc -l)" -eq 20 ] &&
        [ "$(steps_from "$TMP/$name-straight.log" 21)" = "$(steps_from "$TMP/$name-resumed.log" 21)" ]; then
        pass "bf16: $name 20 steps + resume 20 = 40 straight, every loss bitwise"
    else
        fail "bf16: $name resume is not bit-exact" "$(paste <(steps_from "$TMP/$name-straight.log" 21) <(steps_from "$TMP/$name-resumed.log" 21))"
    fi
done
cfg=tests/configs/tiny-topk.yaml
run "$TMP/fp32-straight.log" 2 "$cfg" --set train.steps=40 --set train.ckpt_every=20 \
    --set output.dir="$TMP/fp32-straight"
cross() { # label, checkpoint, precision to resume in, reference log
    local log="$TMP/cross-$3.log" worst
    run "$log" 2 "$cfg" --set train.precision="$3" --set train.steps=40 --set output.dir="$TMP/cross-$3" \
        --resume "$2"
    worst=$(max_rel_diff "$(steps_from "$4" 21 | awk '{print $2}')" "$(steps_from "$log" 21 | awk '{print $2}')")
    if grep -q "resumed from" "$log" && grep -q "precision $3" "$log" &&
        awk -v w="$worst" 'BEGIN{exit !(w <= 5e-3)}'; then
        pass "bf16: $1 checkpoint resumed in $3: steps 21-40 within $worst of the $1 run"
    else
        fail "bf16: $1 checkpoint resumed in $3 (max rel diff $worst)" "$(tail -5 "$log")"
    fi
}
cross bf16 "$TMP/tiny-topk-first/step_000020" fp32 "$TMP/tiny-topk-straight.log"
cross fp32 "$TMP/fp32-straight/step_000020" bf16 "$TMP/fp32-straight.log"

# ---- one rank, 2 threads: heads and experts run in parallel, one thread each ----
for name in tiny tiny-topk; do
    for t in 1 2; do
        OMP_NUM_THREADS=$t $INFMOE train tests/configs/$name.yaml --set train.precision=bf16 \
            --set output.dir="$TMP/$name-t$t" > "$TMP/$name-t$t.log" 2>&1
    done
    worst=$(max_rel_diff "$(losses "$TMP/$name-t1.log")" "$(losses "$TMP/$name-t2.log")")
    if grep -q "ranks 1 x threads 2" "$TMP/$name-t2.log" && awk -v w="$worst" 'BEGIN{exit !(w <= 1e-4)}'; then
        pass "bf16: $name, 1 rank x 2 threads (heads and experts in parallel) equals 1 thread (max rel diff $worst)"
    else
        fail "bf16: $name, 1 rank x 2 threads against 1 thread (max rel diff $worst)" "$(tail -3 "$TMP/$name-t2.log")"
    fi
done

# ---- fused attention (row statistics, probabilities made again in backward) against
#      stored probabilities: the same bits over whole runs, 1 and 2 threads ----
for name in tiny-topk tiny-infinite; do
    for t in 1 2; do
        for a in fused stored; do
            OMP_NUM_THREADS=$t $INFMOE train tests/configs/$name.yaml --set train.precision=bf16 \
                --set train.steps=12 --set train.attention=$a --set output.dir="$TMP/att-$name-$t-$a" \
                > "$TMP/att-$name-$t-$a.log" 2>&1
            build/tests/tool_ckhash "$TMP/att-$name-$t-$a/step_000012/model.h5" > "$TMP/att-$name-$t-$a.hash" 2>&1
        done
        if grep -q "attention fused" "$TMP/att-$name-$t-fused.log" &&
            grep -q "attention stored" "$TMP/att-$name-$t-stored.log" &&
            [ -s "$TMP/att-$name-$t-fused.hash" ] &&
            [ "$(losses "$TMP/att-$name-$t-fused.log")" = "$(losses "$TMP/att-$name-$t-stored.log")" ] &&
            cmp -s "$TMP/att-$name-$t-fused.hash" "$TMP/att-$name-$t-stored.hash"; then
            pass "bf16: $name, $t thread(s): fused attention trains bitwise as stored (losses, params, m, v)"
        else
            fail "bf16: $name, $t thread(s): fused attention differs from stored" \
                "$(diff "$TMP/att-$name-$t-fused.hash" "$TMP/att-$name-$t-stored.hash" | head -5)"
        fi
    done
done
