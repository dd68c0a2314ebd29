"""Experiment loggers (``logger=[csv,tensorboard,mlflow,wandb]``): each sends a finished run, its config, its
training history, its final figures and its files, to one tracking tool. ``csv`` is the run's own files."""
