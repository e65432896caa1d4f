# One container: vllm-mqtt, which runs vLLM. Build from the repository root:
#   docker build -f vllm.Dockerfile -t vllm-mqtt .
FROM vllm/vllm-openai:v0.11.0

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

EXPOSE 1883
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s \
  CMD grep -q "\"online\"" /data/status.json || exit 1
ENTRYPOINT ["deno-bin", "run", "--allow-net", "--allow-read", "--allow-write", "--allow-env", "--allow-sys", "--allow-run", "main.ts"]
