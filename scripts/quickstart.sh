#!/usr/bin/env bash
# Set up and run capgate in front of a real vLLM with Redis, on a fresh Debian machine with
# Python 3.11. By default vLLM's CPU build serves a tiny model generated offline; with
# MODEL=<hub id or path> on a machine with an NVIDIA GPU, vLLM's official build serves MODEL;
# with CAPGATE_UPSTREAMS=<url> capgate fronts a vLLM you already run (started with
# --scheduling-policy priority). Ctrl-C stops everything this script started.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$ROOT"

PORT=${CAPGATE_PORT:-8000}
VLLM_PORT=${VLLM_PORT:-8001}
REDIS_PORT=${REDIS_PORT:-6380}
RUN=$ROOT/.run
mkdir -p "$RUN/redis"

apt_install redis-server
gateway_venv client
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$RUN/redis" --appendonly yes --save "" \
  >"$RUN/redis.log" 2>&1 &
pids+=($!)

if [ -z "${CAPGATE_UPSTREAMS:-}" ]; then
  if [ -n "${MODEL:-}" ]; then
    VLLM_VENV=${CAPGATE_VLLM_VENV:-$ROOT/.venv-vllm-gpu}
    [ -x "$VLLM_VENV/bin/python" ] || "$PYTHON" -m venv "$VLLM_VENV"
    "$VLLM_VENV/bin/python" -c "import vllm" 2>/dev/null || "$VLLM_VENV/bin/pip" install -q vllm
    SERVED=$MODEL
    MODEL_ARGS=(--model "$MODEL" --served-model-name "$MODEL")
  else
    bash "$ROOT/scripts/setup-vllm.sh"
    VLLM_VENV=${CAPGATE_VLLM_VENV:-$ROOT/.venv-vllm}
    SERVED=tiny
    MODEL_ARGS=(--model "${CAPGATE_MODEL_DIR:-$ROOT/.models/tiny-llama}" --served-model-name tiny
                --dtype float32 --max-model-len 8192 --enforce-eager)
    export HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} VLLM_ENABLE_RESPONSES_API_STORE=1
  fi
  echo "capgate: starting vLLM ($SERVED) on 127.0.0.1:$VLLM_PORT (about a minute on a CPU)"
  "$VLLM_VENV/bin/python" -m vllm.entrypoints.openai.api_server "${MODEL_ARGS[@]}" \
    --host 127.0.0.1 --port "$VLLM_PORT" --scheduling-policy priority >"$RUN/vllm.log" 2>&1 &
  pids+=($!)
  wait_http "http://127.0.0.1:$VLLM_PORT/health" 600 "${pids[-1]}" || { tail -30 "$RUN/vllm.log"; exit 1; }
  export CAPGATE_UPSTREAMS=http://127.0.0.1:$VLLM_PORT
else
  SERVED=${MODEL:-$(curl -s "${CAPGATE_UPSTREAMS%%,*}/v1/models" | "$VENV/bin/python" -c "import json,sys; print(json.load(sys.stdin)['data'][0]['id'])")}
fi

export CAPGATE_REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0
export CAPGATE_POLICY_FILE=${CAPGATE_POLICY_FILE:-$ROOT/deploy/policies/example.yaml}
export CAPGATE_SPOOL_DIR=$RUN/spool
"$VENV/bin/capgate" serve --host 127.0.0.1 --port "$PORT" >"$RUN/capgate.log" 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$PORT/readyz" 60 "${pids[-1]}" || { tail -30 "$RUN/capgate.log"; exit 1; }

cat <<EOT

capgate is serving $SERVED on http://127.0.0.1:$PORT (policy: $CAPGATE_POLICY_FILE; logs in .run/)

  curl http://127.0.0.1:$PORT/v1/chat/completions \\
    -H "Authorization: Bearer cg-demo-pro" -H "Content-Type: application/json" \\
    -d '{"model": "$SERVED", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 32}'

  $VENV/bin/python -c '
from openai import OpenAI
client = OpenAI(base_url="http://127.0.0.1:$PORT/v1", api_key="cg-demo-pro")
stream = client.chat.completions.create(model="$SERVED", messages=[{"role": "user", "content": "Hello"}],
                                        max_tokens=32, stream=True, stream_options={"include_usage": True})
for chunk in stream: print(chunk.usage or chunk.choices[0].delta.content, end="", flush=True)'

  curl -H "Authorization: Bearer cg-demo-pro" http://127.0.0.1:$PORT/v1/usage     # budget left
  curl http://127.0.0.1:$PORT/metrics                                              # Prometheus

Press Ctrl-C to stop.
EOT
wait "${pids[-1]}"
