"""fastvae.kernels: fused Triton kernels with hand-written backwards (installed from the repo's kernels/)."""
