# The serving container: a CUDA + PyTorch image, the project installed by the same scripts/setup that
# developers and CI run, from requirements.lock (TORCH_SPEC=system keeps the image's own CUDA build of torch),
# port 8080.
#   docker build -t lora-serving .
#   docker run --gpus all -v $PWD/model:/opt/ml/model -p 8080:8080 lora-serving
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

# A C compiler at run time: Triton builds its launcher with one on first use, and the CPU LoRA kernel
# (lora_serving/kernels/cpu_lora.c) is compiled at start; the runtime base image has none.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/lora-serving
COPY pyproject.toml requirements.lock ./
COPY scripts/setup scripts/setup
COPY lora_serving lora_serving
RUN PYTHON=python TORCH_SPEC=system scripts/setup

ENV PATH=/opt/lora-serving/.venv/bin:$PATH
EXPOSE 8080
CMD ["python", "-m", "lora_serving"]
