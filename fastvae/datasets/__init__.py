"""Bundled data: MNIST (``mnist.npz``; CC BY-SA 3.0, Y. LeCun and C. Cortes; see README.md here)."""
