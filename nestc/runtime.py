"""Load generated code and build what it defines; small helpers the generated code calls."""

from __future__ import annotations

import functools
import hashlib
import linecache
import re
import sys
import types
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

from nestc import env
from nestc.check import Checked
from nestc.errors import NestError, StepDivisionError

BACKENDS = ("auto", "fused", "generic", "compiled", "triton")
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "triton" and not _has_triton():
        raise ValueError("backend='triton' needs triton: pip install triton (or nestc[triton])")
    return backend


def backend_of(group: dict[str, Any]) -> str:
    """auto: torch's fused kernel where the compiler recognized one, else generic; fused: the
    same, but an error where no kernel can run; generic: the generated foreach code always;
    compiled: the per-tensor code fused by torch.compile. NESTC_OPTIM_BACKEND overrides."""
    return check_backend(env.OPTIM_BACKEND) if env.OPTIM_BACKEND else group.get("backend", "auto")


@functools.cache
def compiled(fn: Callable[..., Any], count: int = 0) -> Callable[..., Any]:
    """fn compiled for lists of `count` tensors, in a code object of its own: torch.compile
    keeps at most 8 graphs per code object (torch._dynamo.config.recompile_limit) and guards
    each on the lists' lengths, so with one for all counts the ninth raised
    FailOnRecompileLimitHit (fullgraph=True)."""
    own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__,
                             fn.__defaults__, fn.__closure__)
    graph = torch.compile(own, dynamic=True, fullgraph=True)
    given_up = False

    def call(*args: Any) -> Any:
        # past the limit (hyperparameters that change every step, as a scheduler cycling
        # betas, are constants of each graph; so are ranks and dtypes), the step runs as
        # plain code: it raised FailOnRecompileLimitHit at the ninth
        nonlocal given_up
        if not given_up:
            try:
                return graph(*args)
            except torch._dynamo.exc.FailOnRecompileLimitHit:  # noqa: SLF001
                given_up = True
                limit = torch._dynamo.config.recompile_limit  # noqa: SLF001
                warnings.warn(f"nestc: torch.compile gave up on {fn.__name__} after {limit} "
                              "graphs (hyperparameters that change from step to step, such as "
                              "cycled betas, or other ranks and dtypes); it runs uncompiled",
                              RuntimeWarning, stacklevel=3)
        return own(*args)

    return call


def use_compiled(group: dict[str, Any], grads: list[torch.Tensor]) -> bool:
    """Whether torch.compile runs this group's step: backend='compiled', dense grads (dynamo
    does not take sparse tensors: the generic code runs them, as torch.optim's SGD does)."""
    return backend_of(group) == "compiled" and not any(g.is_sparse for g in grads)


def assign(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src) in the code torch.compile traces: a 0-d dst through a view of one
    element, as inductor (torch 2.13, CPU) dropped a copy_ into a 0-d float64 input (a scalar
    float64 param took wrong steps)."""
    (dst.view(1) if dst.dim() == 0 else dst).copy_(src)


def nest_div(a: Any, b: Any) -> Any:
    """a / b as a spec's constant arithmetic divides: an int where ints divide evenly."""
    q = a / b
    exact = isinstance(a, int) and isinstance(b, int) and not isinstance(a, bool) and a % b == 0
    return int(q) if exact else q


# torch.optim options whose value here changes nothing: a key that a param group (or a
# torch.optim checkpoint) sets to another value asks for what a compiled optimizer without
# that hyperparameter does not do (`maximize`, `amsgrad`, ...), so it is refused
_ANY = object()
NEUTRAL_OPTIONS: dict[str, Any] = {
    "maximize": False, "amsgrad": False, "differentiable": False, "nesterov": False,
    "momentum": 0, "dampening": 0, "weight_decay": 0, "decoupled_weight_decay": False,
    "foreach": _ANY, "fused": _ANY, "capturable": _ANY}


@functools.cache
def torch_options() -> frozenset[str]:
    """The keyword arguments of torch.optim's optimizers (the keys of their param groups)."""
    import inspect

    names: set[str] = set()
    for cls in vars(torch.optim).values():
        if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and \
                cls is not torch.optim.Optimizer:
            names |= set(inspect.signature(cls.__init__).parameters) - {"self", "params"}
    return frozenset(names)


def _foreign_options(opt: torch.optim.Optimizer, group: dict[str, Any]) -> str | None:
    """The first key of a param group that torch.optim knows, that is not a hyperparameter of
    the compiled optimizer, with a value that asks for something it does not do."""
    own = set(getattr(opt, "HYPERPARAMETERS", ())) | {"params", "backend"}
    neutral = {**NEUTRAL_OPTIONS, **getattr(opt, "TORCH_OPTIONS", {})}
    for key, value in group.items():
        if key in own or key not in torch_options():
            continue
        want = neutral.get(key)
        if key == "decoupled_weight_decay" and not group.get("weight_decay"):
            continue  # (the two are the same without weight decay)
        if key not in neutral or (want is not _ANY and not _same(value, want)):
            return key
    return None


def _same(value: Any, want: Any) -> bool:
    try:
        return bool(value == want) and type(value) is not str
    except (RuntimeError, TypeError):  # (a tensor of several values)
        return False


def param_group(opt: torch.optim.Optimizer, group: dict[str, Any]) -> dict[str, Any]:
    """A param group as a compiled optimizer takes it (its add_param_group): a hyperparameter
    given as None (torch.optim's word for its default: Muon's adjust_lr_fn) takes the
    optimizer's default; a torch.optim option it does not have, set to a value that would
    change the update (`maximize=True`, `amsgrad=True`), is a ValueError, not ignored; and
    where the declaration is known (built by nestc), the group's hyperparameters are
    validated and its `require`s checked, as build's are (a tensor's value, such as a tensor
    lr, is not checked)."""
    name = type(opt).__name__
    if not isinstance(group, dict):
        return group  # (torch's own error)
    group = _nones(opt, group)
    key = _foreign_options(opt, group)
    if key is not None:
        have = ", ".join(getattr(opt, "HYPERPARAMETERS", ())) or "none"
        raise ValueError(f"{name}: the param group sets `{key}` = {group[key]!r}, which torch.optim "
                         f"knows but this optimizer does not have (its hyperparameters: {have})")
    _validate(opt, {**opt.defaults, **group})
    return group


def _nones(opt: torch.optim.Optimizer, group: dict[str, Any]) -> dict[str, Any]:
    """The group with None, torch.optim's word for its default (Muon's adjust_lr_fn), in place
    of a hyperparameter's value replaced by the optimizer's own default."""
    own = getattr(opt, "HYPERPARAMETERS", ())
    if not any(group.get(k, 0) is None and k in opt.defaults for k in own):
        return group
    return {k: opt.defaults[k] if v is None and k in own and k in opt.defaults else v
            for k, v in group.items()}


def _validate(opt: torch.optim.Optimizer, group: dict[str, Any]) -> None:
    """A group's hyperparameters bound as build binds them (NestError), where the compiled
    optimizer's declaration is known; a tensor's value is not checked."""
    checked = getattr(type(opt), "_nest_checked", None)
    if checked is not None:
        checked.bind({k: v for k, v in group.items()
                      if k in checked.hypers and not isinstance(v, torch.Tensor)})


def from_torch(opt: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """A state dict for a compiled optimizer's load_state_dict: torch.optim's names of the
    states it keeps (TORCH_STATE: `exp_avg` -> Adam's `m`) renamed to its memories, so a
    torch.optim checkpoint goes on as it would in torch. Its groups are taken as new groups
    are (param_group): a hyperparameter they lack, or give as None, is the optimizer's own
    value; an option it does not have, set to a value that would change the update, is a
    ValueError; and the hyperparameters are validated. Each group keeps this optimizer's back
    end."""
    # (a hyperparameter that torch.optim does not have, such as Muon's ns_dtype, takes the
    # optimizer's own value)
    groups = [_nones(opt, {**{k: opt.defaults[k] for k in getattr(opt, "HYPERPARAMETERS", ())
                               if k in opt.defaults}, **g})
              for g in state_dict.get("param_groups", ())]
    # the back end is this process's choice, not the checkpoint's (a generic run's checkpoint
    # switched an optimizer built with backend='fused' to generic; a torch.optim one's, which
    # has none, switched backend='compiled' to auto)
    for i, group in enumerate(groups):
        group["backend"] = (opt.param_groups[i] if i < len(opt.param_groups)
                            else opt.defaults)["backend"]
        key = _foreign_options(opt, group)
        if key is not None:
            raise ValueError(f"{type(opt).__name__}: the state dict's param group sets `{key}` "
                             f"= {group[key]!r}, which this optimizer does not do")
        _validate(opt, group)
    state_dict = {**state_dict, "param_groups": groups}
    names = getattr(opt, "TORCH_STATE", {})
    if not names:
        return state_dict
    state = {}
    for pid, s in state_dict.get("state", {}).items():
        s = dict(s)
        for theirs, ours in names.items():
            if theirs in s and ours not in s:
                s[ours] = s.pop(theirs)
        state[pid] = s
    return {**state_dict, "state": state}


def match_layouts(opt: torch.optim.Optimizer) -> None:
    """Each state of a param's shape laid out as the param is (after load_state_dict, which
    keeps a checkpoint's strides: torch's fused kernels and ours index a state as the param,
    and a channels_last state on a contiguous param took a wrong step)."""
    for p, state in opt.state.items():
        for key, t in state.items():
            if isinstance(t, torch.Tensor) and t.shape == p.shape and t.stride() != p.stride():
                state[key] = torch.empty_like(p, dtype=t.dtype).copy_(t)


def use_fused(group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor]) -> bool:
    """Whether torch's fused kernel runs this group (else the generic code does)."""
    backend = backend_of(group)
    if backend in ("generic", "compiled", "triton"):
        return False
    # (torch's fused kernels walk a parameter and its gradient as if laid out alike: a
    # transposed parameter with a contiguous gradient got a wrong update)
    ok = all(plain(p, g) and p.device.type in ("cpu", "cuda") and p.dtype in FUSED_DTYPES
             and not p.is_sparse and not g.is_sparse and g.dtype == p.dtype
             and g.device == p.device and same_layout(p, g) for p, g in zip(params, grads))
    if backend == "fused" and not ok:
        raise RuntimeError("backend='fused' needs plain float tensors on CPU or CUDA with dense "
                           "grads laid out as their parameters")
    return ok


def same_layout(p: torch.Tensor, g: torch.Tensor) -> bool:
    """Whether g is laid out in memory as p is (a dim of size 1 has any stride)."""
    return all(a == b for a, b, n in zip(p.stride(), g.stride(), p.shape) if n > 1)


def plain(p: torch.Tensor, g: torch.Tensor) -> bool:
    """Whether a parameter and its gradient are ordinary tensors: a tensor subclass (FSDP's
    DTensor shards) has no fused or Triton kernel; the generic code's foreach ops take it."""
    return type(p) in (torch.Tensor, torch.nn.Parameter) and type(g) is torch.Tensor


_CPU = torch.device("cpu")


def steps(group: dict[str, Any], states: list[dict[str, Any]], params: list[torch.Tensor],
          fused: bool) -> list[torch.Tensor]:
    """Each tensor's step count, created at 0 or moved where it is read: on the tensor's
    device when a kernel reads it there (torch's fused kernels, torch.compile), else on the
    CPU, where the host reads it without waiting for the device (torch.optim does the same)."""
    on_device = fused or backend_of(group) == "compiled"
    out = []
    for p, s in zip(params, states):
        if p.is_complex():  # (g * g is not |g|^2: Adam's second moment went negative)
            raise ValueError("nestc optimizers take real parameters, got a complex one of shape "
                             f"{tuple(p.shape)}: torch.optim updates it as pairs of reals, which "
                             "nestc does not yet (torch.view_as_real gives that view)")
        want = p.device if on_device else _CPU
        step = s.get("step")
        if step is None:
            step = s["step"] = torch.zeros((), dtype=torch.float32, device=want)
        elif step.device != want:
            step = s["step"] = step.to(want)
        out.append(step)
    return out


@functools.cache
def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(group: dict[str, Any], params: list[torch.Tensor],
               grads: list[torch.Tensor]) -> bool:
    """Whether the generated Triton kernel runs this group: asked for with backend='triton',
    or by default for unrecognized updates on CUDA when triton is installed."""
    backend = backend_of(group)
    if backend not in ("triton", "auto") or not _has_triton():
        return False
    # the kernel computes in float32 over flat memory: other tensors take the generic code
    ok = all(plain(p, g) and p.is_contiguous() and g.is_contiguous() and not g.is_sparse and
             p.dtype in TRITON_DTYPES and g.dtype == p.dtype for p, g in zip(params, grads))
    return ok and (backend == "triton" or all(p.device.type == "cuda" for p in params))


@functools.cache
def triton_module(source: str) -> Any:
    """The generated Triton kernels, loaded once (Triton reads their source via linecache)."""
    return type("TritonKernels", (), _load(source, "triton"))


_ADDRESSES: dict[tuple[Any, ...], torch.Tensor] = {}  # address tables on the device, by content


def _tl_dtype(dtype: torch.dtype) -> Any:
    import triton.language as tl

    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


@functools.lru_cache(maxsize=64)
def _block_map(numels: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(2, blocks) int32: each program's tensor index and block index within that tensor."""
    tensor: list[int] = []
    block: list[int] = []
    for t, n in enumerate(numels):
        count = -(-n // env.TRITON_BLOCK)
        tensor += [t] * count
        block += range(count)
    return torch.tensor([tensor, block], dtype=torch.int32).to(device)


def _address_table(tensors: list[list[torch.Tensor]], device: torch.device) -> torch.Tensor:
    """(1 + rows, T) int64: the numels, then each row's data pointers. Kept on the device by
    content, so a step whose tensors sit where they sat before copies nothing to the device."""
    rows = [[p.numel() for p in tensors[0]], *([x.data_ptr() for x in row] for row in tensors)]
    key = (device, *map(tuple, rows))
    table = _ADDRESSES.get(key)
    if table is None:
        if len(_ADDRESSES) >= 256:  # grads that move every step: keep the cache bounded
            _ADDRESSES.clear()
        table = torch.tensor(rows, dtype=torch.int64).to(device)
        _ADDRESSES[key] = table
    return table


def launch_multi_tensor(kernel: Any, rows: list[list[torch.Tensor]],
                        numbers: list[tuple[float, ...]]) -> None:
    """Run a generated element-wise kernel over tensor lists (W, grad(W), memories...): one
    launch per set of tensors with equal scalar arguments, device and element types."""
    launches: dict[tuple[Any, ...], list[int]] = {}
    for j, p in enumerate(rows[0]):
        if p.numel():
            key = (numbers[j], p.device, *(row[j].dtype for row in rows))
            launches.setdefault(key, []).append(j)
    for (scalars, device, *dtypes), index in launches.items():
        tensors = [[row[j] for j in index] for row in rows]
        blocks = _block_map(tuple(p.numel() for p in tensors[0]), device)
        # arguments: tables, scalars, then the constexprs BLOCK and each row's element type
        kernel[(blocks.shape[1],)](_address_table(tensors, device), len(index), blocks,
                                   *scalars, env.TRITON_BLOCK, *map(_tl_dtype, dtypes),
                                   num_warps=4 if env.TRITON_BLOCK <= 1024 else 8)


def no_kernel(group: dict[str, Any]) -> None:
    """Called by variants no fused kernel computes: backend='fused' cannot run them."""
    if backend_of(group) == "fused":
        raise RuntimeError("backend='fused': no fused kernel computes this variant (nestc "
                           "explain shows the recognized ones); use backend='auto'")


def rows(p: torch.Tensor) -> int:
    """dim 0 of the matrix view (dim0, rest) an optimizer sees; 1 for a scalar."""
    return p.shape[0] if p.ndim else 1


def cols(p: torch.Tensor) -> int:
    """The product of the dims after the first; 1 for a vector or a scalar."""
    return p.numel() // rows(p) if p.numel() else 0


def split(params: list[torch.Tensor], pred: Callable[[torch.Tensor], bool]
          ) -> Iterable[tuple[list[torch.Tensor], bool]]:
    """(tensors where pred holds, True) and (the others, False), skipping empty parts."""
    yes = [p for p in params if pred(p)]
    no = [p for p in params if not pred(p)]
    if yes:
        yield yes, True
    if no:
        yield no, False


def newton_schulz(x: torch.Tensor, steps: int, eps: float, coefficients: tuple[float, ...],
                  dtype: str, where: str = "") -> torch.Tensor:
    """The shared Newton-Schulz routine, with an error that names the tensor and the spec line."""
    from nestc.ops import NS_DTYPES
    from nestc.ops.newton_schulz import newton_schulz as ns

    if dtype not in NS_DTYPES or len(coefficients) != 3:
        raise ValueError(f"{where}: error: newton_schulz runs in {', '.join(NS_DTYPES)} with "
                         f"three coefficients, got {dtype!r} and {coefficients!r}")
    if x.ndim < 2:
        raise ValueError(f"{where}: error: newton_schulz needs a matrix, but a parameter of shape "
                         f"{tuple(x.shape)} reached it; route it elsewhere with "
                         "`if ndim(W) < 2 { ... }`")
    return ns(x, steps, eps, coefficients, dtype)  # type: ignore[arg-type]


def _matrix(x: torch.Tensor, op: str, where: str) -> None:
    if x.ndim != 2:
        raise ValueError(f"{where}: error: `{op}` needs a matrix, but a parameter of shape "
                         f"{tuple(x.shape)} reached it; route it elsewhere with "
                         "`if ndim(W) == 2 { ... }`")


def matmul(a: torch.Tensor, b: torch.Tensor, where: str = "") -> torch.Tensor:
    """`a @ b` for one parameter's matrices, with an error that names shapes and the line."""
    _matrix(a, "@", where)
    _matrix(b, "@", where)
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"{where}: error: `@` of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    return a @ b


def transpose(x: torch.Tensor, where: str = "") -> torch.Tensor:
    _matrix(x, "transpose", where)
    return x.T


def check_period(period: Any, memory: str, where: str) -> None:
    if isinstance(period, bool) or not isinstance(period, int) or period < 1:
        raise ValueError(f"{where}: error: memory `{memory}` updates every {period!r} steps; "
                         "a period is a whole number of at least 1")


def partition_first(state: dict[Any, dict[str, Any]], params: list[torch.Tensor],
                    names: list[str]) -> Iterable[tuple[dict[str, bool], list[torch.Tensor]]]:
    """Group tensors by which of their `from` memories have no first write yet."""
    groups: dict[tuple[bool, ...], list[torch.Tensor]] = {}
    for p in params:
        key = tuple(n not in state[p] for n in names)
        groups.setdefault(key, []).append(p)
    for key, ps in groups.items():
        yield dict(zip(names, key)), ps


def param_index(opt: torch.optim.Optimizer, p: torch.Tensor) -> int:
    """p's position over the optimizer's param groups: the number its state_dict gives it."""
    params = (q for group in opt.param_groups for q in group["params"])
    return next(i for i, q in enumerate(params) if q is p)


def mlp_identity(opt: torch.optim.Optimizer, p: torch.Tensor, hidden: Any, seed: Any,
                 where: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """An MLP memory's first state (W1, W2) for p: m(x) = x, with W2 drawn from a generator
    seeded with seed + p's index in the optimizer (nestc/ops/residual_mlp.py)."""
    from nestc.ops.residual_mlp import identity_init

    if isinstance(hidden, bool) or not float(hidden).is_integer() or hidden < 1:
        raise ValueError(f"{where}: error: an MLP memory's width is a whole number of at least "
                         f"1, got {hidden!r}")
    return identity_init(cols(p), int(hidden), int(seed) + param_index(opt, p), p)


def _act(act: str, where: str) -> str:
    from nestc.ops.residual_mlp import ACTS

    if act not in ACTS:
        raise ValueError(f"{where}: error: an MLP memory's act is one of {', '.join(ACTS)}, "
                         f"got {act!r}")
    return act


def mlp_read(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, act: str,
             where: str = "") -> torch.Tensor:
    """m(x) for one parameter's MLP memory, on the rows of x's (dim0, rest) view."""
    from nestc.ops.residual_mlp import read

    return read(x, w1, w2, _act(act, where))


def mlp_learn(w1: torch.Tensor, w2: torch.Tensor, key: torch.Tensor, target: torch.Tensor,
              lr: Any, retain: Any, objective: str, act: str, where: str = ""
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """One gd step of one parameter's MLP memory: the new (W1, W2)."""
    from nestc.ops.residual_mlp import learn

    return learn(w1, w2, key, target, lr, retain, objective, _act(act, where))


def mlp_learn_(w1: torch.Tensor, w2: torch.Tensor, key: torch.Tensor, target: torch.Tensor,
               lr: Any, retain: Any, objective: str, act: str, where: str = "") -> None:
    """mlp_learn, written into W1 and W2 (both gradients are taken before either changes)."""
    new1, new2 = mlp_learn(w1, w2, key, target, lr, retain, objective, act, where)
    w1.copy_(new1)
    w2.copy_(new2)


def _load(source: str, label: str) -> dict[str, Any]:
    """Run generated source as a module; its namespace."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    filename = f"<nestc:{label}:{digest}>"
    # register the text so tracebacks, inspect.getsource and Triton's JIT see generated lines
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    # a module in sys.modules, as an imported one is: torch.compile looks its globals up there,
    # pickle its classes. Loaded once per process: a class of one source stays one class
    name = f"nestc_generated_{digest}"
    if name in sys.modules:
        return sys.modules[name].__dict__
    module = types.ModuleType(name)
    module.__file__ = filename
    exec(compile(source, filename, "exec"), module.__dict__)  # noqa: S102 - our generated code
    sys.modules[name] = module
    return module.__dict__


_SPEC_COMMENT = re.compile(r"\s*# (.+?:\d+):(?: (.*))?")  # nestc.codegen.torch.spec_comment
_MORE_COMMENT = re.compile(r"\s*#     (.*)")


def division_error(err: ZeroDivisionError, name: str) -> StepDivisionError:
    """The error of a generated optimizer's step whose number arithmetic divided by zero (a
    divisor of `step()`, of the param's shape, or of hyperparameters given at build; the
    defaults' are a check-time error). Where the division is in the code of a statement (the
    foreach code; not a Triton launch's numbers, nor a variant's condition), it names that
    statement's spec line: the nearest `# file:line: text` comment above the generated line,
    within its function. A `let` is computed in the statements that read it."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:  # the frame that divided
        tb = tb.tb_next
    where, text = "", ""
    lines = [] if tb is None else linecache.getlines(tb.tb_frame.f_code.co_filename)
    if tb is not None and lines and lines[0].startswith("# Generated by nestc"):
        for i in range(tb.tb_lineno - 1, -1, -1):
            if lines[i].lstrip().startswith("def "):
                break
            if m := _SPEC_COMMENT.fullmatch(lines[i].rstrip("\n")):
                # its text: on the line, and on the comment lines below (a long one wrapped)
                more = [m[2] or ""]
                for line in lines[i + 1:]:
                    if not (c := _MORE_COMMENT.fullmatch(line.rstrip("\n"))):
                        break
                    more.append(c[1])
                where = f"{m[1]}: "
                text = "\n  computing: " + " ".join(t.strip() for t in more if t)
                break
    return StepDivisionError(
        f"{where}error: division by zero in a step of optimizer `{name}` ({err}): a divisor "
        f"of step(), of the param's shape or of the hyperparameters is 0 here{text}")


@functools.lru_cache(maxsize=128)
def _exec(source: str, name: str) -> Any:
    return _load(source, name)[name]


def optimizer_class(checked: Checked) -> type[torch.optim.Optimizer]:
    """The generated torch.optim.Optimizer subclass of an optimizer declaration (cached)."""
    from nestc.codegen.torch import class_name
    from nestc.compile import generate

    # from the declaration itself: it may come from another file than the program's
    cls = _exec(generate(checked), class_name(checked.name))
    cls._nest_checked = checked  # (param_group checks its groups against it)
    return cls


def build_optimizer(checked: Checked, params: Any = None, *args: Any,
                    **kwargs: Any) -> torch.optim.Optimizer:
    from nestc.codegen.torch import py_name

    if params is None:
        raise NestError(f"building optimizer `{checked.name}` needs the parameters: "
                        f"build({checked.name!r}, model.parameters(), ...)",
                        checked.decl.name_span, kind="value")
    if args:
        raise TypeError("hyperparameters are passed by keyword: build(name, params, lr=...)")
    backend = check_backend(kwargs.pop("backend", "auto"))
    hyper = checked.bind(kwargs)
    cls = optimizer_class(checked)
    return cls(params, **{py_name(k): v for k, v in hyper.items()},  # type: ignore[call-arg]
               backend=backend)
