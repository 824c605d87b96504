"""Loss landscapes: 1-D/2-D loss surfaces (:mod:`.surfaces`), flatness metrics (:mod:`.metrics`) on the loss of
a fixed evaluation set (:mod:`.objective`), and the per-run measurement of an experiment (:mod:`.measure`).

Command line: ``forgetless landscape`` (see ``forgetless landscape --help``); figures:
:mod:`forgetless.reporting.landscape_plots` and :mod:`forgetless.reporting.flatness`.
"""

from forgetless.landscape.measure import LandscapeSettings, measure_flatness
from forgetless.landscape.metrics import (
    SURFACE_METRICS,
    eps_sharpness,
    hessian_dominant_eigenvalue,
    hessian_eigenvalues,
    hessian_lanczos,
    hessian_top_eigenvalue,
    hessian_vector_product,
    hutchinson_trace,
    hutchinson_trace_estimate,
    surface_metrics,
)
from forgetless.landscape.objective import Objective, model_objective, select_parameters
from forgetless.landscape.surfaces import (
    Surface,
    compute_surface,
    load_surface,
    loss_surface,
    random_direction,
    save_surface,
)

__all__ = ["SURFACE_METRICS", "LandscapeSettings", "Objective", "Surface", "compute_surface", "eps_sharpness",
           "hessian_dominant_eigenvalue", "hessian_eigenvalues", "hessian_lanczos", "hessian_top_eigenvalue",
           "hessian_vector_product", "hutchinson_trace", "hutchinson_trace_estimate", "load_surface", "loss_surface",
           "measure_flatness", "model_objective", "random_direction", "save_surface", "select_parameters",
           "surface_metrics"]
