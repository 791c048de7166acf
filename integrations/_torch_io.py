"""Moving whole tensors between ibp and torch devices: shared by weight
offload and the KV cache."""
import torch

import ibp
from ibp import dtypes


def checked_device(device):
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, not {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is cuda but torch sees no CUDA GPU")
    return device


def decode_whole(ct, device):
    """The whole of ``ct`` as a torch tensor on ``device`` (GPU decoder for CUDA)."""
    if device.type == "cuda":
        return ibp.decompress(ct, device=device)
    out = torch.empty(ct.shape, dtype=dtypes.torch_dtype(ct.dtype_name))
    return ibp.decompress(ct, out=out)


def compress_on_host(tensor, device):
    """``tensor`` (torch or numpy) compressed from host memory; pinned when it
    will feed a GPU."""
    ct = ibp.compress(tensor.detach().cpu() if torch.is_tensor(tensor) else tensor)
    return ct.pin_memory() if device.type == "cuda" else ct
