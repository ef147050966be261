"""fastvae.export: ONNX export of a trained decoder and a torch-free CPU sampler (from the repo's export/)."""
