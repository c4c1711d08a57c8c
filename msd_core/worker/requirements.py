"""What the worker's Python needs: the single source for the add-on's "Install worker" button.

pyproject.toml's ``[project.optional-dependencies].worker`` lists the same requirements (a test keeps
the two equal); this module exists because an installed extension has no pyproject.toml to read.
"""

WORKER_REQUIREMENTS = (
    "torch>=2.1",
    "diffusers>=0.30",
    "transformers>=4.40",
    "safetensors>=0.4",
    "pillow>=10",
    "numpy",
    "accelerate",
    "OpenEXR>=3.3",
    "peft>=0.21",  # diffusers' LoRA backend
)
