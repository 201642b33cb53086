"""The DVC stage scripts: one per dvc.yaml stage, each `python -m stages.<name>`."""
