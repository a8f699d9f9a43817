"""PF-SR: conditional diffusion super-resolution with probability-flow sampling.

The core (config, diffusion, models, sampling, losses, degradation, metrics, train) imports no Ray;
`pfsr.pipeline` holds the Ray edges (Data, Train, Serve, Tune).
"""
__version__ = "0.1.0"


def upscale(image, checkpoint=None, sampler=None, **kwargs):
    """Super-resolve a PIL image or path; see `pfsr.inference.upscale`."""
    from .inference import upscale as _upscale

    return _upscale(image, checkpoint=checkpoint, sampler=sampler, **kwargs)


def sample(*args, **kwargs):
    """See `pfsr.sampling.sample`."""
    from .sampling import sample as _sample

    return _sample(*args, **kwargs)
