"""speedrun-mup core library: model, muP, optimizers, data, monitoring. Nothing runs at import time."""
