#!/usr/bin/env bash
# vLLM's own serving benchmark client, `vllm bench serve`, unchanged, against one or more OpenAI-compatible
# servers, interleaved: for each backend (completions, chat) and each concurrency, every server in turn, so that
# the others' load on a shared machine falls on all of them alike.
#
#   VLLM=~/vllm-venv/bin/vllm TOKENIZER=MODEL_DIR benchmarks/bench_serve.sh RESULT_DIR \
#       "nanovllm serve MODEL_DIR --served-model-name smollm2 ..." "~/vllm-venv/bin/vllm serve MODEL_DIR ..."
#
# (vLLM-CPU's server reads VLLM_CPU_KVCACHE_SPACE and VLLM_CPU_OMP_THREADS_BIND from this script's environment.)
# Each server command gets `--port 81NN` appended and is labelled by its first word's name (nanovllm, vllm); a
# URL (http://HOST:PORT) instead is a server already running. Every server must serve the same model under the
# same name. Results: RESULT_DIR/LABEL-BACKEND-cN.json (`--save-result`), the client's output in
# RESULT_DIR/LABEL-BACKEND-cN.txt, `uptime` before each run in RESULT_DIR/load.txt; then the table of
# docs/benchmarks.md (each cell: nanovllm / the other; the ratio: nanovllm's output tok/s over the other's).
# CONCURRENCY (default "1 16 64"), INPUT_LEN (128), OUTPUT_LEN (64), PER_CLIENT (2) and MIN_PROMPTS (8:
# --num-prompts is the larger of concurrency x PER_CLIENT and this) change the workload.
set -euo pipefail
out=$1; shift
mkdir -p "$out"
vllm=${VLLM:-vllm} per=${PER_CLIENT:-2} min=${MIN_PROMPTS:-8}
pids=() urls=() labels=()
trap 'for p in "${pids[@]}"; do [ -n "$p" ] && kill "$p" 2>/dev/null; done; wait' EXIT
n=0
for cmd in "$@"; do
    port=$((8100 + n)); n=$((n + 1))
    if [[ $cmd == http* ]]; then  # a server already running: labelled by its model card's owned_by
        card=$(curl -sf "$cmd/v1/models")
        urls+=("$cmd") pids+=("") labels+=("$(echo "$card" | grep -o '"owned_by": *"[^"]*' | cut -d'"' -f4)")
        continue
    fi
    label=$(basename "${cmd%% *}")
    bash -c "exec $cmd --port $port" > "$out/$label-server.log" 2>&1 &
    pids+=($!) urls+=("http://127.0.0.1:$port") labels+=("$label")
done
for i in "${!urls[@]}"; do  # vLLM-CPU takes 2-3 minutes to start
    until curl -sf "${urls[$i]}/v1/models" > /dev/null; do
        kill -0 "${pids[$i]}" || { echo "${labels[$i]} did not start, see $out/${labels[$i]}-server.log"; exit 1; }
        sleep 5
    done
done
for backend in openai openai-chat; do
    endpoint=$([ $backend = openai ] && echo /v1/completions || echo /v1/chat/completions)
    for c in ${CONCURRENCY:-1 16 64}; do
        for i in "${!urls[@]}"; do
            name=${labels[$i]}-$backend-c$c n=$((c * per > min ? c * per : min))
            echo "$name $(uptime)" | tee -a "$out/load.txt"
            "$vllm" bench serve --backend $backend --endpoint $endpoint --base-url "${urls[$i]}" \
                --tokenizer "${TOKENIZER:?the model folder}" --dataset-name random --seed 0 --ignore-eos \
                --random-input-len "${INPUT_LEN:-128}" --random-output-len "${OUTPUT_LEN:-64}" \
                --max-concurrency "$c" --num-prompts "$n" \
                --save-result --result-dir "$out" --result-filename "$name.json" > "$out/$name.txt" 2>&1
            grep -E "^(Failed requests|Output token throughput|Mean TTFT|Mean TPOT)" "$out/$name.txt"
        done
    done
done
# the table of docs/benchmarks.md: one row per backend and concurrency, the servers side by side
python3 - "$out" <<'EOF'
import glob, json, os, sys
runs = {}
for f in glob.glob(os.path.join(sys.argv[1], "*-c*.json")):
    d = json.load(open(f))
    runs[os.path.basename(f).split("-")[0], d["backend"], d["max_concurrency"]] = d
labels = sorted({k[0] for k in runs}, key=lambda l: l != "nanovllm")  # nanovllm first
cols = [("req/s", "request_throughput", "{:.2f}"), ("output tok/s", "output_throughput", "{:.1f}"),
        ("mean TTFT ms", "mean_ttft_ms", "{:.0f}"), ("median TTFT ms", "median_ttft_ms", "{:.0f}"),
        ("mean TPOT ms", "mean_tpot_ms", "{:.0f}"), ("failed", "failed", "{}")]
print(f"| backend | clients | {' | '.join(c for c, _, _ in cols)} | output tok/s ratio |")
print("|---" * (len(cols) + 3) + "|")
for _, backend, c in sorted(k for k in runs if k[0] == labels[0]):
    row = [runs.get((label, backend, c)) for label in labels]
    cells = [" / ".join(fmt.format(r[key]) if r else "-" for r in row) for _, key, fmt in cols]
    ratio = f"{row[0]['output_throughput'] / row[1]['output_throughput']:.2f}x" if len(row) > 1 and row[1] else "-"
    print(f"| {backend} | {c} | {' | '.join(cells)} | {ratio} |")
EOF
