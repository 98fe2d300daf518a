"""DICOM in: find the series of a study, choose one, decode it into a volume.

Headers first, pixels second::

    index = scan_folder(folder)              # headers only, every series
    chosen = select_series(index, rules)     # one series, with reasons
    volume = load_series(chosen.chosen)      # pixels of that series only

``plan_geometry`` runs the loader's header-only geometry checks (selection
uses it, so the chosen series is one the loader can read). ``synth`` writes
small synthetic series for tests.
"""

from tomoscribe.dicomio.load import GeometryPlan, load_series, plan_geometry
from tomoscribe.dicomio.scan import SeriesInfo, StudyIndex, scan_folder
from tomoscribe.dicomio.select import (
    DEFAULT_RULES,
    IMAGE_SOP_CLASSES,
    RulesError,
    Selection,
    select_series,
)

__all__ = [
    "DEFAULT_RULES",
    "IMAGE_SOP_CLASSES",
    "GeometryPlan",
    "RulesError",
    "Selection",
    "SeriesInfo",
    "StudyIndex",
    "load_series",
    "plan_geometry",
    "scan_folder",
    "select_series",
]
