"""The eleven lifecycle stages. Each module defines one Stage; stages/registry.py lists them."""
