# A GPU image for the teacher pass and training: CUDA torch from the PyTorch image, then
# mmkd with the vLLM extra on top (pip keeps the image's torch when it satisfies vLLM's pin;
# otherwise pin a torch/vLLM pair that match: docs/vllm-backend.md).
#   docker build -t mmkd:gpu .            (add --build-arg EXTRAS=test for the test tools)
#   docker run --gpus all -v $PWD/runs:/work/runs mmkd:gpu mmkd teacher-pass --teacher ... --output runs/cache
# Not built in CI (no Docker daemon there); see README "Install".
ARG BASE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE}
ARG EXTRAS=vllm
ENV PIP_NO_CACHE_DIR=1 TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=disabled
WORKDIR /opt/mmkd
COPY pyproject.toml README.md ./
COPY mmkd mmkd
COPY storage storage
COPY common common
COPY teacher_cache teacher_cache
COPY student student
COPY pipelines pipelines
COPY configs configs
RUN pip install ".[${EXTRAS}]" && mmkd --version
WORKDIR /work
CMD ["mmkd", "--help"]
