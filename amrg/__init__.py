"""amrg: AM-MRG chest X-ray report generation (associative memory + LLM) as a reproducible pipeline.

Library only: nothing in this package imports DVC or Prefect. Stages (``stages/``) glue it to
``dvc.yaml``; flows (``flows/``) drive the stages.
"""

__version__ = "0.1.0"
