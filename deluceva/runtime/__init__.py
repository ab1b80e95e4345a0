"""The engine: the executor that runs a physical plan (dense segments in onnxruntime, delta steps
in the operators), its dense/delta boundaries, the filter thresholds and the copy tails."""
