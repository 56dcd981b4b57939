"""CoDreamer: an async learning loop that keeps an LLM agent learning from its own results."""

import os

# litellm (imported by ART) fetches a price list from the network at import time unless told
# to use its bundled copy; CoDreamer must start offline, so this is set before anything imports it.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

__all__ = ["__version__"]
__version__ = "0.1.0"
