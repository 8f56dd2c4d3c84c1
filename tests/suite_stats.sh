#!/usr/bin/env bash
# Routing statistics (stats.h5, infmoe stats), run by tests/run.sh from the repo
# root: prints one PASS/FAIL line per test. The P=1 crafted-routing and the
# writer-level SWMR/SIGKILL tests are C programs (tests/test_stats*.c).
. tests/lib.sh
CFG=tests/configs/tiny-topk.yaml
TMP=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; done
    rm -rf "$TMP"
}
trap cleanup EXIT

# the steps of layer h.0's rows, one a line
steps_of() { $INFMOE stats "$1" --csv --layers 0 2>/dev/null | awk -F, 'NR > 1 {print $1}'; }
# token columns of h.0 for steps FROM..TO
tokens_of() {
    $INFMOE stats "$1" --csv --layers 0 --steps "$2" 2>/dev/null |
        awk -F, 'NR == 1 {for (i = 1; i <= NF; i++) if ($i ~ /^tokens_/) c[i] = 1; next}
                 {s = $1; for (i = 1; i <= NF; i++) if (i in c) s = s "," $i; print s}'
}
wait_steps() { # log, n: wait (up to 30 s) until the log shows n step lines
    for _ in $(seq 300); do
        [ "$(grep -c '^step ' "$1" 2>/dev/null)" -ge "$2" ] && return 0
        sleep 0.1
    done
    return 1
}
# SIGKILL a background process and wait until it is gone (disowned,
# so the shell prints no "Killed" line)
kill_wait() {
    kill -KILL "$1" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
    local keep=() p
    for p in "${PIDS[@]}"; do [ "$p" != "$1" ] && keep+=("$p"); done
    PIDS=("${keep[@]}")
}
last_logged() { grep '^step ' "$1" | tail -1 | sed 's/^step \([0-9]*\)\/.*/\1/'; }

# ---- crafted routing at P=2 ep=2 (P=1 runs as a test_ program) ----
out=$(timeout 120 "${MPIRUN[@]}" -np 2 build/tests/test_stats_route 2 2>&1)
if [ $? -eq 0 ] && printf '%s\n' "$out" | grep -q '^PASS '; then
    printf '%s\n' "$out" | grep '^PASS '
else
    fail "stats: crafted Switch routing at P=2 ep=2" "$out"
fi

# ---- a live run: rows appear to readers, --follow prints them, SIGKILL keeps every flushed row ----
live="$TMP/live"
$INFMOE train $CFG --set train.steps=100000 --set train.stats_every=1 --set train.log_every=1 \
    --set output.dir="$live" > "$TMP/live.log" 2>&1 &
tpid=$!
disown "$tpid"
PIDS+=("$tpid")
wait_steps "$TMP/live.log" 5
n1=$(steps_of "$live/stats.h5" | wc -l)
$INFMOE stats "$live/stats.h5" --follow --layers 0 > "$TMP/follow.out" 2>&1 &
fpid=$!
disown "$fpid"
PIDS+=("$fpid")
wait_steps "$TMP/live.log" $((n1 + 40))
sleep 2.5
n2=$(steps_of "$live/stats.h5" | wc -l)
kill_wait "$fpid"
fmax=$(sed -n 's/^step \([0-9]*\) h\.0 .*/\1/p' "$TMP/follow.out" | tail -1)
flines=$(grep -c '^step ' "$TMP/follow.out")
if [ "$n1" -ge 5 ] && [ "$n2" -gt "$n1" ] && [ "${fmax:-0}" -gt "$n1" ] && [ "$flines" -gt 10 ]; then
    pass "stats: readers during training see rows appear ($n1, then $n2 rows); --follow printed through step $fmax"
else
    fail "stats: readers during training (rows $n1 then $n2; --follow to step ${fmax:-none}, $flines lines)" \
        "$(tail -3 "$TMP/follow.out"; tail -2 "$TMP/live.log")"
fi
kill_wait "$tpid"
logged=$(last_logged "$TMP/live.log")
rows=$(steps_of "$live/stats.h5" | wc -l)
if [ -n "$logged" ] && [ "$rows" -ge "$logged" ] && [ "$rows" -le $((logged + 1)) ] &&
    [ "$(steps_of "$live/stats.h5")" = "$(seq 1 "$rows")" ] && $INFMOE stats "$live/stats.h5" >/dev/null; then
    pass "stats: SIGKILL of a training run: every flushed row readable (steps 1..$rows, $logged logged)"
else
    fail "stats: SIGKILL of a training run (rows $rows, last logged step $logged)" "$($INFMOE stats "$live/stats.h5" 2>&1 | head -3)"
fi

# ---- resume after SIGKILL: rows after the checkpoint dropped, no gap, no duplicate ----
k="$TMP/kill"
$INFMOE train $CFG --set train.steps=100000 --set train.stats_every=1 --set train.ckpt_every=10 \
    --set train.log_every=1 --set output.dir="$k" > "$TMP/kill.log" 2>&1 &
tpid=$!
disown "$tpid"
PIDS+=("$tpid")
wait_steps "$TMP/kill.log" 25
kill_wait "$tpid"
before=$(steps_of "$k/stats.h5" | tail -1)
latest=$(cat "$k/latest" 2>/dev/null)
end=$(( $(echo "${latest#step_}" | sed 's/^0*//') + 20 ))
$INFMOE train $CFG --set train.steps=$end --set train.stats_every=1 --set train.ckpt_every=10 \
    --set output.dir="$k" --resume auto > "$TMP/kill-resume.log" 2>&1
rc=$?
if [ $rc -eq 0 ] && [ "$(steps_of "$k/stats.h5")" = "$(seq 1 $end)" ] &&
    grep -q "^stats: .* kept, appending" "$TMP/kill-resume.log"; then
    pass "stats: killed at step $before (checkpoint $latest), resume auto to $end: /step is 1..$end, no gap or duplicate"
else
    fail "stats: resume after SIGKILL (exit $rc, rows up to $before, checkpoint $latest)" \
        "$(steps_of "$k/stats.h5" | tr '\n' ' ' | tail -c 300; tail -3 "$TMP/kill-resume.log")"
fi

# ---- 30 steps at P=2 ep=2 with ckpt_every=10, resumed from step 10: rows 11-30 again ----
r="$TMP/resume"
"${MPIRUN[@]}" -np 2 $INFMOE train $CFG --set parallel.ep=2 --set train.steps=30 --set train.stats_every=1 \
    --set train.ckpt_every=10 --set output.dir="$r" > "$TMP/r1.log" 2>&1
first=$(tokens_of "$r/stats.h5" 11:30)
"${MPIRUN[@]}" -np 2 $INFMOE train $CFG --set parallel.ep=2 --set train.steps=30 --set train.stats_every=1 \
    --set output.dir="$r" --resume "$r/step_000010" > "$TMP/r2.log" 2>&1
rc=$?
if [ $rc -eq 0 ] && [ "$(steps_of "$r/stats.h5")" = "$(seq 1 30)" ] && [ -n "$first" ] &&
    [ "$first" = "$(tokens_of "$r/stats.h5" 11:30)" ]; then
    pass "stats: 30 steps at P=2 ep=2, resumed from step 10: /step is 1..30; rows 11-30 rewritten with the same counts"
else
    fail "stats: resume from step 10 at P=2 ep=2 (exit $rc)" "$(steps_of "$r/stats.h5" | tr '\n' ' '; tail -3 "$TMP/r2.log")"
fi

# ---- the report ----
out=$($INFMOE stats "$r/stats.h5" 2>&1)
if [ $? -eq 0 ] && printf '%s\n' "$out" | grep -q '^layer h.1 | topk, 4 experts, k 2 | 30 rows' &&
    [ "$(printf '%s\n' "$out" | grep -c '^    expert [0-3] .*%')" -eq 8 ] &&
    printf '%s\n' "$out" | grep -q '^  max/mean   step 1 ' && printf '%s\n' "$out" | grep -q '^  unused ' &&
    printf '%s\n' "$out" | grep -q '^  entropy '; then
    pass "stats: report per layer: usage bars, max/mean over steps, unused experts, entropy"
else
    fail "stats: report" "$out"
fi
out=$($INFMOE stats "$r/stats.h5" --layers h.1 --steps 5:9 --csv 2>&1)
if [ "$(printf '%s\n' "$out" | wc -l)" -eq 6 ] && [ "$(printf '%s\n' "$out" | sed -n 2p | cut -d, -f1,2)" = "5,h.1" ]; then
    pass "stats: --layers h.1 --steps 5:9 --csv: a header and 5 rows"
else
    fail "stats: --layers/--steps/--csv" "$out"
fi

# ---- ∞-MoE at P=2 ep=2: sigma, active units, overlap and phase times in the rows ----
inf="$TMP/inf"
out=$(timeout 120 "${MPIRUN[@]}" -np 2 $INFMOE train tests/configs/tiny-infinite.yaml --set parallel.ep=2 \
    --set train.steps=10 --set train.stats_every=5 --set output.dir="$inf" 2>&1)
csv=$($INFMOE stats "$inf/stats.h5" --csv 2>&1)
# every row: the block counts add up to active_units x n_tokens / mask_block (16), sigma in
# (0, 10), overlap in [0, 1], routing, unit and all-to-all times > 0, dispatch 0
bad=$(printf '%s\n' "$csv" | awk -F, 'NR == 1 {for (i = 1; i <= NF; i++) c[$i] = i; next}
    {s = 0; for (i = 1; i <= NF; i++) if (i >= c["tokens_0"]) s += $i
     d = s * 16 - $c["active_units"] * $c["n_tokens"]; if (d < 0) d = -d
     if (d > 1e-6 * s * 16 || $c["mean_sigma"] <= 0 || $c["mean_sigma"] >= 10 ||
         $c["mask_overlap"] < 0 || $c["mask_overlap"] > 1 || $c["t_route"] <= 0 ||
         $c["t_expert"] <= 0 || $c["t_alltoall"] <= 0 || $c["t_dispatch"] != 0) print}')
rows=$(printf '%s\n' "$csv" | awk 'NR > 1' | wc -l)
report=$($INFMOE stats "$inf/stats.h5" 2>&1)
if [ "$rows" -eq 4 ] && [ -z "$bad" ] && printf '%s\n' "$report" | grep -q '^  sigma .* active units .* mask overlap' &&
    h5dump -H "$inf/stats.h5" 2>/dev/null | grep -q '"sigma_hist"'; then
    pass "stats: ∞-MoE rows at P=2 ep=2 carry sigma, active units (= block counts), overlap, sigma_hist and phase times"
else
    fail "stats: ∞-MoE rows at P=2 ep=2 ($rows rows)" "$out
$bad
$report"
fi

# ---- clear messages: missing, empty, foreign, not HDF5 ----
$INFMOE train $CFG --set train.steps=5 --set train.stats_every=10 --set output.dir="$TMP/empty" > /dev/null 2>&1
refused_with 1 "stats: missing file: one line" "infmoe stats: $TMP/none.h5: no such file" $INFMOE stats "$TMP/none.h5"
refused_with 1 "stats: file without rows: one line" "no rows yet" $INFMOE stats "$TMP/empty/stats.h5"
refused_with 1 "stats: foreign HDF5 file (a checkpoint): one line" "not an infmoe stats file" \
    $INFMOE stats "$r/step_000030/model.h5"
refused_with 1 "stats: not an HDF5 file: one line" "README.md: not an HDF5 file" $INFMOE stats README.md
refused_with 1 "stats: unknown layer: one line" "no MoE layer 7 in the file (layers: 0,1)" \
    $INFMOE stats "$r/stats.h5" --layers 7

# ---- tools/plot_usage.py, where Debian's python3-h5py and python3-matplotlib are installed ----
if /usr/bin/python3 -c 'import h5py, matplotlib' 2>/dev/null; then
    out=$(/usr/bin/python3 tools/plot_usage.py "$r/stats.h5" -o "$TMP/usage.png" 2>&1)
    if [ $? -eq 0 ] && [ "$(head -c 8 "$TMP/usage.png" | od -An -tx1 | tr -d ' \n')" = 89504e470d0a1a0a ] &&
        /usr/bin/python3 tools/plot_usage.py "$TMP/none.h5" 2>&1 | grep -q "no such file"; then
        pass "stats: tools/plot_usage.py writes a PNG heatmap of a run's file; a missing file is one line"
    else
        fail "stats: tools/plot_usage.py" "$out"
    fi
fi
