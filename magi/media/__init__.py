"""Media in and out of MAGI-1, one module per seam: ``read`` (probe, images, videos, the v2v
prefix), ``latents`` (frames <-> VAE latents) and ``mp4`` (the streaming writer, stream-copy joins)."""
