"""One video played through the plans: the setup (`setup`), the frame loop with its controller and
reference frames (`loop`), a learned controller trained on the first frames and the PI's starting
range (`calibration`), a run from first frame to summary (`job`) and outputs written as it goes
(`recorder`)."""
