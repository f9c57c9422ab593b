"""ZeRO-0 checkpoints: what their model-states file holds (read by the export), and the same in
DeepSpeed's universal layout, so that a run saved at ZeRO-0 (one GPU, say) can continue at ZeRO-1 or
2 on any number of ranks. DeepSpeed's own converter (ds_to_universal) reads
ZeRO 1-3 optimizer shards only; a ZeRO-0 checkpoint keeps the whole optimizer inside its model-states
file instead:

- fp32: the module's weights, and torch's AdamW state (per parameter ``step``, ``exp_avg``,
  ``exp_avg_sq``) under ``optimizer``;
- bf16: DeepSpeed's mixed-precision wrapper around the same AdamW, whose parameters are the fp32
  master weights (``fp32_groups``), its state under ``optimizer_state_dict``; the module holds bf16.

Either way each parameter's fp32 weight and AdamW moments are whole, in the order of the module's
parameters. The universal layout is one folder per parameter name under ``zero/`` with ``fp32.pt``,
``exp_avg.pt``, ``exp_avg_sq.pt`` (``{"cat_dim": 0, "param": tensor}``) and ``step.pt``; the optimizer's
global state in ``zero/optimizer_state.pt``; and the model-states file beside them, without its
optimizer. DeepSpeed's ZeRO-1/2 optimizer loads that with ``checkpoint.load_universal``, each rank
taking its partition.
"""
from __future__ import annotations

from pathlib import Path

import torch

from cotmi_ds.errors import UsageError

MODEL_STATES = "mp_rank_00_model_states.pt"


def distinct_parameters(states: dict) -> list[tuple[list[str], torch.Tensor]]:
    """Each distinct parameter of the saved module, in order, with all its names: tied names alias
    one tensor (torch.save keeps that), and DeepSpeed's fused bf16 optimizer makes the others views
    of one flat buffer, so a tensor is told apart by its address and size, not by its storage."""
    buffers = set(states.get("buffer_names") or ())
    out: dict[tuple[int, int], tuple[list[str], torch.Tensor]] = {}
    for name, tensor in states["module"].items():
        if name not in buffers:
            out.setdefault((tensor.data_ptr(), tensor.numel()), ([], tensor))[0].append(name)
    return list(out.values())


def bf16_masters(states: dict, what: str) -> list[torch.Tensor] | None:
    """The fp32 master weights of a bf16 save, one per distinct parameter in order (DeepSpeed keeps
    them as ``fp32_groups``, one tensor per parameter, or ``fp32_groups_flat``, one per group); None
    for an fp32 save, whose module weights are the masters."""
    groups = (states.get("optimizer") or {}).get("fp32_groups") or (states.get("optimizer") or {}).get("fp32_groups_flat")
    if groups is None:
        return None
    sizes = [t.numel() for _, t in distinct_parameters(states)]
    flat = torch.cat([t.reshape(-1) for group in groups for t in (group if isinstance(group, list) else [group])])
    if flat.numel() != sum(sizes):
        raise UsageError(f"{what}: its fp32 master weights do not line up with its parameters")
    return list(flat.split(sizes))


def write_universal(checkpoint: Path, out: Path) -> None:
    """Write ``out`` (a new folder) from the ZeRO-0 checkpoint folder ``checkpoint``."""
    from deepspeed import __version__ as ds_version

    where = f"--resume {checkpoint}"
    states = torch.load(checkpoint / MODEL_STATES, map_location="cpu", weights_only=True)
    params = distinct_parameters(states)
    optimizer = states.get("optimizer")
    if not isinstance(optimizer, dict):
        raise UsageError(f"{where}: holds no optimizer state to continue from")
    masters = bf16_masters(states, where) or [tensor for _, tensor in params]
    adam = optimizer.get("optimizer_state_dict", optimizer)  # bf16: the wrapper's AdamW; fp32: AdamW itself
    zero = out / "zero"
    for i, ((names, tensor), master) in enumerate(zip(params, masters)):
        state = adam["state"].get(i, {})
        for name in names:
            folder = zero / name
            folder.mkdir(parents=True)
            torch.save({"cat_dim": 0, "param": master.detach().float().view(tensor.shape).clone()}, folder / "fp32.pt")
            if name != names[0] or not state:  # moments once per parameter, under the name DeepSpeed uses
                continue
            for key in ("exp_avg", "exp_avg_sq"):
                torch.save({"cat_dim": 0, "param": state[key].float().view(tensor.shape).clone()}, folder / f"{key}.pt")
            torch.save(torch.as_tensor(state["step"], dtype=torch.float32), folder / "step.pt")
    clip = (states.get("ds_config") or {}).get("gradient_clipping", 0.0)
    torch.save({"clip_grad": clip, "ds_version": ds_version, "param_groups": adam["param_groups"]},
               zero / "optimizer_state.pt")
    torch.save({**states, "optimizer": None}, out / MODEL_STATES)
