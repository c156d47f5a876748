"""The input pipeline: shards -> `Batch`es on the training device (pipeline/loader.py is the entry point).

The loader's choices are plain data here, importable without torch, so that the config is
validated (train/config_schema.py) before a tool pays for the heavy imports.
"""

BACKENDS = ("dali", "torch")  # data.backend: NVIDIA DALI, or the torchvision fallback (pipeline/torch_loader.py)
DECODE_DEVICES = ("auto", "gpu", "cpu")  # data.decode_device
