"""torch DDP's constructor arguments, as ringlet's DistributedDataParallel understands them.

ringlet's DDP takes torch's arguments in torch's order so that code written for
``torch.nn.parallel.DistributedDataParallel`` runs unchanged on a CPU. Some mean nothing there
(CUDA devices) or ask for what ringlet does otherwise (mixed precision, per-parameter hook
placement); rather than ignore them, this module refuses them with the ringlet way to get the
same, turns ``device_mesh`` into its group and checks the bucket sizes, before DDP builds anything.
"""

from __future__ import annotations

from typing import Any

import torch

import ringlet

__all__ = ["torch_arguments"]


def torch_arguments(
    *,
    device_ids: Any,
    output_device: Any,
    delay_all_reduce_named_params: Any,
    param_to_hook_all_reduce: Any,
    mixed_precision: Any,
    bucket_cap_mb_list: Any,
    skip_all_reduce_unused_params: bool,
    device_mesh: Any,
    process_group: Any,
    comm: ringlet.Communicator | None,
    bucket_cap_mb: float | None,
    first_bucket_cap_mb: float,
    direct_mb: float,
) -> tuple[Any, float]:
    """``(process_group, bucket_cap_mb)`` after torch's defaults; ValueError for what is refused."""
    refuse_cuda("device_ids", device_ids)
    refuse_cuda("output_device", output_device)
    for name, value in (
        ("delay_all_reduce_named_params", delay_all_reduce_named_params),
        ("param_to_hook_all_reduce", param_to_hook_all_reduce),
        ("mixed_precision", mixed_precision),
        ("bucket_cap_mb_list", bucket_cap_mb_list),
        ("skip_all_reduce_unused_params", skip_all_reduce_unused_params or None),
    ):
        if value is not None:
            raise ValueError(
                f"ringlet's DistributedDataParallel does not support {name}=; for "
                "reduced-precision gradients pass comm_hook=bf16_compress_hook or "
                "register torch's fp16/bf16 compress hooks with register_comm_hook"
            )
    if device_mesh is not None:
        if process_group is not None or device_mesh.ndim != 1:
            raise ValueError(
                "device_mesh= must be a 1-D DeviceMesh, and not given with process_group="
            )
        process_group = device_mesh.get_group()
    if process_group is not None and comm is not None:
        raise ValueError("pass process_group= (a torch group) or comm= (ringlet), not both")
    bucket_cap_mb = 25.0 if bucket_cap_mb is None else bucket_cap_mb
    if bucket_cap_mb <= 0 or first_bucket_cap_mb <= 0 or direct_mb <= 0:
        raise ValueError(
            f"bucket_cap_mb, first_bucket_cap_mb and direct_mb must be > 0, got "
            f"{bucket_cap_mb}, {first_bucket_cap_mb} and {direct_mb}"
        )
    return process_group, bucket_cap_mb


def refuse_cuda(name: str, value: Any) -> None:
    """device_ids / output_device: torch's, for CUDA modules; a CPU module takes None."""
    if value is None or value == [] or str(value) == "cpu" or value == [torch.device("cpu")]:
        return
    raise ValueError(
        f"ringlet's DistributedDataParallel runs CPU modules: {name}={value!r} is for CUDA "
        f"modules in torch; pass {name}=None"
    )
