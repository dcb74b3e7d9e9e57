#!/usr/bin/env bash
# Manual check (not in the test suite): the REAL Open WebUI generates and edits images through our
# ComfyUI API. Open WebUI lives in its own venv, never a project dependency:
#   python3.11 -m venv /work/owui-venv && /work/owui-venv/bin/pip install open-webui
#   OWUI_VENV=/work/owui-venv bench/check_open_webui.sh        (from the repo root, after `make setup`)
# Optional: KDIFF_KEY=<key> (our server gets KDIFF_API_KEYS, Open WebUI the same COMFYUI_API_KEY),
# MODEL=sd1 SIZE=64x64 (the tiny SD model instead of the shipped digits one; default digits 512x512).
# Starts `kdiff serve` on the shipped digits model + a tiny SD model, then Open WebUI offline with the
# comfyui engine pointed at it (its default workflow and its admin page's default node ids; an
# img2img edit workflow), and runs bench/check_open_webui.py. Logs and data stay in $WORK.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OWUI_VENV=${OWUI_VENV:?set OWUI_VENV to the venv holding open-webui}
PY=$REPO/.venv/bin/python
WORK=$(mktemp -d /tmp/owui-check.XXXXXX)
cd "$REPO"
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { # url, seconds, pid
    for _ in $(seq 1 "$2"); do
        curl -fs -o /dev/null "$1" && return 0
        kill -0 "$3" 2>/dev/null || return 1
        sleep 1
    done
    return 1
}
echo "work dir: $WORK; open-webui $("$OWUI_VENV/bin/pip" show open-webui 2>/dev/null | sed -n 's/^Version: //p')"
"$PY" -c "import sys; from pathlib import Path; from tests.support.sd_tiny import digits_and_tiny_sd_store as s; s(Path(sys.argv[1]))" "$WORK/store"

KPORT=$(free_port)
KDIFF_MODEL_STORE=$WORK/store KDIFF_DEFAULT_MODEL=digits KDIFF_MODELS=digits KDIFF_API_KEYS=${KDIFF_KEY:-} \
    "$PY" -m service.cli serve --port "$KPORT" >"$WORK/kdiff.log" 2>&1 &
KPID=$!
OPID=
cleanup() { kill "$KPID" ${OPID:+"$OPID"} 2>/dev/null || true; }
trap cleanup EXIT
wait_http "http://127.0.0.1:$KPORT/readyz" 120 "$KPID" || { cat "$WORK/kdiff.log"; exit 1; }
KURL=http://127.0.0.1:$KPORT

# Open WebUI's admin page defaults for its default workflow's node ids (REQUIRED_WORKFLOW_NODES)
NODES='[{"type":"prompt","key":"text","node_ids":["6"]},{"type":"negative_prompt","key":"text","node_ids":["7"]},
{"type":"model","key":"ckpt_name","node_ids":["4"]},{"type":"width","key":"width","node_ids":["5"]},
{"type":"height","key":"height","node_ids":["5"]},{"type":"n","key":"batch_size","node_ids":["5"]},
{"type":"steps","key":"steps","node_ids":["3"]},{"type":"seed","key":"seed","node_ids":["3"]}]'
# Open WebUI ships no edit workflow: an admin's img2img one (LoadImage -> VAEEncode -> KSampler 0.5)
EDIT='{"4":{"class_type":"CheckpointLoaderSimple","inputs":{"ckpt_name":"x"}},
"10":{"class_type":"LoadImage","inputs":{"image":"placeholder.png"}},
"11":{"class_type":"VAEEncode","inputs":{"pixels":["10",0],"vae":["4",2]}},
"6":{"class_type":"CLIPTextEncode","inputs":{"text":"","clip":["4",1]}},
"7":{"class_type":"CLIPTextEncode","inputs":{"text":"","clip":["4",1]}},
"3":{"class_type":"KSampler","inputs":{"seed":7,"steps":8,"cfg":5,"sampler_name":"euler","scheduler":"normal",
"denoise":0.5,"model":["4",0],"positive":["6",0],"negative":["7",0],"latent_image":["11",0]}},
"8":{"class_type":"VAEDecode","inputs":{"samples":["3",0],"vae":["4",2]}},
"9":{"class_type":"SaveImage","inputs":{"filename_prefix":"edit","images":["8",0]}}}'
EDIT_NODES='[{"type":"image","key":"image","node_ids":["10"]},{"type":"prompt","key":"text","node_ids":["6"]},
{"type":"model","key":"ckpt_name","node_ids":["4"]}]'

OPORT=$(free_port)
env DATA_DIR="$WORK/owui-data" WEBUI_SECRET_KEY=check-open-webui OFFLINE_MODE=true HF_HUB_OFFLINE=1 \
    ENABLE_OLLAMA_API=false ENABLE_OPENAI_API=false BYPASS_EMBEDDING_AND_RETRIEVAL=true RAG_EMBEDDING_MODEL= \
    WHISPER_MODEL= ENABLE_WEB_SEARCH=false ENABLE_CODE_INTERPRETER=false \
    ENABLE_IMAGE_GENERATION=true IMAGE_GENERATION_ENGINE=comfyui IMAGE_GENERATION_MODEL="${MODEL:-digits}" \
    COMFYUI_BASE_URL="$KURL" COMFYUI_API_KEY="${KDIFF_KEY:-}" COMFYUI_WORKFLOW_NODES="$NODES" \
    ENABLE_IMAGE_EDIT=true IMAGE_EDIT_ENGINE=comfyui IMAGE_EDIT_MODEL="${MODEL:-digits}" IMAGE_EDIT_SIZE="${SIZE:-512x512}" \
    IMAGES_EDIT_COMFYUI_BASE_URL="$KURL" IMAGES_EDIT_COMFYUI_API_KEY="${KDIFF_KEY:-}" \
    IMAGES_EDIT_COMFYUI_WORKFLOW="$EDIT" IMAGES_EDIT_COMFYUI_WORKFLOW_NODES="$EDIT_NODES" \
    "$OWUI_VENV/bin/open-webui" serve --host 127.0.0.1 --port "$OPORT" >"$WORK/owui.log" 2>&1 &
OPID=$!
wait_http "http://127.0.0.1:$OPORT/health" 300 "$OPID" || { tail -50 "$WORK/owui.log"; exit 1; }

"$PY" bench/check_open_webui.py --owui "http://127.0.0.1:$OPORT" --kdiff "$KURL" --key "${KDIFF_KEY:-}" --size "${SIZE:-512x512}"
echo "our server's log: $WORK/kdiff.log; Open WebUI's: $WORK/owui.log"
