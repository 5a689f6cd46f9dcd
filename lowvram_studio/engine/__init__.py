"""How a run fits in memory and time: sampler, precision, chunking, placement, decode."""
