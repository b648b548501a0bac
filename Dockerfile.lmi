# The official LMI container (DJL Serving) running this engine through its DJL handler, in place of vLLM
# (docs/SERVER.md, "In the LMI container"). The model directory is mounted as for any LMI model; its
# serving.properties picks the mode (async, rolling batch or plain batching).
#   docker build -f Dockerfile.lmi -t lora-serving-lmi .
#   docker run --gpus all -v $PWD/model:/opt/ml/model -p 8080:8080 lora-serving-lmi
ARG LMI_IMAGE=763104351884.dkr.ecr.us-east-1.amazonaws.com/djl-inference:0.36.0-lmi18.0.0-cu128
FROM ${LMI_IMAGE}

WORKDIR /opt/lora-serving
COPY pyproject.toml requirements.lock ./
COPY scripts/lock_for_image.py scripts/
COPY lora_serving lora_serving
# Into the image's own Python, next to djl_python. What the image already has stays as it is (its torch 2.11,
# triton, transformers 5.9, peft, ... in LMI 0.36, all inside this package's ranges); what the package adds
# comes at requirements.lock's versions.
RUN python3 scripts/lock_for_image.py requirements.lock > /tmp/added.lock \
    && PIP_CONSTRAINT=/tmp/added.lock python3 -m pip install --no-cache-dir ".[triton]"

# DJL maps OPTION_ENTRYPOINT to option.entryPoint; serving.properties may still override it.
ENV OPTION_ENTRYPOINT=lora_serving.handler.model
