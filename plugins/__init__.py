"""discon's built-in plugins (installed as ``discon_plugins``): one module per component family.

Each module registers its factories through the same ``discon_register_components`` hook that
third-party plugins use (see ``discon_core/hooks.py``).
"""
