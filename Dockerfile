# magi on a CUDA PyTorch image. No kernels are built: attention runs through PyTorch (SDPA /
# FlexAttention); imageio-ffmpeg brings its own ffmpeg binary.
#
#   docker build -t magi .
#   docker run --gpus all -v $PWD/downloads:/workspace/downloads magi \
#       python -m magi.infer --config downloads/4.5B_distill_quant_config.json --mode t2v \
#       --prompt "Good Boy" --output_path downloads/out.mp4
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True

WORKDIR /opt/magi
COPY pyproject.toml README.md LICENSE ./
COPY magi ./magi
# The base image's torch satisfies torch>=2.5, so pip keeps it.
RUN pip install . && python -c "import magi, magi.config"

# Work in /workspace: the example configs' ./downloads/... paths resolve here (mount the weights).
WORKDIR /workspace
COPY example ./example
COPY scripts ./scripts
CMD ["python", "-m", "magi.infer", "--help"]
