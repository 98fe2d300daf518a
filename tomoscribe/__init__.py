"""tomoscribe: draft radiology reports from CT and MR studies.

The core package: DICOM series to volume, series selection, the model,
phantoms and training, report objects and the DICOM SR / SEG builders.
It never imports ``holoscan`` or Orthanc's ``orthanc`` module.
"""

__version__ = "0.8.0"

#: Manufacturer written into every object we create; the Orthanc plugin uses it
#: (with :data:`SOFTWARE_NAME`) to recognise and skip its own outputs.
MANUFACTURER = "tomoscribe"
SOFTWARE_NAME = "tomoscribe"
