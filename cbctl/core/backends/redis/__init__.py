"""Redis: the lane queue and the fencing guard."""
