"""Per-device memory and compute planning: `plan(model, ...)` says what one process of a
training run holds (parameters, gradients, optimizer state, FSDP buffers, activations),
whether it fits a device, the largest batch that does, and the FLOPs and time of a step."""

from vitscale.plan.activations import activation_bytes
from vitscale.plan.planner import DEVICES, Plan, parse_memory, peak_flops, plan
from vitscale.plan.states import model_state

__all__ = ["DEVICES", "Plan", "activation_bytes", "model_state", "parse_memory", "peak_flops",
           "plan"]
