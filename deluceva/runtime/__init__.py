"""Running plans: the executor, its dense/delta boundaries, video input and preprocessing."""
