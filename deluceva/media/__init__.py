"""Video in: decoding files and streams through FFmpeg (PyAV), and turning an RGB frame into a
model input (`Preprocessor`)."""
