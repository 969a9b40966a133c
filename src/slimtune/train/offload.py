"""AdamW with its moments in CPU memory, streamed to the device one parameter at a time.

QLoRA (Dettmers et al., 2023, sec. 3) pages optimizer states out of GPU memory so that a long batch's
memory spike does not run the GPU out of memory. Here the states simply live on the host: the fp32
moments m, v (8 bytes per trained parameter; 2 with `AdamW8bit`) sit in CPU memory, pinned when the
parameters are on a CUDA device so the copies are asynchronous DMA. Per parameter and step:

    m_d, v_d = m, v copied to the parameter's device               (host -> device, non-blocking)
    t += 1;  p, m_d, v_d = AdamW(p, g, m_d, v_d, t)                  (torch's fused AdamW kernel)
    m, v     = m_d, v_d copied back                                 (device -> host, non-blocking)

so the device holds the moments of one parameter at a time. Copies and kernels queue on one stream
in order, so a copy back never races the next step's copy in; the step ends with one synchronisation,
so the host copies are complete before anything on the CPU reads them (a checkpoint).

The update is `torch._fused_adamw_`, the kernel `torch.optim.AdamW(fused=True)` runs, called per
parameter; its arithmetic is elementwise, so the result equals AdamW(fused=True) bit for bit
(`tests/train/test_offload.py`, on CPU, where the copies are real copies too).
"""

from __future__ import annotations

import torch


def to_host(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A CPU copy of `tensor`, in pinned memory when `like` (the parameter) is on a CUDA device."""
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=like.device.type == "cuda")
    return host.copy_(tensor, non_blocking=True)  # complete once the stream reaches it: see `synchronize`


def synchronize(params: list[torch.Tensor]) -> None:
    """Wait for queued copies on every CUDA device among `params` (host buffers are then complete)."""
    for device in {p.device for p in params if p.device.type == "cuda"}:
        torch.cuda.synchronize(device)


class OffloadedAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, fp32 math) with host-resident moments; see the module docstring."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        if lr <= 0 or eps <= 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or weight_decay < 0:
            raise ValueError(f"invalid OffloadedAdamW settings: lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        touched: list[torch.Tensor] = []
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    # As AdamW(fused=True): the step count a float32 scalar on the parameter's device,
                    # the moments in the parameter's dtype.
                    state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
                    state["exp_avg"] = to_host(torch.zeros_like(param), param)
                    state["exp_avg_sq"] = to_host(torch.zeros_like(param), param)
                exp_avg = state["exp_avg"].to(param.device, non_blocking=True, copy=True)
                exp_avg_sq = state["exp_avg_sq"].to(param.device, non_blocking=True, copy=True)
                state["step"] += 1
                torch._fused_adamw_([param], [param.grad], [exp_avg], [exp_avg_sq], [], [state["step"]],
                                    amsgrad=False, lr=group["lr"], beta1=beta1, beta2=beta2,
                                    weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
                state["exp_avg"].copy_(exp_avg, non_blocking=True)
                state["exp_avg_sq"].copy_(exp_avg_sq, non_blocking=True)
                touched.append(param)
        synchronize(touched)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        # torch's loader moves every state tensor to its parameter's device: put the moments back on the
        # host and the step count on the device, where `step` expects them.
        super().load_state_dict(state_dict)
        for param, state in self.state.items():
            for name in ("exp_avg", "exp_avg_sq"):
                if name in state:
                    state[name] = to_host(state[name].to(param.dtype), param)
            if "step" in state:
                state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(param.device)

    def device_state_bytes(self) -> int:
        """Bytes of optimizer state held on accelerators between steps (the step counts only)."""
        return sum(t.numel() * t.element_size() for s in self.state.values() for t in s.values()
                   if torch.is_tensor(t) and t.device.type != "cpu")
