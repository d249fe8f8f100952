"""crosssite: contrastive cross-site learning for chest-CT COVID-19 classification.

Implements Wang, Liu, Dou, "Contrastive Cross-site Learning with Redesigned Net for COVID-19 CT
Classification", IEEE JBHI 2020, on data pooled from several hospitals ("sites").
"""

__version__ = "0.1.0"

__all__ = ["Predictor", "__version__"]


def __getattr__(name: str):
    # `crosssite.Predictor` without importing torch for `import crosssite` alone.
    if name == "Predictor":
        from crosssite.inference import Predictor

        return Predictor
    raise AttributeError(f"module 'crosssite' has no attribute {name!r}")
