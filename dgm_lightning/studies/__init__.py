"""Strategy studies on Optuna: a study file names a base recipe, the axes to vary, seeds, budget and metric;
workers on one machine or many run its trials as ordinary train.py jobs; the report ranks the configurations."""

from dgm_lightning.studies.study import Axis, Study, load_study, study_names

__all__ = ["Axis", "Study", "load_study", "study_names"]
