"""Measuring deluceva against what a user would otherwise run: plain onnxruntime timed frame by
frame with its peak memory (`baseline`), the comparison with frame skipping (`compare`), and many
streams' throughput (`streams`)."""
