"""Running a model over a video: the setup (`setup`), the frame loop with its controller and
reference frames (`loop`), how a run starts (`calibration`), outputs written as it goes
(`recorder`), and the comparison with plain onnxruntime and frame skipping (`compare`)."""
