"""crosssite: contrastive cross-site learning for chest-CT COVID-19 classification.

Implements Wang, Liu, Dou, "Contrastive Cross-site Learning with Redesigned Net for COVID-19 CT
Classification", IEEE JBHI 2020, on data pooled from several hospitals ("sites").
"""

__version__ = "0.1.0"
