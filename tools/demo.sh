#!/usr/bin/env bash
# Veil's main job, end to end on loopback: build, get a model, start a server, generate privately.
#
#   bash tools/demo.sh ["prompt"]
#
# Model: distilgpt2 from the Hugging Face hub, quantized once and cached in weights/distilgpt2.
# Offline (no hub access), it falls back to the small trained GPT-2 in ../shared/golden/tiny and
# says so loudly: the text is then that weak model's, but the private protocol is the same.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PROMPT=${1:-"Global climate change is primarily caused by"}
PORT=${VEIL_DEMO_PORT:-7878}

echo "== building (release)"
cargo build --release -q -p veil-tools -p veil-server -p veil-client
BIN=target/release

# SmoothQuant calibration text, when the shared WikiText-2 copy is beside the clone: it moves GPT-2's
# activation outliers into the weights so per-row int8 keeps the small channels.
CALIBRATE=()
if [[ -f ../shared/data/wikitext-2/valid.txt ]]; then
    CALIBRATE=(--calibrate ../shared/data/wikitext-2/valid.txt)
fi

WEIGHTS=weights/distilgpt2
if [[ ! -f $WEIGHTS/client.veil ]]; then
    echo "== quantizing distilgpt2 (downloads it from the Hugging Face hub once)"
    if ! $BIN/veil-tools quantize --model distilgpt2 --out "$WEIGHTS" "${CALIBRATE[@]}"; then
        FALLBACK=../shared/golden/tiny
        WEIGHTS=weights/golden-tiny
        echo
        echo "################################################################################"
        echo "# OFFLINE FALLBACK: distilgpt2 could not be downloaded. Using the small GPT-2 in"
        echo "# $FALLBACK (2 layers, d=128, trained on WikiText-2) instead."
        echo "# The protocol is identical; the text quality is that tiny model's."
        echo "################################################################################"
        if [[ ! -f $WEIGHTS/client.veil ]]; then
            $BIN/veil-tools quantize --model "$FALLBACK" --out "$WEIGHTS"
        fi
    fi
fi

# The server logs every connection; in a file, its lines do not land in the middle of the text.
SERVER_LOG=target/demo-server.log
echo "== starting veil-server on 127.0.0.1:$PORT (log: $SERVER_LOG)"
$BIN/veil-server --weights "$WEIGHTS" --listen "127.0.0.1:$PORT" >"$SERVER_LOG" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
    if (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null; then break; fi
    if ! kill -0 $SERVER 2>/dev/null; then
        echo "veil-server exited; its log ($SERVER_LOG):" >&2
        cat "$SERVER_LOG" >&2
        exit 1
    fi
    sleep 0.1
done

echo "== private generation (the server sees only one-time-padded numbers)"
$BIN/veil-client --weights "$WEIGHTS" --server "127.0.0.1:$PORT" --prompt "$PROMPT" --max-new-tokens 32
echo "== server log: $SERVER_LOG"
