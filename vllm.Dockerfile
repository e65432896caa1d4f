# One container: vllm-mqtt, which runs vLLM. Build from the repository root:
#   docker build -f vllm.Dockerfile -t vllm-mqtt .
FROM vllm/vllm-openai:v0.11.0

# vLLM's audio loader (librosa, soundfile), for audio-language models (--audio-model): its `audio`
# extra, which the image leaves out for its licences; the same version as the image, as vLLM's own
# Docker docs add it.
RUN uv pip install --system "vllm[audio]==0.11.0"

# Deno from the npm registry; the real binary goes on PATH (the npm shim does not pass signals on).
RUN npm --version >/dev/null 2>&1 || (apt-get update && apt-get install -y --no-install-recommends nodejs npm && rm -rf /var/lib/apt/lists/*)
RUN npm install -g deno@2.9.6 && ln -sf "$(deno eval 'console.log(Deno.execPath())')" /usr/local/bin/deno-bin

WORKDIR /opt/vllm-mqtt
COPY deno.json deno.lock ./
COPY main.ts ./
COPY lib ./lib
COPY prompts ./prompts
# Dependencies cached at build time.
RUN deno-bin install && deno-bin cache main.ts lib/workers/request_worker.ts lib/engine/simulator_worker.ts

EXPOSE 8081
# Ready: broker connected and engine taking requests (the image has python3, not always curl).
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s \
  CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8081/readyz', timeout=4)" || exit 1
# The permissions of deno.json's `service` set, widened for the compose network's broker host,
# /data, and 0.0.0.0 (compose.yaml's --http-host, for Prometheus on the compose network).
# --allow-run is unscoped here: the CUDA image sets LD_LIBRARY_PATH, which vLLM needs and a
# scoped --allow-run refuses to pass on. --max-semi-space-size=4 as `deno task start`: each thread's
# young-generation semi-spaces at most 4 MB, not V8's 32 (docs/operations.md).
ENTRYPOINT ["deno-bin", "run", "--v8-flags=--max-semi-space-size=4", "--allow-net=127.0.0.1,localhost,mosquitto,0.0.0.0", "--allow-read=prompts,lib,/data", "--allow-write=/data", "--allow-env", "--allow-run", "main.ts", "--data-dir=/data"]
