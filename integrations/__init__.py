"""Framework adapters: thin translations of Lightning, Hugging Face Trainer and Accelerate hooks into
core calls. Each module imports its framework lazily and names the extra to install when it is missing.
"""
