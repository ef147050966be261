"""Activation functions and their derivatives written in terms of the activation's *output*, so the
backward never needs the pre-activation: relu'(y) = [y > 0], tanh'(y) = 1 - y^2."""

import triton
import triton.language as tl

ACT_NONE = 0
ACT_RELU = 1
ACT_TANH = 2
ACT_CODES = {"none": ACT_NONE, "relu": ACT_RELU, "tanh": ACT_TANH}


@triton.jit
def apply_act(x, ACT: tl.constexpr):
    if ACT == 1:
        x = tl.maximum(x, 0.0)
    elif ACT == 2:
        # tanh(x) = 1 - 2 / (exp(2x) + 1): exact limits at +-inf, no tanh intrinsic needed (the
        # interpreter and Triton 3.6-3.9 agree on exp).
        x = 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)
    return x


@triton.jit
def act_grad_from_output(y, ACT: tl.constexpr):
    if ACT == 1:
        g = (y > 0.0).to(tl.float32)
    elif ACT == 2:
        g = 1.0 - y * y
    else:
        g = tl.full(y.shape, 1.0, tl.float32)
    return g
