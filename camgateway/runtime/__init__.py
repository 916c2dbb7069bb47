"""The runtime layer: the twistd plugin's tap, the CLI, configuration, the service tree, logs and workers."""
