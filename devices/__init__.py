"""Device profiles (data): RAM, flash read curve, cores, GPU."""
