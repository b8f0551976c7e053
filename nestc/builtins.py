"""The builtin functions of the language: their arity, keywords and category. No torch here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Builtin:
    name: str
    min_args: int
    max_args: int | None  # None: any number
    kwargs: tuple[str, ...]
    category: str  # math, layer, structure, init, objective, rule, signal, reduce
    doc: str


def _b(name: str, lo: int, hi: int | None, kw: str, cat: str, doc: str) -> Builtin:
    return Builtin(name, lo, hi, tuple(kw.split()) if kw else (), cat, doc)


BUILTINS: dict[str, Builtin] = {b.name: b for b in [
    # element-wise and tensor math
    _b("sqrt", 1, 1, "", "math", "element-wise square root"),
    _b("abs", 1, 1, "", "math", "element-wise absolute value"),
    _b("exp", 1, 1, "", "math", "element-wise exponential"),
    _b("log", 1, 1, "", "math", "element-wise natural logarithm"),
    _b("sign", 1, 1, "", "math", "element-wise sign"),
    _b("tanh", 1, 1, "", "math", "hyperbolic tangent"),
    _b("silu", 1, 1, "", "math", "x * sigmoid(x)"),
    _b("gelu", 1, 1, "", "math", "Gaussian error linear unit"),
    _b("relu", 1, 1, "", "math", "max(x, 0)"),
    _b("sigmoid", 1, 1, "", "math", "1 / (1 + exp(-x))"),
    _b("softplus", 1, 1, "beta", "math", "log(1 + exp(x))"),
    _b("min", 2, 2, "", "math", "element-wise minimum"),
    _b("max", 2, 2, "", "math", "element-wise maximum"),
    _b("clamp", 1, 1, "lo hi", "math", "clamp into [lo, hi]"),
    _b("lerp", 3, 3, "", "math", "a + w * (b - a)"),
    _b("l2norm", 1, 1, "per eps", "math", "divide by the L2 norm of the last dim (per head)"),
    _b("outer", 2, 2, "", "math", "outer product a b^T"),
    _b("transpose", 1, 1, "", "math", "swap the last two dims"),
    _b("norm", 1, 1, "", "reduce", "Frobenius norm"),
    _b("mean", 1, 1, "dim per", "reduce", "mean; `per = heads`: one mean per head's slice"),
    _b("sum", 1, 1, "dim", "reduce", "sum; over a chunk when given a per-token signal in a slower level"),
    _b("newton_schulz", 1, 1, "steps eps coefficients dtype", "math",
       "Muon's quintic Newton-Schulz orthogonalization"),
    _b("debias", 2, 2, "", "math", "m / (1 - beta ** step): Adam's bias correction"),
    _b("softmax", 1, 1, "dim", "math", "softmax over the last dim"),
    _b("concat", 1, None, "dim", "math", "concatenate along the last dim"),
    _b("where", 3, 3, "", "math", "element-wise select"),
    _b("stop_grad", 1, 1, "", "math", "the value with no gradient flowing back (a fixed target)"),
    # signals
    _b("grad", 1, 1, "", "signal", "the gradient of the outer loss with respect to a parameter"),
    _b("next", 1, 1, "", "signal", "the sequence shifted by one: next-token targets"),
    _b("step", 0, 0, "", "signal", "the number of updates of the enclosing level so far"),
    # the shape of a parameter, as numbers (an optimizer's matrix view is (dim0, the rest))
    _b("ndim", 1, 1, "", "shape", "the number of dimensions of a parameter"),
    _b("rows", 1, 1, "", "shape", "dim 0 of a parameter (1 for a scalar)"),
    _b("cols", 1, 1, "", "shape", "the product of the other dims (1 for a vector)"),
    _b("numel", 1, 1, "", "shape", "the number of elements of a parameter"),
    # layers: each owns parameters trained by the outer level
    _b("linear", 2, 2, "bias", "layer", "a linear projection to `out` features"),
    _b("conv1d", 1, 1, "window causal", "layer", "depthwise causal convolution over time"),
    _b("embed", 3, 3, "", "layer", "token embedding table"),
    _b("rmsnorm", 1, 1, "eps", "layer", "RMS normalization with a learned scale"),
    _b("layernorm", 1, 1, "eps", "layer", "layer normalization"),
    _b("softmax_attention", 2, 3, "causal heads window rope", "layer",
       "softmax attention of queries over a `cache` memory (q, C) or over keys and values "
       "(q, k, v); rotary positions unless rope = false"),
    _b("cross_entropy", 2, 2, "", "objective", "mean cross-entropy of logits against targets"),
    # memory structures
    _b("matrix", 2, 2, "", "structure", "a linear memory M: R^a -> R^b"),
    _b("mlp", 1, 1, "hidden depth act", "structure",
       "an MLP memory R^d -> R^d; hidden = width of its hidden layers"),
    _b("residual_mlp", 1, 1, "hidden act", "structure",
       "x + W1 act(W2 x) on R^d (Hope, Titans); hidden = width of W2's output"),
    _b("like", 1, 1, "", "structure", "a state shaped like a parameter (optimizer memories)"),
    _b("cache", 0, 0, "", "structure", "softmax attention's key/value cache"),
    # initial states
    _b("zeros", 0, 0, "", "init", "all zeros"),
    _b("zeros_like", 1, 1, "", "init", "zeros shaped like a parameter"),
    _b("ones_like", 1, 1, "", "init", "ones shaped like a parameter"),
    _b("meta", 0, 0, "", "init", "meta-learned by the outer level"),
    _b("identity", 0, 0, "seed", "init",
       "the identity map; an MLP memory's W2 is drawn with `seed` (default 0)"),
    _b("from", 1, 1, "", "init", "the first write stores its value as it is"),
    # objectives
    _b("l2", 2, 2, "", "objective", "1/2 ||pred - target||^2"),
    _b("dot", 2, 2, "", "objective", "-<pred, target>"),
    _b("huber", 2, 2, "delta", "objective", "Huber loss"),
    _b("task", 0, 0, "", "objective", "the enclosing model's loss"),
    # learning rules
    _b("gd", 0, 0, "lr retain clip", "rule",
       "state <- retain * state - lr * grad(objective)"),
    _b("dgd", 0, 0, "lr retain beta clip", "rule",
       "delta gradient descent (PAPER.md sec. 2); beta: Titans' momentum on its gradient"),
    _b("momentum", 0, 0, "lr beta retain clip", "rule",
       "Titans: S <- beta S - lr grad; M <- retain M + S"),
]}
