"""Model file formats: detection, SafeTensors, GGUF, normalized config, inspection.

Nothing here imports torch: the operator image and `modeldeploy inspect` use it.
"""
