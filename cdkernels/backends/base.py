"""The kernel interface every backend implements.

The Python ops (``cdkernels/cd_step.py`` ...) validate arguments, allocate outputs, lay tensors
out densely and then call these methods with **flat 1-D contiguous tensors**. A backend only
computes; it never allocates user-visible outputs, never checks user input and never records
autograd. The noise every method uses is the stream of ``docs/noise.md``.

Shared argument conventions
---------------------------
seed        int64 tensor of shape [1] on the data's device: the Philox key (two's-complement bits).
            Kernels read it from memory, never on the host, so CUDA-graph replays see new seeds.
offset      int, the stream's block offset (64-bit, >= 0).
sample      int, the counter's word 2 (32-bit, >= 0).
sigma       float32 contiguous tensor of shape [C] (per channel; C = 1 for a learnable scalar),
            or None, in which case ``sigma_value`` (a Python float) is used for every element.
C, chan_stride
            element at flat position p uses sigma[(p // chan_stride) % C].
act         activation name: cd_step: "none" | "relu";
            cd_smooth: "relu" | "gelu" (exact, erf) | "tanh" | "sigmoid" | "softplus" (beta 1,
            computed stably as max(z,0) + log1p(exp(-|z|))).
grad_sigma  float32 tensor of shape [C], zero-filled by the caller; the kernel *adds* its
            per-channel sums into it (the caller applies any constant scale).
Data tensors are float32, float16 or bfloat16 (all of one call share a dtype); arithmetic is
float32; stores round to nearest even.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

Tensor = torch.Tensor


class Backend:
    name: str = "?"
    # True if the methods only use data_ptr()/numel() of their data tensors, so the ops may pass
    # contiguous N-d tensors instead of 1-D views (saves host time on tiny calls).
    accepts_contiguous_nd: bool = False

    # -- availability -------------------------------------------------------------------------
    def availability(self) -> Tuple[bool, str]:
        """(available, reason). The reason says why not, or what was found."""
        raise NotImplementedError

    def supports(self, device: torch.device) -> bool:
        """Whether this backend can run on tensors of ``device``."""
        raise NotImplementedError

    # -- noise stream -------------------------------------------------------------------------
    def philox_words(self, out: Tensor, seed: Tensor, offset: int, sample: int) -> None:
        """out: int32 [4*nb]; out[4*i + j] = word j of block (offset + i), as int32 bits."""
        raise NotImplementedError

    def uniform(self, out: Tensor, seed: Tensor, offset: int, sample: int) -> None:
        """out: float32 [n]; out[e] = U(word e%4 of block offset + e//4)."""
        raise NotImplementedError

    def normal(self, out: Tensor, seed: Tensor, offset: int, sample: int) -> None:
        """out: float32/float16/bfloat16 [n]; out[e] = normal lane e%4 of block offset + e//4."""
        raise NotImplementedError

    # -- cd_step: y = act(x + dt*f + s*sqrt(dt)*eps[p]) -----------------------------------------
    def cd_step_fwd(self, x: Tensor, f: Tensor, y: Tensor, dt: float, sigma: Optional[Tensor],
                    sigma_value: float, C: int, chan_stride: int, seed: Tensor, offset: int,
                    act: str) -> None:
        raise NotImplementedError

    def cd_step_bwd(self, grad_y: Tensor, y: Optional[Tensor], grad_x: Optional[Tensor],
                    grad_f: Optional[Tensor], grad_sigma: Optional[Tensor], dt: float,
                    sigma: Optional[Tensor], sigma_value: float, C: int, chan_stride: int,
                    seed: Tensor, offset: int, act: str) -> None:
        """gz = grad_y * (y > 0 if act == "relu" else 1)  (y is None when act == "none").
        grad_x = gz (if not None); grad_f = dt * gz (if not None);
        grad_sigma[c] += sum over elements of channel c of gz * eps[p]  (no sqrt(dt) factor)."""
        raise NotImplementedError

    def cd_step_bwd_sigma(self, grad_y: Tensor, y: Optional[Tensor], grad_x: Optional[Tensor],
                          grad_f: Optional[Tensor], n_sigma: int, gs_dtype: torch.dtype,
                          dt: float, sigma: Optional[Tensor], sigma_value: float, C: int,
                          chan_stride: int, seed: Tensor, offset: int, act: str) -> Tensor:
        """:meth:`cd_step_bwd` that also returns the finished sigma gradient, a new
        ``gs_dtype`` tensor of shape [n_sigma] = float32(sum) * float32(sqrt(dt)) (n_sigma = C).
        This default zero-fills, calls :meth:`cd_step_bwd` and scales; a backend may fold the
        zero-fill and the scale into its kernel (the CPU backend does) but must round the same
        way: the float32 sum, then one float32 multiply."""
        gs = torch.zeros(n_sigma, dtype=gs_dtype, device=grad_y.device)
        self.cd_step_bwd(grad_y, y, grad_x, grad_f, gs, dt, sigma, sigma_value, C, chan_stride,
                         seed, offset, act)
        return gs.mul_(math.sqrt(dt))

    # -- std-scaled step (EnResNet noise): z = x + dt*f -----------------------------------------
    def z_stats(self, x: Tensor, f: Tensor, dt: float, out: Tensor) -> None:
        """out: float64 [2] on the data's device = (mean(z), std(z)), std unbiased (nan for one
        element), z = x + dt*f evaluated in float32 (float64 for float64 data). One read of x
        and f. This default is PyTorch code that runs anywhere; native backends override it."""
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        z = x.to(cdt) + dt * f.to(cdt)
        # sums in float64 around z[0]: no cancellation when |mean| >> std
        d = (z - z[:1]).to(torch.float64)
        n = d.numel()
        s1, s2 = d.sum(), (d * d).sum()
        out[0] = z[0].to(torch.float64) + s1 / n
        out[1] = ((s2 - s1 * s1 / n).clamp_min(0) / (n - 1)).sqrt() if n > 1 else float("nan")

    def z_std_bwd(self, x: Tensor, f: Tensor, grad_y: Optional[Tensor], dt: float,
                  coefs: Tensor, grad_x: Tensor, grad_f: Optional[Tensor]) -> None:
        """coefs: float64 [3] on the device = (mean, a, b). grad_x = grad_y + a*(z - mean) + b
        (grad_y None: 0), grad_f = dt*grad_x (if not None); arithmetic in float32 (float64 for
        float64 data), coefficients rounded to it first."""
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        c = coefs.to(cdt)
        z = x.to(cdt) + dt * f.to(cdt)
        g = c[1] * (z - c[0]) + c[2]
        if grad_y is not None:
            g = grad_y.to(cdt) + g
        grad_x.copy_(g)
        if grad_f is not None:
            grad_f.copy_(dt * g)

    # -- cd_smooth: y = (1/K) sum_k act(x + s*eps_k[p]), eps_k = stream (seed, offset, k) ---------
    def cd_smooth_fwd(self, x: Tensor, y: Tensor, sigma: Optional[Tensor], sigma_value: float,
                      C: int, chan_stride: int, samples: int, seed: Tensor, offset: int,
                      act: str) -> None:
        raise NotImplementedError

    def cd_smooth_bwd(self, grad_y: Tensor, x: Tensor, grad_x: Tensor,
                      grad_sigma: Optional[Tensor], sigma: Optional[Tensor], sigma_value: float,
                      C: int, chan_stride: int, samples: int, seed: Tensor, offset: int,
                      act: str) -> None:
        """grad_x = g * (1/K) sum_k act'(z_k);
        grad_sigma[c] += sum over channel c of g * (1/K) sum_k act'(z_k) * eps_k[p]."""
        raise NotImplementedError

    # -- ensemble_mean over K replicas ---------------------------------------------------------
    def ensemble_mean_fwd(self, inp: Tensor, out: Tensor, space: str) -> None:
        """inp: [K, B, C] contiguous; out: [B, C] contiguous, same dtype.
        prob:    out = (1/K) sum_k softmax(inp[k])
        logit:   out = (1/K) sum_k inp[k]
        logprob: out = log((1/K) sum_k softmax(inp[k])), computed stably (log-sum-exp)."""
        raise NotImplementedError

    def ensemble_mean_bwd(self, grad_out: Tensor, inp: Tensor, out: Tensor, grad_in: Tensor,
                          space: str) -> None:
        """grad_in [K, B, C] = d(sum grad_out * out) / d inp; float32 accumulation.
        For 16-bit inputs ``out`` is rounded to 16 bits: logprob must recompute log(mean p) in
        float32 rather than use it (10 % gradient errors otherwise)."""
        raise NotImplementedError
