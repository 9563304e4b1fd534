"""ml_collections config files for train.py / eval.py (`--config=configs/<name>.py`)."""
