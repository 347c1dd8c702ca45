"""Calibration statistics of one Linear input, gathered once in a block-by-block pass.

Every method that needs calibration reads what it needs from one :class:`InputStats`:

- GPTQ: ``hessian()`` = 2 X Xᵀ / n (the Hessian of the layer-wise squared error).
- AWQ: ``mean_abs()`` (per-channel mean |x|, the paper's s_X) and ``second_moment()``
  (X Xᵀ / n), with which the output error of any candidate weight is exact, no tokens kept.
- SmoothQuant: ``absmax()`` (per-channel max |x|) and ``samples`` (a bounded set of input
  rows, because per-token activation rounding is not a quadratic form).

Linears that share an input (q/k/v, gate/up) share one ``InputStats``. X Xᵀ is a
:class:`OuterSum`: the rows themselves while there are no more of them than inputs (an 8B
model's ``down_proj`` on 512 tokens: 29 MB of rows instead of a 1.6 GB matrix, and products with
it 28 times cheaper), the matrix beyond that (each batch's product in float32, summed in float64).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

PLANNER_SAMPLES = 1024  # input rows the planner keeps per Linear (SmoothQuant's search, activation error)
PLANNER_STRIDE = 8  # every 8th row of each batch, so 1024 rows span 16 windows of 512 tokens


def weighted_gram(rows: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ_t w_t x_t x_tᵀ`` over the rows ``x_t`` of ``[t, in]`` (``w_t`` = 1 when no weights), in ``rows``' dtype."""
    return (rows if weights is None else rows * weights.unsqueeze(1)).T @ rows


class OuterSum:
    """``Σ_t x_t x_tᵀ`` over rows ``x_t`` of width ``width``, kept as the rows while they number
    at most ``width``, then as the float64 matrix: never more memory than the matrix, and every
    product with it no dearer. Rows and each batch's product are in ``dtype`` (float32 for the
    methods' X Xᵀ, float64 for the profile's Fisher-weighted H); batches sum in float64."""

    def __init__(self, width: int, dtype: torch.dtype = torch.float32):
        self.width = width
        self.dtype = dtype
        self.count = 0
        self.rows: list[torch.Tensor] = []
        self.gram: torch.Tensor | None = None

    def add(self, rows: torch.Tensor) -> None:
        """Add the rows of ``rows`` ``[t, width]`` (already weighted where a weight applies)."""
        rows = rows.detach().to(self.dtype)
        self.count += rows.shape[0]
        if self.gram is None and self.count <= self.width:
            self.rows.append(rows.clone())
            return
        self._become_matrix()
        self.gram += weighted_gram(rows).to(torch.float64)

    def _become_matrix(self) -> None:
        if self.gram is None:
            self.gram = torch.zeros(self.width, self.width, dtype=torch.float64)
            kept, self.rows = self.rows, []
            for earlier in kept:
                self.gram += weighted_gram(earlier).to(torch.float64)

    def merge(self, other: "OuterSum") -> None:
        """Add another sum into this one (e.g. another worker's)."""
        for rows in other.rows:
            self.add(rows)
        if other.gram is not None:
            self._become_matrix()
            self.gram += other.gram
            self.count += other.count

    def matrix(self) -> torch.Tensor:
        """The sum as a float32 ``[width, width]`` matrix, made on each call and not kept."""
        if self.gram is not None:
            return self.gram.to(torch.float32)
        if not self.rows:
            return torch.zeros(self.width, self.width)
        stacked = torch.cat(self.rows)
        return (stacked.T @ stacked).to(torch.float32)

    def diagonal(self) -> torch.Tensor:
        """``Σ_t x_t²`` per input, float64, without forming the matrix."""
        if self.gram is not None:
            return torch.diagonal(self.gram).clone()
        if not self.rows:
            return torch.zeros(self.width, dtype=torch.float64)
        return sum(rows.to(torch.float64).pow(2).sum(0) for rows in self.rows)

    def quadratic(self, delta: torch.Tensor) -> torch.Tensor:
        """``(Δ S Δᵀ)_cc`` for each row ``c`` of ``delta`` ``[rows, width]``, float64: from the rows,
        ``Σ_t (Δ_c · x_t)²``, without forming the matrix."""
        if self.gram is not None:
            delta = delta.to(torch.float32)
            return ((delta @ self.gram.to(torch.float32)) * delta).sum(1).to(torch.float64)
        if not self.rows:
            return torch.zeros(delta.shape[0], dtype=torch.float64)
        return (delta.to(self.dtype) @ torch.cat(self.rows).T).to(torch.float64).pow(2).sum(1)

    @property
    def nbytes(self) -> int:
        return sum(r.numel() * r.element_size() for r in self.rows) + (0 if self.gram is None else self.gram.numel() * 8)


def planner_stats(in_features: int) -> "InputStats":
    """The accumulator profile, emit and evaluation all use, so they keep the same sample rows."""
    return InputStats(in_features, max_samples=PLANNER_SAMPLES, sample_stride=PLANNER_STRIDE)


@dataclass
class InputStats:
    """Running statistics of the rows ``x`` (``[tokens, in_features]``) fed to a Linear.

    ``max_samples`` bounds the rows kept in ``samples``; rows are kept with a fixed stride
    decided per batch (every k-th row) until the budget is full, so the sample spans the text.
    """

    in_features: int
    max_samples: int = 4096
    sample_stride: int = 4
    count: int = 0
    gram: OuterSum = field(default=None)  # sum of x xᵀ
    abs_sum: torch.Tensor = field(default=None)  # sum of |x|, float64 [in]
    abs_max: torch.Tensor = field(default=None)  # max |x|, float32 [in]
    sample_rows: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.gram is None:
            self.gram = OuterSum(self.in_features)
        if self.abs_sum is None:
            self.abs_sum = torch.zeros(self.in_features, dtype=torch.float64)
        if self.abs_max is None:
            self.abs_max = torch.zeros(self.in_features, dtype=torch.float32)

    def add(self, x: torch.Tensor) -> None:
        """Accumulate a batch of inputs of any leading shape ``[..., in_features]``."""
        rows = x.detach().reshape(-1, self.in_features)
        rows32 = rows.to(torch.float32)
        self.gram.add(rows32)
        self.abs_sum += rows32.abs().sum(dim=0, dtype=torch.float64)
        self.abs_max = torch.maximum(self.abs_max, rows.abs().amax(dim=0).to(torch.float32))
        self.count += rows.shape[0]
        kept = sum(r.shape[0] for r in self.sample_rows)
        if kept < self.max_samples:
            take = rows[:: self.sample_stride][: self.max_samples - kept]
            self.sample_rows.append(take.to(torch.float32).clone())

    def merge(self, other: "InputStats") -> None:
        """Add another accumulator's statistics into this one (e.g. from another worker)."""
        assert other.in_features == self.in_features
        self.gram.merge(other.gram)
        self.abs_sum += other.abs_sum
        self.abs_max = torch.maximum(self.abs_max, other.abs_max)
        self.count += other.count
        room = self.max_samples - sum(r.shape[0] for r in self.sample_rows)
        for rows in other.sample_rows:
            if room <= 0:
                break
            self.sample_rows.append(rows[:room])
            room -= rows[:room].shape[0]

    def _require_data(self) -> None:
        assert self.count > 0, "no calibration rows were accumulated"

    def second_moment(self) -> torch.Tensor:
        """X Xᵀ / n, float32 ``[in, in]``: ‖ΔW X‖² / n = tr(ΔW · this · ΔWᵀ)."""
        self._require_data()
        return self.gram.matrix().div_(self.count)  # in place: one [in, in] matrix, not three

    def second_moment_diagonal(self) -> torch.Tensor:
        """diag(X Xᵀ) / n, float32 ``[in]`` (ggml's importance matrix), without the matrix."""
        self._require_data()
        return (self.gram.diagonal() / self.count).to(torch.float32)

    def hessian(self) -> torch.Tensor:
        """GPTQ's H = 2 X Xᵀ / n, float32 ``[in, in]``."""
        return self.second_moment().mul_(2.0)

    def mean_abs(self) -> torch.Tensor:
        """Per-channel mean |x| over all tokens, float32 ``[in]`` (AWQ's s_X)."""
        self._require_data()
        return (self.abs_sum / self.count).to(torch.float32)

    def absmax(self) -> torch.Tensor:
        """Per-channel max |x| over all tokens, float32 ``[in]`` (SmoothQuant's max|X_j|)."""
        self._require_data()
        return self.abs_max.clone()

    @property
    def samples(self) -> torch.Tensor:
        """The kept input rows, float32 ``[k, in]`` with ``k <= max_samples``."""
        self._require_data()
        return torch.cat(self.sample_rows, dim=0)


def relative_output_error(weight: torch.Tensor, approx: torch.Tensor, second_moment: torch.Tensor) -> float:
    """‖W X − Ŵ X‖ / ‖W X‖ computed exactly from ``second_moment`` = X Xᵀ / n.

    Both norms are Frobenius over all tokens; the 1/n cancels. float64 inside.
    """
    m = second_moment.to(torch.float64)
    delta = (weight.to(torch.float64) - approx.to(torch.float64))
    ref = weight.to(torch.float64)
    num = ((delta @ m) * delta).sum()
    den = ((ref @ m) * ref).sum()
    return float(torch.sqrt(num.clamp_min(0.0) / den))


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the last Linear of interest has run."""


def collect_input_stats(
    model: torch.nn.Module,
    token_batches: list[torch.Tensor],
    linear_names: list[str],
    stop_after: str | None = None,
    max_samples: int = 4096,
    sample_stride: int = 4,
) -> dict[str, InputStats]:
    """Run ``token_batches`` (each ``[batch, seq]`` ids) through ``model`` and gather the input
    statistics of each named Linear; Linears with the identical input tensor share one object.

    A plain full-precision pass (every Linear sees unquantized inputs). ``stop_after`` names a
    module after whose forward the pass stops, so statistics of early blocks cost early blocks.
    """
    modules = dict(model.named_modules())
    stats: dict[str, InputStats] = {}
    seen: dict[int, tuple[torch.Tensor, InputStats]] = {}
    handles = []

    def hook_for(name: str):
        def hook(module, args):
            x = args[0]
            key = id(x)  # the tensor is kept in ``seen`` for the pass, so its id cannot be reused
            if key not in seen:
                target = stats[name] if name in stats else InputStats(x.shape[-1], max_samples=max_samples, sample_stride=sample_stride)
                seen[key] = (x, target)
                target.add(x)
            stats.setdefault(name, seen[key][1])
        return hook

    def stop(module, args, output):
        raise _StopForward

    try:
        for name in linear_names:
            handles.append(modules[name].register_forward_pre_hook(hook_for(name)))
        if stop_after is not None:
            handles.append(modules[stop_after].register_forward_hook(stop))
        with torch.no_grad():
            for batch in token_batches:
                seen.clear()
                try:
                    model(batch)
                except _StopForward:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    return stats
