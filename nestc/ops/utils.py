"""Shared by the ops: input checks, the chunked layout, callable op packages, the backward of
a kernel that is differentiated again."""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Callable
from typing import Any, TypeVar

import torch

# None picks "chunked" until a Triton back end exists
BACKENDS = (None, "chunked", "naive", "triton")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


F = TypeVar("F", bound=Callable[..., Any])


def float32_inside(fn: F) -> F:
    """fn run with autocast off on its first tensor's device: a recurrence accumulates in
    float32 (or float64) whatever autocast would make of its matmuls (on the CPU it would also
    reach a triangular solve that has no bfloat16 kernel)."""
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        x = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if x is None or not torch.is_autocast_enabled(x.device.type):
            return fn(*args, **kwargs)
        with torch.autocast(x.device.type, enabled=False):
            return fn(*args, **kwargs)
    return run  # type: ignore[return-value]


def _shape(x: torch.Tensor) -> str:
    return str(list(x.shape))


def check_delta_rule_inputs(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            beta: torch.Tensor, g: torch.Tensor | None,
                            initial_state: torch.Tensor | None, scale: float | None,
                            chunk_size: int, backend: str | None) -> None:
    """Raise ValueError naming the argument that does not fit the [B, T, H, D] layout."""
    named = {"q": q, "k": k, "v": v, "beta": beta}
    if g is not None:
        named["g"] = g
    if initial_state is not None:
        named["initial_state"] = initial_state
    for name, x in named.items():
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{op}: {name} must be float32, bfloat16, float16 or float64, "
                             f"got {x.dtype}")
    want_ndim = {"q": 4, "k": 4, "v": 4, "beta": 3, "g": 3, "initial_state": 4}
    layout = {"q": "[B, T, H, K]", "k": "[B, T, H, K]", "v": "[B, T, H, V]", "beta": "[B, T, H]",
              "g": "[B, T, H]", "initial_state": "[B, H, K, V]"}
    for name, x in named.items():
        if x.ndim != want_ndim[name]:
            raise ValueError(f"{op}: {name} must have shape {layout[name]} ({want_ndim[name]} "
                             f"dims), got {_shape(x)}")
    if k.shape != q.shape:
        raise ValueError(f"{op}: q and k must have the same shape [B, T, H, K], "
                         f"got q {_shape(q)} and k {_shape(k)}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    if K == 0:
        raise ValueError(f"{op}: q and k need at least one feature (K >= 1), got K = 0")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{op}: v must have shape [B, T, H, V] = [{B}, {T}, {H}, V] like q, "
                         f"got {_shape(v)}")
    for name in ("beta", "g"):
        if name in named and named[name].shape != q.shape[:3]:
            raise ValueError(f"{op}: {name} must have shape [B, T, H] = [{B}, {T}, {H}], "
                             f"got {_shape(named[name])}")
    if initial_state is not None and tuple(initial_state.shape) != (B, H, K, V):
        raise ValueError(f"{op}: initial_state must have shape [B, H, K, V] = "
                         f"[{B}, {H}, {K}, {V}], got {_shape(initial_state)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{op}: q, k and v must share one dtype, "
                         f"got {q.dtype}, {k.dtype} and {v.dtype}")
    devices = {x.device for x in named.values()}
    if len(devices) > 1:
        raise ValueError(f"{op}: all inputs must be on one device, got "
                         + ", ".join(f"{n} on {x.device}" for n, x in named.items()))
    if scale is not None and not isinstance(scale, (int, float)):
        raise ValueError(f"{op}: scale must be a number or None, got {type(scale).__name__}")
    if (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 16
            or chunk_size & (chunk_size - 1)):
        raise ValueError(f"{op}: chunk_size must be a power of two >= 16 (16, 32, 64, ...), "
                         f"got {chunk_size!r}")
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; use None, 'chunked', 'naive' "
                         "or 'triton'")


# the lowest log retention the ops take: a factor below 1e-30 forgets as 0 does, and an
# exp(-inf) would make the chunk forms' differences of running sums -inf - -inf = NaN
MIN_LOG_RETAIN = -69.07755278982137  # log(1e-30), as nestc.memories takes retentions


def log_factors(factors: torch.Tensor) -> torch.Tensor:
    """log of per-token factors, a factor below 1e-30 taken as 1e-30 (0 forgets all), with
    the gradient of the log at that value (a clamp would pass none: a factor of exactly 0 had
    a gradient of 0, where W_t = r_t W_{t-1} + ... has W_{t-1} times the output's)."""
    return (factors + (factors.clamp_min(1e-30) - factors).detach()).log()


def span_sums(logs: torch.Tensor) -> torch.Tensor:
    """Per-token logs (..., n) -> (..., n, n): [t, s] the sum of logs_j over s < j <= t (0
    where t <= s). Each is a sum of its own terms (a running sum over t of the logs after s),
    not a difference of running sums: the gradient at a log then collects only terms that
    hold it, where the difference's cancelled terms of size 1 up to float32's rounding, which
    the division by a small factor magnified (70% of a retention's gradient at 1e-5, and its
    sign at 1e-8; the literal DGD's solve: 3 to 27% at 1e-5 and 3e-6)."""
    i = torch.arange(logs.shape[-1], device=logs.device)
    return torch.where(i[:, None] > i[None, :], logs[..., :, None], 0.0).cumsum(-2)


def accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for 16- and 32-bit inputs, float64 for float64 ones."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def make_callable(module_name: str, fn: Callable[..., Any]) -> None:
    """Let the package `module_name` be called as `fn`.

    `nestc.ops.delta_rule` names both a package and its function: whichever import comes first
    binds the attribute on `nestc.ops`, so the package forwards calls to keep both spellings valid.
    """

    class CallableModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs)

    sys.modules[module_name].__class__ = CallableModule


def clipped(sq: torch.Tensor, clip: float) -> torch.Tensor:
    """The factor that scales a gradient of squared norm sq to norm at most clip:
    clip / max(norm, clip), with no square root at 0."""
    return clip * torch.rsqrt(sq.clamp_min(clip ** 2))


def upto(end: int, T: int) -> int:
    """min(end, T) for a length T that torch.compile may hold as a symbol: a comparison (a
    guard on it) leaves a number or T itself, where a Min(T, ...) in the shapes after it made
    inductor fail ("Exponent must be non-negative") once a second length was compiled."""
    return end if end < T else T


def time_masks(size: int, group: int, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(earlier, upto), (size, size) bool, for a chunk whose tokens come `group` at a time
    (one time step of a state shared by `group` sequences, ordered time-major): token j is
    earlier than token i when its time step is, and up to i when not later. With group 1
    they are the strict and the inclusive lower triangle."""
    step = torch.arange(size, device=device) // group
    return step[:, None] > step[None], step[:, None] >= step[None]


def to_chunks(x: torch.Tensor, chunk_size: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, T, H, D) -> (N, B*H, C, D) in `dtype`, T zero-padded up to N*C (a zero key, value,
    beta and log retention leave the state as it is, so padding needs no mask)."""
    B, T, H, D = x.shape
    N = -(-T // chunk_size)
    x = x.to(dtype)
    if N * chunk_size != T:
        x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, N * chunk_size - T))
    x = x.reshape(B, N, chunk_size, H, D).permute(1, 0, 3, 2, 4)
    return x.reshape(N, B * H, chunk_size, D)


def from_chunks(x: torch.Tensor, B: int, T: int, H: int) -> torch.Tensor:
    """(N, B*H, C, D) or (N*B*H, C, D) -> (B, T, H, D), contiguous, dropping the padding."""
    C, D = x.shape[-2:]
    x = x.view(-1, B, H, C, D).permute(1, 0, 3, 2, 4).reshape(B, -1, H, D)
    return x[:, :T].contiguous()


def dot_precision(dtype: torch.dtype) -> str:
    """The Triton kernels' tl.dot input_precision for inputs of `dtype`: float32 keeps about
    float32 products by TF32x3 (hi*hi + hi*lo + lo*hi on tensor cores; IEEE float32 dots
    compile to FMA loops that spill heavily on sm_90, docs/triton.md); TF32 holds 16-bit
    inputs exactly and rounds float32 intermediates no coarser than those inputs already
    are."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def recomputed_vjp(forward: Callable[..., tuple[torch.Tensor | None, ...]],
                   inputs: tuple[torch.Tensor | None, ...],
                   grads: tuple[torch.Tensor | None, ...]) -> list[torch.Tensor | None]:
    """The gradients at `inputs` of forward(*inputs)'s outputs times `grads`, through the
    PyTorch ops forward runs, as a graph (create_graph): the backward of a Triton kernel when
    the backward is itself differentiated (autograd.grad(..., create_graph=True), as a model
    with memories that learn from the task loss takes their gradients). The kernels' backward
    ops have no backward of their own; this recomputes the forward on the chunked tier
    instead. None for an input that is None or needs no gradient.

    forward gets each input as a fresh alias (a view in the graph): the gradient at one input
    is then what flows into that argument alone, as a backward returns it, not the total
    derivative through every argument computed from it (v = f(k), or q and k one tensor),
    which autograd would add again on its way back to k."""
    aliases = [x.view_as(x) if x is not None and x.requires_grad else x for x in inputs]
    wanted = [x for x in aliases if x is not None and x.requires_grad]
    if not wanted:
        return [None] * len(inputs)
    with torch.enable_grad():
        outs = forward(*aliases)
    pairs = [(o, g) for o, g in zip(outs, grads)
             if o is not None and g is not None and o.requires_grad]
    got = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                   create_graph=True, allow_unused=True) if pairs
               else [None] * len(wanted))
    return [next(got) if x is not None and x.requires_grad else None for x in aliases]


def mend_interpreter() -> None:
    """Make the Triton interpreter take a kernel's scalar argument as a loop bound with any
    NumPy. Triton 3.6's interpreter holds a scalar as an array of one element and turns it
    into a Python int with int(array), which NumPy deprecates from 1.25 (a warning, an error
    where warnings are errors) and refuses from 2.4, so `for i in range(N)` stops every
    kernel. Later Triton squeezes the array first; this does the same for the versions that
    do not, through the interpreter's own patch scope (undone after each launch, as Triton's
    own attributes are). Idempotent; a no-op where the interpreter's layout is not the one
    known."""
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "mended", False):
        return

    def mended(tensor: Any, scope: Any) -> None:
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    mended.mended = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = mended
