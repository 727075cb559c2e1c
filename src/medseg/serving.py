"""The old home of `medseg.deployment.serving`, kept for one reason: a model version registered before the
package regroup (2026-12) pickled its pyfunc class as `medseg.serving.MedsegSegmenter`, and MLflow unpickles it by
that name. New registrations pickle the new name."""

from medseg.deployment.serving import MedsegSegmenter  # noqa: F401
