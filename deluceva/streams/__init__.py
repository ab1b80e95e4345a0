"""Many videos at once: a pool of worker processes (`pool`) or of Ray actors (`on_ray`), each
stream played as `deluceva.playback` plays one, faults kept in their stream."""
