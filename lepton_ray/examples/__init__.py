"""Example user code for custom models, data, losses and loops (importable on every Ray
node because it ships inside the package). See ``jobs/digits_cnn.yaml``."""
