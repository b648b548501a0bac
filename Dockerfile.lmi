# The official LMI container (DJL Serving) running this engine through its DJL handler, in place of vLLM
# (docs/SERVER.md, "In the LMI container"). The model directory is mounted as for any LMI model; its
# serving.properties picks the mode (async, rolling batch or plain batching).
#   docker build -f Dockerfile.lmi -t lora-serving-lmi .
#   docker run --gpus all -v $PWD/model:/opt/ml/model -p 8080:8080 lora-serving-lmi
ARG LMI_IMAGE=763104351884.dkr.ecr.us-east-1.amazonaws.com/djl-inference:0.36.0-lmi18.0.0-cu128
FROM ${LMI_IMAGE}

WORKDIR /opt/lora-serving
COPY pyproject.toml ./
COPY lora_serving lora_serving
# Into the image's own Python, next to djl_python; its torch (2.11 in LMI 0.36) is kept, pip adds what the
# range asks for beyond it (transformers >= 5.17) and the GPU kernels' triton.
RUN python3 -m pip install --no-cache-dir ".[triton]"

# DJL maps OPTION_ENTRYPOINT to option.entryPoint; serving.properties may still override it.
ENV OPTION_ENTRYPOINT=lora_serving.handler.model
