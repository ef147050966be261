"""Adam, as ``torch.optim.Adam`` computes it (``amsgrad=False``, ``maximize=False``), for one tile of a flat
fp32 parameter buffer: called from the weight-gradient kernel's epilogue (the gradient never reaches
memory) or from the split-K sum kernel when the batch is split.

    g = g + weight_decay * p                      (L2, as torch.optim.Adam, not AdamW)
    m = m + (1 - beta1) (g - m)                   (torch: exp_avg.lerp_(g, 1 - beta1))
    v = beta2 v + (1 - beta2) g^2
    p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

The hyper-parameters live in a float64 device tensor [lr, beta1, beta2, eps, weight_decay] (written by the
engine between steps, read inside a replayed CUDA graph); the bias corrections are computed in float64 as
torch does in Python, then rounded to fp32. ``t`` is the device step counter (fp32, torch's ``state['step']``)
already advanced for this step by the first kernel of the step.
"""

import triton
import triton.language as tl

# Index of each hyper-parameter in the float64 hyper tensor.
HYPER_LR = tl.constexpr(0)
HYPER_BETA1 = tl.constexpr(1)
HYPER_BETA2 = tl.constexpr(2)
HYPER_EPS = tl.constexpr(3)
HYPER_WEIGHT_DECAY = tl.constexpr(4)
HYPER_SIZE = 5


@triton.jit
def adam_scalars(
    hyper_ptr,  # float64 [lr, beta1, beta2, eps, weight_decay]
    step_ptr,  # () fp32 step count t (>= 1)
):
    """Per-step scalars, computed once per program: (step_size, sqrt(bias_correction2), 1 - beta1, beta2,
    1 - beta2, eps, weight_decay), fp32. The bias corrections are float64 as torch computes them in Python."""
    lr = tl.load(hyper_ptr + HYPER_LR)
    beta1 = tl.load(hyper_ptr + HYPER_BETA1)
    beta2 = tl.load(hyper_ptr + HYPER_BETA2)
    t = tl.load(step_ptr).to(tl.float64)
    bc1 = 1.0 - tl.exp(t * tl.log(beta1))
    bc2 = 1.0 - tl.exp(t * tl.log(beta2))
    step_size = (lr / bc1).to(tl.float32)
    bc2_sqrt = tl.sqrt(bc2).to(tl.float32)  # fp64 sqrt is correctly rounded
    one_m_b1 = (1.0 - beta1).to(tl.float32)
    one_m_b2 = (1.0 - beta2).to(tl.float32)
    eps = tl.load(hyper_ptr + HYPER_EPS).to(tl.float32)
    wd = tl.load(hyper_ptr + HYPER_WEIGHT_DECAY).to(tl.float32)
    return step_size, bc2_sqrt, one_m_b1, beta2.to(tl.float32), one_m_b2, eps, wd


@triton.jit
def adam_apply(
    p_ptr,  # flat fp32 parameters
    m_ptr,  # flat fp32 first moments
    v_ptr,  # flat fp32 second moments
    lowp_ptr,  # flat bf16 copy of the parameters the kernels read (WRITE_LOWP); None otherwise
    offs,  # offsets of this tile in the flat buffers (any shape)
    mask,  # which of them exist
    g,  # fp32 gradient tile, the shape of offs
    step_size,  # the scalars of adam_scalars
    bc2_sqrt,
    one_m_b1,
    beta2,
    one_m_b2,
    eps,
    wd,
    WRITE_LOWP: tl.constexpr,
):
    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    g = g + wd * p
    m = m + one_m_b1 * (g - m)
    v = v * beta2 + one_m_b2 * g * g
    # IEEE-rounded sqrt and division (Triton's plain ones are approximate on the GPU), as torch computes
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p - tl.div_rn(step_size * m, denom)
    tl.store(p_ptr + offs, p, mask=mask)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    if WRITE_LOWP:
        tl.store(lowp_ptr + offs, p.to(lowp_ptr.dtype.element_ty), mask=mask)
