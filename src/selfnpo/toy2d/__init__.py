"""An exact 2-D world: a class-conditional Gaussian mixture, an MLP denoiser, exact metrics."""
