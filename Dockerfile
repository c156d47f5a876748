# GPU image for clusters: NGC PyTorch 25.01 (CUDA 12.8, PyTorch 2.6, Python 3.12, cuDNN 9, NCCL).
# NGC's image is the one NVIDIA's own MLPerf submissions build on: its torch, NCCL and cuDNN are
# built and tested together for Hopper, and its CUDA 12 matches DALI's cuda120 wheel.
FROM nvcr.io/nvidia/pytorch:25.01-py3

ARG DALI_VERSION=2.4.0
# A pinned apex commit known to build against PyTorch 2.6+ with its CUDA extensions.
ARG APEX_COMMIT=10417aceddd7d5d05d7cbf7b0fc2daad1105f8b4
# Hopper (H100/H200) and Ampere (A100); widen for other GPUs.
ARG TORCH_CUDA_ARCH_LIST="8.0;9.0"

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST}

RUN pip uninstall -y apex \
 && pip install -v --no-build-isolation \
      --config-settings "--build-option=--cpp_ext --cuda_ext --parallel 8" \
      "git+https://github.com/NVIDIA/apex.git@${APEX_COMMIT}" \
 && python -c "from apex.optimizers import FusedSGD"

RUN pip install "nvidia-dali-cuda120==${DALI_VERSION}"

WORKDIR /workspace/maskrcnn
COPY setup.cfg pyproject.toml README.md ./
COPY pipeline pipeline
COPY model model
COPY train train
COPY tools tools
COPY configs configs
# The image's own torch and torchvision stay: they are pinned as constraints while the project
# and the rest of its dependencies install around them.
RUN python -c "import torch, torchvision; print(f'torch=={torch.__version__}'); print(f'torchvision=={torchvision.__version__}')" > /tmp/image-torch.txt \
 && pip install -c /tmp/image-torch.txt -e ".[eval]"

# `docker run IMAGE torchrun --nproc_per_node=8 train/main.py ...` or `python tools/shard_coco.py ...`
CMD ["python", "train/main.py", "--help"]
