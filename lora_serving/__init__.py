"""lora-serving: one base LLM and many unmerged LoRA adapters behind SageMaker LMI's contract.

Three rooms, imports pointing one way (container -> handler -> kernels):
- container: the HTTP front end, start-up (config, S3, adapters.tar.gz, the demo model), `python -m lora_serving`
- handler: the engine, LoRA adapters, request formats, and `lora_serving.handler.model`, DJL's entry point
- kernels: the LoRA ops (Triton on GPUs, C on CPUs) and the CPU decode kernels

This module imports nothing: importing a room loads that room and the ones below it, never those above. Comments
inside the package name files relative to it (handler/engine.py is lora_serving/handler/engine.py).
"""
