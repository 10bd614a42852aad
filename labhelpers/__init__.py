"""labhelpers: the lab bench of the qwen-deploy-lab course.

Environment checks, model resolution, offline stand-in models and measurement.
It never hides the lesson: notebooks call transformers, GPTQModel, vLLM and friends
directly; labhelpers only sets up the bench around them.

Importing this package is instant and works in every course environment: heavy
libraries (torch, transformers, ...) are imported inside the functions that use them.
"""

__version__ = "0.1.0"
