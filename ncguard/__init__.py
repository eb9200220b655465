"""ncguard: classifiers that report what they see and whether to trust it.

The `ncguard` package is the torch-free core: the NumPy reference of every formula
(scores, class statistics, calibration, neural-collapse metrics, OOD metrics, drift),
the data readers, the model bundle format and the command line.
"""

__version__ = "0.1.0"
