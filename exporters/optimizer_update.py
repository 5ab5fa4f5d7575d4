"""The optimizer update as torch ops, traced into the train-step graph: the one copy of the optimizer maths.

Each function mirrors torch.optim's single-tensor implementation op for op, so that the exported step equals
`torch.optim.SGD` / `torch.optim.AdamW` + `clip_grad_norm_` to float32 rounding. `step` is the 1-based number of
the step being taken and arrives as a float32 tensor, so the bias corrections are computed in the graph.
"""

from __future__ import annotations

import torch

from device_runtime.optim_spec import SGD, AdamW, OptimizerSpec

__all__ = ["global_grad_norm", "clip_gradients", "apply_update", "optimizer_step"]


def global_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all gradients together, as clip_grad_norm_ computes it (norm of per-tensor norms)."""
    per_tensor = torch.stack([torch.linalg.vector_norm(g) for g in grads])
    return torch.linalg.vector_norm(per_tensor)


def clip_gradients(grads: list[torch.Tensor], total_norm: torch.Tensor, max_norm: float) -> list[torch.Tensor]:
    # clip_grad_norm_ always multiplies by the clamped coefficient, also when it is 1.
    coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    return [g * coef for g in grads]


def _sgd(spec: SGD, params, grads, state, step, lr):
    new_params, new_bufs = [], []
    bufs = state.get("momentum_buffer", [None] * len(params))
    for p, g, buf in zip(params, grads, bufs):
        if spec.weight_decay:
            g = g + spec.weight_decay * p
        if spec.momentum:
            running = spec.momentum * buf + (1.0 - spec.dampening) * g
            # torch.optim.SGD starts the buffer as a copy of the first gradient (no dampening on step 1).
            buf = torch.where(step == 1.0, g, running)
            new_bufs.append(buf)
            g = g + spec.momentum * buf if spec.nesterov else buf
        new_params.append(p - lr * g)
    return new_params, ({"momentum_buffer": new_bufs} if spec.momentum else {})


def _adamw(spec: AdamW, params, grads, state, step, lr):
    beta1, beta2 = spec.betas
    new_params, new_m, new_v = [], [], []
    bias_correction1 = 1.0 - torch.pow(torch.full_like(step, beta1), step)
    bias_correction2_sqrt = torch.sqrt(1.0 - torch.pow(torch.full_like(step, beta2), step))
    for p, g, m, v in zip(params, grads, state["exp_avg"], state["exp_avg_sq"]):
        p = p * (1.0 - lr * spec.weight_decay)
        m = m + (g - m) * (1.0 - beta1)  # torch: exp_avg.lerp_(grad, 1 - beta1)
        v = v * beta2 + (g * g) * (1.0 - beta2)
        denom = torch.sqrt(v) / bias_correction2_sqrt + spec.eps
        p = p - (lr / bias_correction1) * (m / denom)
        new_params.append(p)
        new_m.append(m)
        new_v.append(v)
    return new_params, {"exp_avg": new_m, "exp_avg_sq": new_v}


def apply_update(
    spec: OptimizerSpec,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    state: dict[str, list[torch.Tensor]],
    step: torch.Tensor,
    lr: torch.Tensor,
) -> tuple[list[torch.Tensor], dict[str, list[torch.Tensor]]]:
    """One optimizer step; `state` maps a state kind (e.g. "exp_avg") to one tensor per parameter."""
    if isinstance(spec, AdamW):
        return _adamw(spec, params, grads, state, step, lr)
    if isinstance(spec, SGD):
        return _sgd(spec, params, grads, state, step, lr)
    raise TypeError(f"unsupported optimizer spec {spec!r}; use device_runtime.optim_spec.SGD or AdamW")


def optimizer_step(
    spec: OptimizerSpec,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    flat_state: list[torch.Tensor],
    step: torch.Tensor,
    lr: torch.Tensor,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Everything a train step does after the backward: global grad norm, clipping if the spec asks, the update.

    `flat_state` is in the bundle's order (kind-major, then parameter, as `spec.state_names`). Returns
    (grad norm before clipping, new params, new flat state). Both exporters (ONNX train step, ExecuTorch
    optimizer program) trace this one function.
    """
    norm = global_grad_norm(grads)
    if spec.max_grad_norm is not None:
        grads = clip_gradients(grads, norm, spec.max_grad_norm)
    n = len(params)
    state_by_kind = {kind: list(flat_state[i * n : (i + 1) * n]) for i, kind in enumerate(spec.state_kinds)}
    new_params, new_state = apply_update(spec, list(params), list(grads), state_by_kind, step, lr)
    return norm, new_params, [t for kind in spec.state_kinds for t in new_state[kind]]
